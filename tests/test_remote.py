"""hublabio.remote against a scripted OpenAI-compatible server on loopback: every sampling
option is forwarded, a server that rejects one gives an error naming it, and the answer comes
back through the engine's interface (Pieces, then GenerationStats as the return value)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hublabio.engine import SamplingOptions, collect
from hublabio.errors import HublabError
from hublabio.remote import RemoteExpert


class Server:
    def __init__(self, reject: str | None = None):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if reject and reject in body:
                    msg = json.dumps({"error": {"message": f"Unrecognized request argument "
                                                           f"supplied: {reject}"}}).encode()
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunks = [
                    {"choices": [{"delta": {"role": "assistant", "content": "Par"},
                                  "logprobs": {"content": [{"token": "Par", "logprob": -0.1,
                                                            "top_logprobs": [{"token": "Par",
                                                                              "logprob": -0.1}]}]}}]},
                    {"choices": [{"delta": {"content": "is."},
                                  "logprobs": {"content": [{"token": "is", "logprob": -0.2},
                                                           {"token": ".", "logprob": -0.3}]}}]},
                    {"choices": [{"delta": {}, "finish_reason": "length"}]},
                    {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}]
                for c in chunks:
                    self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


MSGS = [{"role": "user", "content": "Capital of France?"}]


def test_every_option_is_forwarded(server):
    opts = SamplingOptions(max_tokens=9, temperature=0.3, top_p=0.8, top_k=12,
                           repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                           seed=5, stop=("\n",), logit_bias={42: -5.0}, top_logprobs=1)
    collect(RemoteExpert(server.url, "m").generate(MSGS, opts))
    [body] = server.bodies
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty",
                                 "frequency_penalty", "presence_penalty", "seed", "stop",
                                 "logit_bias", "top_logprobs")} == {
        "max_tokens": 9, "temperature": 0.3, "top_p": 0.8, "top_k": 12, "repeat_penalty": 1.3,
        "frequency_penalty": 0.4, "presence_penalty": 0.2, "seed": 5, "stop": ["\n"],
        "logit_bias": {"42": -5.0}, "top_logprobs": 1}


def test_the_answer_comes_back_as_pieces_and_stats(server):
    text, pieces, stats = collect(RemoteExpert(server.url, "m").generate(MSGS, SamplingOptions()))
    assert text == "Paris."
    assert [[t.text for t in p.tokens] for p in pieces] == [["Par"], ["is", "."]]
    assert stats.logprobs == [-0.1, -0.2, -0.3] and stats.completion_tokens == 3
    assert stats.finish_reason == "length" and stats.prompt_tokens == 11
    assert pieces[0].tokens[0].top == ((-1, "Par", -0.1),)


def test_an_option_the_server_lacks_is_an_error_naming_it():
    s = Server(reject="top_k")
    try:
        with pytest.raises(HublabError, match="does not support option 'top_k'"):
            collect(RemoteExpert(s.url, "m").generate(MSGS, SamplingOptions(top_k=3)))
    finally:
        s.close()
