"""The OpenAI-compatible HTTP API with a real HTTP client (httpx) against a real daemon."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from hublabio.client import Client
from hublabio.daemon.http import parse_listen
from hublabio.errors import HublabError
from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, make_daemon, wait_for, write_model_config


@pytest.fixture(scope="module")
def api(smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_model_config(folder, smollm2_path)
    handle = make_daemon(folder, http="127.0.0.1:0")
    host, port = handle.http_address
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=120) as http:
        yield handle, http
    handle.stop()


def sse_events(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_listens_on_loopback_only(api):
    handle, _ = api
    assert handle.http_address[0] == "127.0.0.1" and handle.http_address[1] > 0


def test_parse_listen():
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("8080", "host:99999", "a b:80", "127.0.0.1:x"):
        with pytest.raises(HublabError, match="--http"):
            parse_listen(bad)


def test_health_and_models(api):
    _, http = api
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    one = http.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200 and one.json()["quantization"] == "Q4_1"
    assert http.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"


def test_chat_completion(api):
    _, http = api
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    lps = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in lps) == choice["message"]["content"]
    assert all(e["logprob"] <= 0 for e in lps)


def test_chat_completion_stream(api):
    _, http = api
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and 0 < chunks[-1]["usage"]["completion_tokens"] <= 6


def test_completions_with_and_without_stream(api):
    _, http = api
    r = http.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 5,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json={"prompt": "The sky is", "max_tokens": 5,
                                                       "temperature": 0, "stream": True}) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    streamed = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert streamed == body["choices"][0]["text"]  # greedy: same text both ways


def test_errors_use_openai_shape(api):
    _, http = api
    cases = [
        (http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}),
         400, None),
        (http.post("/v1/chat/completions", json={"messages": []}), 400, None),
        (http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
         400, None),
        (http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [
            {"role": "user", "content": "hi"}]}), 404, "model_not_found"),
        (http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "temperature": 7}), 400, None),
        (http.get("/v1/chat/completions"), 405, "method_not_allowed"),
        (http.get("/v2/everything"), 404, "unknown_url"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.request.url, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if code:
            assert err["code"] == code
    bad_temp = cases[4][0].json()["error"]
    assert bad_temp["param"] == "temperature" and "temperature" in bad_temp["message"]


def test_metrics(api):
    _, http = api
    http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    text = http.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    lines = {ln.split(" ")[0]: ln.split(" ")[-1] for ln in text.text.splitlines()
             if ln and not ln.startswith("#")}
    assert float(lines["hublab_tokens_generated_total"]) > 0
    assert float(lines['hublab_requests_total{op="generate"}']) >= 1
    assert float(lines["hublab_memory_budget_bytes"]) == 2048 * 1048576
    assert float(lines["hublab_memory_used_bytes"]) > 0
    assert float(lines["hublab_models_loaded"]) == 1
    assert any(k.startswith('hublab_model_loaded{model="smol"') for k in lines)
    assert float(lines["hublab_last_tokens_per_second"]) > 0


def test_metrics_parse_with_prometheus_and_carry_llama_servers_names(api):
    from prometheus_client.parser import text_string_to_metric_families

    _, http = api
    before = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    fams = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}

    def value(fams, name, suffix="", **labels):
        return next(s.value for s in fams[name].samples
                    if s.name == name + suffix and all(s.labels.get(k) == v
                                                       for k, v in labels.items()))

    # llama-server's names (the parser drops the _total of counters from the family name)
    got = value(fams, "llamacpp:tokens_predicted", "_total")
    assert got - value(before, "llamacpp:tokens_predicted", "_total") == 3
    assert value(fams, "llamacpp:prompt_tokens", "_total") > 0
    assert value(fams, "llamacpp:predicted_tokens_seconds") > 0
    assert fams["hublab_time_to_first_token_seconds"].type == "histogram"
    assert value(fams, "hublab_time_to_first_token_seconds", "_count") == \
        value(before, "hublab_time_to_first_token_seconds", "_count") + 1
    assert value(fams, "hublab_generation_tokens_per_second", "_bucket", le="+Inf") >= 1
    assert value(fams, "hublab_model_completion_tokens", "_total", model=MODEL) >= 3


def test_http_client_hangup_cancels(api):
    handle, http = api
    with Client(handle.socket_path) as c:
        before = c.call("stats")["cancelled"]
        host, port = handle.http_address
        body = json.dumps({"prompt": "A long story:", "max_tokens": 400, "stream": True}).encode()
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert b"data: " in s.recv(4096) or b"data: " in s.recv(4096)
        wait_for(lambda: c.call("stats")["cancelled"] > before)


def test_keep_alive_and_http10(api):
    handle, http = api
    host, port = handle.http_address
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2  # two answers on one connection, then closed
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK") and b'"object": "list"' in data


def test_remote_model_through_another_daemons_api(api, tmp_path, smollm2_path):
    """A type = "remote" model answers through hublabio.remote from another hublabd's HTTP API."""
    handle, _ = api
    host, port = handle.http_address
    folder = tmp_path / "m"
    write_model_config(folder, smollm2_path)
    (folder / "far.toml").write_text(
        f'[model]\nname = "far"\ntype = "remote"\nurl = "http://{host}:{port}/v1"\n'
        f'remote_model = "{MODEL}"\n\n[inference]\nmax_tokens = 5\ntemperature = 0.0\n')
    with make_daemon(folder) as d, Client(d.socket_path, timeout=120) as c:
        events = list(c.stream("generate", model="far",
                               messages=[{"role": "user", "content": "Say hi."}]))
        tokens = [e for e in events if e["type"] == "token"]
        data = events[-1]["data"]
        assert data["remote"].endswith(f":{port}/v1") and data["model"] == "far"
        assert tokens and data["text"] == "".join(t["text"] for t in tokens)
        assert 0 < data["completion_tokens"] <= 5
        assert all(t["logprob"] is not None and t["logprob"] <= 0 for t in tokens)
        with pytest.raises(HublabError, match="send 'messages'"):
            c.call("generate", model="far", prompt="raw text")


