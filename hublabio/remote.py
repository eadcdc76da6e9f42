"""Remote experts: any OpenAI-compatible chat endpoint (another hublabd --http, llama-server,
Ollama's /v1) used as an expert, so experts can be spread over several machines.

`RemoteExpert.generate(messages, opts, cancel=)` has the local engine's interface: it yields
hublabio.textstream.Piece objects and returns GenerationStats. Every sampling option is
forwarded (OpenAI names where OpenAI has one; top_k and repeat_penalty as llama-server and
hublabd name them); a server that rejects one gets a HublabError naming the option, never a
silent drop.

Only the standard library is used (urllib). A request is ``POST <url>/chat/completions`` with
``stream: true`` and ``logprobs: true``; the answer is read as server-sent events. When the
server sends per-token log-probabilities (``choices[0].logprobs.content[*].logprob``, as
llama-server and hublabd do) the expert gets a confidence like a local one; when it sends none
(or refuses the ``logprobs`` field, in which case the request is retried once without it) the
confidence is "n/a" and synthesis compares router probabilities instead (docs/MOE.md).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from . import jsonsafe, protocol
from .errors import Cancelled, DaemonUnavailable, HublabError
from .params import forwarded
from .textstream import Piece, TokenInfo

MAX_ANSWER_BYTES = 8 << 20  # a whole (non-streamed) answer from a remote expert

# SamplingOptions field -> request body key (hublabio.params; max_tokens is always sent)
_FORWARD = {k: v for k, v in forwarded().items() if k != "max_tokens"}


def is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


class RemoteExpert:
    """One model behind an OpenAI-compatible base URL (``http://host:8080/v1``)."""

    def __init__(self, url: str, model: str, *, timeout_s: float = 120.0,
                 api_key: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.api_key = api_key

    @property
    def tokenizer_key(self) -> str:
        return f"remote:{self.url}#{self.model}"

    def _open(self, body: dict):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.url}/chat/completions",
                                     data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        return urllib.request.urlopen(req, timeout=self.timeout_s)

    def body(self, messages: list[dict], opts) -> dict:
        """The request body for SamplingOptions `opts`: every option that is set."""
        body = {"model": self.model, "messages": messages, "max_tokens": int(opts.max_tokens),
                "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
        for field, key in _FORWARD.items():
            value = getattr(opts, field)
            if value in (None, (), {}):
                continue
            if field in ("frequency_penalty", "presence_penalty") and value == 0.0:
                continue
            if field == "stop":
                value = list(value)
            elif field == "logit_bias":
                value = {str(k): v for k, v in value.items()}
            body[key] = value
        if opts.top_logprobs:
            body["top_logprobs"] = int(opts.top_logprobs)
        return body

    def _json(self, raw: bytes | str):
        """A remote answer's JSON within jsonsafe's limits; anything else is a HublabError."""
        try:
            return jsonsafe.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, JsonLimitError
            raise HublabError(f"remote expert {self.url}: bad JSON answer: {exc}") from None

    def _open_or_raise(self, body: dict):
        try:
            return self._open(body)
        except urllib.error.HTTPError as err:
            raise self._refusal(err, _read_error(err), body) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
            raise self._unreachable(err) from None

    def _refusal(self, err: urllib.error.HTTPError, detail: str, body: dict) -> HublabError:
        sent = [k for k in body if k not in ("model", "messages", "stream")]
        named = [k for k in sent if k in detail]
        what = (f"it does not support option {named[0]!r}" if named and err.code in (400, 422)
                else f"HTTP {err.code}")
        return HublabError(f"remote expert {self.url} (model {self.model!r}): {what}: {detail}")

    def _unreachable(self, err) -> DaemonUnavailable:
        reason = getattr(err, "reason", err)
        return DaemonUnavailable(f"remote expert {self.url} is unreachable: {reason}")

    def generate(self, messages: list[dict], opts, *, cancel: Any = None):
        """Stream the answer as Pieces; the return value is a GenerationStats."""
        from .engine import GenerationStats  # engine imports llama.cpp: only when used

        stats = GenerationStats()
        t0 = time.perf_counter()
        t_first = None
        try:
            for piece, final in self._pieces(self.body(messages, opts), cancel):
                if piece is None:
                    stats.finish_reason = final.get("finish_reason") or stats.finish_reason
                    usage = final.get("usage") or {}
                    stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    continue
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                stats.completion_tokens += max(1, len(piece.tokens))
                stats.logprobs += [t.logprob for t in piece.tokens]
                yield piece
        except Cancelled:
            stats.finish_reason = "cancelled"
        end = time.perf_counter()
        if stats.finish_reason not in ("stop", "length", "cancelled"):
            stats.finish_reason = "stop"
        if t_first and stats.completion_tokens > 1 and end > t_first:
            stats.gen_tps = (stats.completion_tokens - 1) / (end - t_first)
        if stats.logprobs:
            stats.mean_logprob = sum(stats.logprobs) / len(stats.logprobs)
        return stats

    def _pieces(self, body: dict, cancel) -> Iterator[tuple[Piece | None, dict | None]]:
        """(piece, None) per streamed delta, (None, {finish_reason, usage}) for the end."""
        final: dict = {}
        for chunk in self._chunks(body, cancel):
            if chunk.get("usage"):
                final["usage"] = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    final["finish_reason"] = choice["finish_reason"]
                piece = _choice_piece(choice)
                if piece is not None:
                    yield piece, None
        yield None, final

    def _chunks(self, body: dict, cancel) -> Iterator[dict]:
        try:
            resp = self._open(body)
        except urllib.error.HTTPError as err:
            detail = _read_error(err)
            if err.code in (400, 422) and "logprob" in detail.lower() \
                    and not body.get("top_logprobs"):
                # logprobs are hublabio's own ask (for confidence), not the user's: do without
                body = {k: v for k, v in body.items() if k != "logprobs"}
                resp = self._open_or_raise(body)
            else:
                raise self._refusal(err, detail, body) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
            raise self._unreachable(err) from None
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                raw = resp.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    raise HublabError(f"remote expert {self.url}: answer over "
                                      f"{MAX_ANSWER_BYTES >> 20} MiB")
                obj = self._json(raw or b"{}")
                if not isinstance(obj, dict):
                    raise HublabError(f"remote expert {self.url}: answer is not a JSON object")
                if "error" in obj:
                    raise HublabError(f"remote expert {self.url}: {obj['error']}")
                yield obj
                return
            while raw := resp.readline(protocol.MAX_LINE + 1):
                if len(raw) > protocol.MAX_LINE:
                    raise HublabError(f"remote expert {self.url}: a stream line over "
                                      f"{protocol.MAX_LINE >> 20} MiB")
                if is_cancelled(cancel):
                    raise Cancelled(f"remote expert {self.url}: cancelled")
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = self._json(data)
                if not isinstance(chunk, dict):
                    raise HublabError(f"remote expert {self.url}: bad stream chunk {data[:80]!r}")
                if "error" in chunk:
                    raise HublabError(f"remote expert {self.url}: {chunk['error']}")
                yield chunk


def _choice_piece(choice: dict) -> Piece | None:
    """One streamed (or whole) choice as a Piece: its text, and a TokenInfo per logprobs entry
    (OpenAI sends one entry per token; the delta text is their concatenation)."""
    delta = choice.get("delta") or choice.get("message") or {}
    text = delta.get("content") or ""
    tokens = []
    for entry in ((choice.get("logprobs") or {}).get("content")) or []:
        lp = _float(entry.get("logprob"))
        if lp is None:
            continue
        tok = entry.get("token", "")
        top = tuple((-1, t.get("token", ""), _float(t.get("logprob")) or 0.0)
                    for t in entry.get("top_logprobs") or [])
        tokens.append(TokenInfo(-1, tok.encode("utf-8", "replace"), lp, top, tok))
    if not text and not tokens:
        return None
    return Piece(text, tokens)


def _float(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _read_error(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - best effort for a message
        return str(err.reason)
    try:
        obj = json.loads(raw)
        e = obj.get("error", obj)
        return e.get("message", str(e)) if isinstance(e, dict) else str(e)
    except (json.JSONDecodeError, AttributeError):
        return raw[:200]
