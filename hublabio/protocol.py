"""The daemon's wire protocol: versioned JSON lines over a Unix socket.

One JSON object per line, UTF-8, at most MAX_LINE bytes, nested at most jsonsafe.MAX_DEPTH
levels, numbers of at most jsonsafe.MAX_NUMBER_CHARS characters (no NaN or Infinity).

Request:  {"v": 1, "id": "<str>", "op": "<name>", ...params}
Events back, each tagged with the request's id:
  {"v": 1, "id": .., "type": "token", "text": .., "logprob": ..}   streamed output
  {"v": 1, "id": .., "type": "info", "text": ..}                    progress lines
and exactly one terminal event per request:
  {"v": 1, "id": .., "type": "result", "data": {...}}
  {"v": 1, "id": .., "type": "error", "code": "<HublabError.code>", "message": .., "details": {...}}
Cancel a running or queued request: {"v": 1, "id": "<new>", "op": "cancel", "target": "<id>"}.

A malformed line gets an error event (code "protocol", id null when none could be read) and the
connection stays open.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass

from hublabio import errors, jsonsafe
from hublabio.errors import HublabError, ProtocolError

VERSION = 1
MAX_LINE = 1 << 20  # bytes per line, newline excluded
TERMINAL = frozenset({"result", "error"})
EVENT_TYPES = frozenset({"token", "info", "result", "error"})

# Attributes of an error worth sending to the client (BudgetError numbers, ConfigError file/key).
_DETAIL_ATTRS = ("path", "key", "needed_mb", "budget_mb", "in_use_mb", "suggestion")


def _error_classes() -> dict[str, type[HublabError]]:
    classes: dict[str, type[HublabError]] = {}
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, HublabError):
            classes.setdefault(obj.code, obj)
    return classes


ERROR_CLASSES = _error_classes()

_ids = itertools.count(1)
_prefix = f"{os.getpid():x}"


def new_id() -> str:
    """A request id unique within this process (the daemon only needs per-connection uniqueness)."""
    return f"{_prefix}-{next(_ids)}"


def encode(msg: dict) -> bytes:
    """One message as one line (compact JSON + newline). NaN/inf log-probs become null."""
    return (json.dumps(msg, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                       default=_jsonable) + "\n").encode("utf-8")


def _jsonable(obj):
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _parse(line: bytes | str, what: str) -> dict:
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise ProtocolError(f"{what} is {len(line)} bytes, over the {MAX_LINE}-byte line limit")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        msg = jsonsafe.loads(line)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{what} is not valid JSON: {e.msg} at column {e.colno}") from None
    except jsonsafe.JsonLimitError as e:
        raise ProtocolError(f"{what} refused: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(msg).__name__}")
    return msg


class VersionMismatch(ProtocolError):
    """The other side speaks another protocol version."""


class RequestError(ProtocolError):
    """A request line that could not be accepted; carries the request id when one was readable."""

    def __init__(self, message: str, request_id: str | None = None):
        self.request_id = request_id
        super().__init__(message)


@dataclass(frozen=True)
class Request:
    id: str
    op: str
    params: dict


def make_request(op: str, request_id: str | None = None, **params) -> dict:
    return {"v": VERSION, "id": request_id or new_id(), "op": op, **params}


def decode_request(line: bytes | str) -> Request:
    """Parse and check one request line. Raises RequestError (with the id when known)."""
    try:
        msg = _parse(line, "request")
    except ProtocolError as e:
        raise RequestError(str(e)) from None
    rid = msg.get("id")
    if not isinstance(rid, str) or not rid:
        raise RequestError('request needs "id", a non-empty string')
    v = msg.get("v")
    if v != VERSION:
        raise RequestError(
            f"protocol version mismatch: request has v={v!r}, this daemon speaks v={VERSION}; "
            "upgrade the client or the daemon so both match", rid)
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise RequestError('request needs "op", a non-empty string', rid)
    params = {k: val for k, val in msg.items() if k not in ("v", "id", "op")}
    return Request(rid, op, params)


# --- events -----------------------------------------------------------------------------------

def token(text: str, logprob: float | None = None, request_id: str | None = None, *,
          tokens: list[dict] | None = None) -> dict:
    """A piece of streamed text; `logprob` is the piece's (the sum over its tokens). `tokens`,
    when asked for, lists each token: text, bytes, logprob and top alternatives."""
    ev = {"v": VERSION, "id": request_id, "type": "token", "text": text,
          "logprob": _finite(logprob)}
    if tokens is not None:
        ev["tokens"] = tokens
    return ev


def info(text: str, request_id: str | None = None) -> dict:
    return {"v": VERSION, "id": request_id, "type": "info", "text": text}


def result(data: dict | None, request_id: str | None = None) -> dict:
    return {"v": VERSION, "id": request_id, "type": "result", "data": data or {}}


def error(code: str, message: str, request_id: str | None = None,
          details: dict | None = None) -> dict:
    ev = {"v": VERSION, "id": request_id, "type": "error", "code": code, "message": message}
    if details:
        ev["details"] = details
    return ev


def error_event(exc: BaseException, request_id: str | None = None) -> dict:
    """The error event for an exception: HublabErrors keep their code and numbers; anything else
    is reported as an internal error with its type, never as a dropped connection."""
    if isinstance(exc, HublabError):
        details = {a: getattr(exc, a) for a in _DETAIL_ATTRS if getattr(exc, a, None) is not None}
        return error(exc.code, str(exc), request_id, details)
    return error("internal", f"internal error: {type(exc).__name__}: {exc}", request_id)


def decode_event(line: bytes | str) -> dict:
    msg = _parse(line, "event")
    v = msg.get("v")
    if v != VERSION:
        raise VersionMismatch(
            f"protocol version mismatch: daemon sent v={v!r}, this client speaks v={VERSION}; "
            "upgrade the client or the daemon so both match")
    if msg.get("type") not in EVENT_TYPES:
        raise ProtocolError(f"event has unknown type {msg.get('type')!r}")
    return msg


def exception_from_event(ev: dict) -> HublabError:
    """Rebuild the HublabError subclass named by an error event's code (details restored)."""
    cls = ERROR_CLASSES.get(ev.get("code"), HublabError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, ev.get("message", ""))
    for k, val in (ev.get("details") or {}).items():
        if k in _DETAIL_ATTRS:
            setattr(exc, k, val)
    if cls is HublabError and ev.get("code"):
        exc.code = ev["code"]
    return exc


# --- framing ----------------------------------------------------------------------------------

class TooLong:
    """Marker yielded by LineSplitter for a line over the limit (its bytes were discarded)."""

    def __init__(self, size: int):
        self.size = size

    def __repr__(self):
        return f"TooLong({self.size})"


class LineSplitter:
    """Split a byte stream into lines without ever buffering more than `limit` bytes: an
    over-long line is discarded up to its newline and reported once as TooLong."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self._buf = bytearray()
        self._discarding = 0  # bytes dropped so far of an over-long line, 0 when not dropping

    def feed(self, data: bytes) -> list:
        out: list = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl < 0 else nl
            chunk = data[start:end]
            if self._discarding:
                self._discarding += len(chunk)
            elif len(self._buf) + len(chunk) > self.limit:
                self._discarding = len(self._buf) + len(chunk)
                self._buf.clear()
            else:
                self._buf += chunk
            if nl < 0:
                break
            if self._discarding:
                out.append(TooLong(self._discarding))
                self._discarding = 0
            else:
                line = bytes(self._buf).rstrip(b"\r")
                self._buf.clear()
                if line.strip():
                    out.append(line)
            start = nl + 1
        return out

    @property
    def pending(self) -> int:
        return len(self._buf) or self._discarding