def test_stream_that_fails_before_any_token_gets_an_error_status(api):
    _, http = api
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "word " * 600}], "stream": True}) as r:
        assert r.status_code >= 400
        r.read()
        err = r.json()["error"]
    assert "does not fit the context" in err["message"]


def test_busy_daemon_answers_429(smollm2_path, tmp_path):
    from .test_daemon import one_at_a_time

    one_at_a_time()
    folder = tmp_path / "m"
    write_model_config(folder, smollm2_path)
    with make_daemon(folder, queue_size=0, http="127.0.0.1:0") as d, \
            Client(d.socket_path, timeout=120) as c:
        host, port = d.http_address
        running = c.stream("generate", prompt="A long story:", options={"max_tokens": 400})
        assert next(e for e in running if e["type"] == "token")
        r = httpx.post(f"http://{host}:{port}/v1/completions", json={"prompt": "Hi"}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        running.close()


def _raw(handle, request: bytes, timeout: float = 10.0) -> bytes:
    host, port = handle.http_address
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("request_bytes,fragment", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n"
     b"Connection: close\r\n\r\n{}", b"content-length header appears twice"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: "
     b"chunked\r\nConnection: close\r\n\r\n{}", b"not both"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Connection: close\r\n\r\n-5\r\n", b"negative chunk size"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\nConnection: close"
     b"\r\n\r\n{}", b"Content-Length is not a number")])
def test_http_framing_edge_cases_get_a_400_not_a_hang(api, request_bytes, fragment):
    handle, http = api
    data = _raw(handle, request_bytes)
    assert data.startswith(b"HTTP/1.1 400") and fragment in data
    assert http.get("/health").status_code == 200  # and the server still answers


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_request_gets_its_answer(api, stream):
    """A client that shuts down its sending side after the request still reads the answer
    (before: the EOF cancelled the generation and the connection closed with nothing)."""
    handle, _ = api
    body = json.dumps({"prompt": "Count from 1 to 100: 1, 2, 3,", "max_tokens": 40,
                       "temperature": 0, "stream": stream,
                       "stream_options": {"include_usage": True}}).encode()
    host, port = handle.http_address
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b'"completion_tokens": 40' in data  # all of it: not cut short by a cancel
    assert (b"data: [DONE]" in data) if stream else (b'"finish_reason": "length"' in data)


