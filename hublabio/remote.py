"""Remote experts: any OpenAI-compatible chat endpoint (another hublabd --http, llama-server,
Ollama's /v1) used as an expert, so experts can be spread over several machines.

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
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import Cancelled, DaemonUnavailable, HublabError


@dataclass(frozen=True)
class RemoteToken:
    text: str
    logprob: float | None


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

    def stream(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.7,
               top_p: float = 0.9, cancel: Any = None) -> Iterator[RemoteToken]:
        body = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                "temperature": float(temperature), "top_p": float(top_p), "stream": True,
                "logprobs": True}
        try:
            try:
                resp = self._open(body)
            except urllib.error.HTTPError as err:
                detail = _read_error(err)
                if err.code in (400, 422) and "logprob" in detail.lower():
                    body.pop("logprobs")
                    resp = self._open(body)
                else:
                    raise HublabError(f"remote expert {self.url} (model {self.model!r}): "
                                      f"HTTP {err.code}: {detail}") from None
        except urllib.error.HTTPError as err:
            raise HublabError(f"remote expert {self.url} (model {self.model!r}): HTTP {err.code}: "
                              f"{_read_error(err)}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise DaemonUnavailable(f"remote expert {self.url} is unreachable: {reason}") from None
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                yield from _whole_response(json.loads(resp.read() or b"{}"), self.url)
                return
            for raw in resp:
                if is_cancelled(cancel):
                    raise Cancelled(f"remote expert {self.url}: cancelled")
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise HublabError(f"remote expert {self.url}: bad stream chunk {data[:80]!r}")
                if "error" in chunk:
                    raise HublabError(f"remote expert {self.url}: {chunk['error']}")
                yield from _chunk_tokens(chunk)


def _chunk_tokens(chunk: dict) -> Iterator[RemoteToken]:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or choice.get("message") or {}
        text = delta.get("content") or ""
        lps = ((choice.get("logprobs") or {}).get("content")) or []
        if lps:
            # one entry per token; the delta text is their concatenation
            for i, entry in enumerate(lps):
                piece = entry.get("token", "") if len(lps) > 1 else text
                yield RemoteToken(piece, _float(entry.get("logprob")))
        elif text:
            yield RemoteToken(text, None)


def _whole_response(obj: dict, url: str) -> Iterator[RemoteToken]:
    if "error" in obj:
        raise HublabError(f"remote expert {url}: {obj['error']}")
    yield from _chunk_tokens(obj)


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