def test_a_stream_nobody_reads_does_not_hold_up_generation(api, monkeypatch):
    """The generation thread never waits for an SSE client: what it does not read piles up in
    its own buffer until the cap, then it is cut off and its generation cancelled (before, the
    llama.cpp thread blocked on the socket for WRITE_STALL_S, 30 s, stalling every client)."""
    from hublabio.daemon import sockwrite

    real_init = sockwrite.SocketWriter.__init__

    def small_buffers(self, sock, loop):  # so that the kernel's buffers fill within a test
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        real_init(self, sock, loop)

    monkeypatch.setattr(sockwrite.SocketWriter, "__init__", small_buffers)
    monkeypatch.setattr(sockwrite, "MAX_PENDING", 32 << 10)
    handle, http = api
    with Client(handle.socket_path) as c:
        before = c.call("stats")["cancelled"]
        host, port = handle.http_address
        body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}],
                           "max_tokens": 400, "stream": True, "logprobs": True,
                           "top_logprobs": 20}).encode()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect((host, port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            t0 = time.monotonic()
            wait_for(lambda: c.call("stats")["cancelled"] > before, timeout=20)
            assert time.monotonic() - t0 < sockwrite.WRITE_STALL_S
            out = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert out.status_code == 200


def test_a_hostile_json_body_is_a_400_naming_the_field(api):
    _, http = api
    r = http.post("/v1/completions", content='{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and 'field "max_tokens"' in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content='{"messages": ' + "[" * 50_000 + "]" * 50_000
                  + "}", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("model", ["/etc/passwd", "/nowhere/x.gguf", "../../etc/hostname"])
def test_the_http_model_field_names_nothing_outside_the_models_dir(api, model):
    """Issue 11: any server path was accepted, and the 500 told whether the file existed, its
    size and its first 4 bytes (b'root' for /etc/passwd)."""
    _, http = api
    r = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 1,
                                                "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 404, r.text
    msg = r.json()["error"]["message"]
    assert "inside the models directory" in msg
    assert "b'" not in msg and "MiB" not in msg and "bytes" not in msg


def test_openai_error_codes(api):
    """OpenAI's codes, so that SDKs map them: model_not_found, context_length_exceeded."""
    _, http = api
    r = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json()["error"] | {"message": None} == {"message": None, "param": "model",
                                                     "type": "invalid_request_error",
                                                     "code": "model_not_found"}
    r = http.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "word " * 2000}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (
        "context_length_exceeded", "messages", "invalid_request_error")


def test_cors_is_off_by_default(api):
    _, http = api
    r = http.get("/health", headers={"Origin": "http://ui.test"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = http.options("/v1/chat/completions", headers={
        "Origin": "http://ui.test", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"]


def test_cors_origin_lets_that_browser_origin_in(smollm2_path, tmp_path):
    write_model_config(tmp_path, smollm2_path)
    with make_daemon(tmp_path, http="127.0.0.1:0", cors_origins=("http://ui.test",)) as d:
        host, port = d.http_address
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as http:
            pre = http.options("/v1/chat/completions", headers={
                "Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization"})
            assert pre.status_code == 204
            assert pre.headers["access-control-allow-origin"] == "http://ui.test"
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert pre.headers["access-control-allow-headers"] == "content-type, authorization"
            r = http.post("/v1/completions", headers={"Origin": "http://ui.test"},
                          json={"prompt": "Hi", "max_tokens": 2, "stream": True})
            assert r.headers["access-control-allow-origin"] == "http://ui.test"
            other = http.get("/health", headers={"Origin": "http://evil.test"})
            assert "access-control-allow-origin" not in other.headers
