"""OpenAI-compatible HTTP API for hublabd, on asyncio streams (no web framework on the Pi).

  GET  /health                  liveness + memory
  GET  /metrics                 Prometheus text (requests, tokens, tok/s, memory, loaded models)
  GET  /v1/models[/ID]          the configured models, then "moe" and each expert
  POST /v1/chat/completions     messages → answer; "stream": true gives SSE chunks + [DONE];
                                model "moe" routes the last user turn through MoE-R (the
                                earlier turns go to the experts), an expert's name asks that
                                expert; `hublab: {routing, synthesis}` overrides `settings moe`
                                for the request, and the answer carries `hublab` (experts
                                chosen, probabilities, the answer that won)
  POST /v1/completions          raw prompt → text; same streaming
  POST /v1/embeddings           texts or token lists → vectors (local decoder models: the mean
                                of the final hidden states, L2-normalized), float or base64

HTTP/1.1 with keep-alive, Content-Length or chunked bodies, `Expect: 100-continue`; responses
use Content-Length, streams use chunked transfer encoding. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}. Requests go through the daemon's dispatcher,
so they share the socket clients' queue (busy → 429) and a client that hangs up cancels its
generation; one that only half-closes (shuts down its sending side) still gets the answer.
Streams are written through a SocketWriter (hublabio.daemon.sockwrite): a client that does not
read is cut off without holding up the generation. Listens on loopback unless another host is
given explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import re
import struct
import time

from hublabio import jsonsafe, protocol
from hublabio.daemon.http_tools import ToolPlan, ToolsError, parse_tools, template_messages
from hublabio.daemon.metrics import prometheus
from hublabio.daemon.sockwrite import WRITE_STALL_S, ClientGone, SocketWriter
from hublabio.errors import HublabError
from hublabio.params import INFERENCE, ParamError, by_name, openai_options
from hublabio.params import check as check_param
from hublabio.params import parse_listen as params_parse_listen

log = logging.getLogger("hublabd.http")

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
KEEPALIVE_S = 60.0
MAX_TRAILERS = 32
MOE_MODEL = "moe"  # the model name that routes through MoE-R
LINGER_S = 2.0
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
# daemon error code → (HTTP status, OpenAI error type, OpenAI error code, param); any other
# code is a 500 server_error carrying the daemon's code
ERROR_STATUS = {
    "protocol": (400, "invalid_request_error", "invalid_request", None),
    "config": (400, "invalid_request_error", "invalid_value", None),
    "context": (400, "invalid_request_error", "context_length_exceeded", "messages"),
    "not_found": (404, "invalid_request_error", "model_not_found", "model"),
    "busy": (429, "rate_limit_error", "rate_limit_exceeded", None),
    "budget": (503, "server_error", "insufficient_memory", None),
    "unavailable": (503, "server_error", "service_unavailable", None),
    "cancelled": (503, "server_error", "cancelled", None),
}


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT', or ':PORT' for loopback) → (host, port). Port 0 = any."""
    try:
        return params_parse_listen(text)
    except ParamError as exc:
        raise HublabError(f"--http: {exc}") from None


async def start_http(dispatcher, service, listen: str):
    """Start the API on the running loop; returns (asyncio server, (host, port))."""
    host, port = parse_listen(listen)
    api = HttpApi(dispatcher, service)
    server = await asyncio.start_server(api.handle, host, port, limit=MAX_HEADER_BYTES)
    addr = server.sockets[0].getsockname()
    if _is_ip(addr[0]) and not ipaddress.ip_address(addr[0]).is_loopback:
        log.warning("HTTP API listens on %s:%d, beyond loopback: anyone on the network can "
                    "use the models", addr[0], addr[1])
    return server, (addr[0], addr[1])


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def from_event(cls, ev: dict) -> "HttpError":
        status, type_, code, param = ERROR_STATUS.get(
            ev.get("code"), (500, "server_error", ev.get("code"), None))
        return cls(status, ev.get("message", "error"), code=code, param=param, type_=type_)


class Request:
    def __init__(self, method: str, target: str, version: str, headers: dict, body: bytes):
        self.method = method
        self.path = target.split("?", 1)[0]
        self.version = version
        self.headers = headers
        self.body = body
        self.close_after = False  # set when the response can only end by closing

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def json(self) -> dict:
        ctype = self.headers.get("content-type", "application/json")
        if "json" not in ctype and "text/plain" not in ctype:
            raise HttpError(415, f"Content-Type must be application/json, got {ctype!r}")
        try:
            obj = jsonsafe.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None
        except jsonsafe.JsonLimitError as exc:
            raise HttpError(400, f"request body refused: {exc}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "request body must be a JSON object")
        return obj


class HttpApi:
    def __init__(self, dispatcher, service):
        self.dispatcher = dispatcher
        self.service = service
        self.counts: dict[tuple[str, int], int] = {}
        self._outs: dict[asyncio.StreamWriter, SocketWriter] = {}  # per connection, for streams
        self.cors_origins = tuple(getattr(service.settings, "cors_origins", ()) or ())
        self._cors: dict[asyncio.StreamWriter, str] = {}  # the current request's CORS headers

    # ---- connection loop -----------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._outs[writer] = SocketWriter(writer.get_extra_info("socket"),
                                          asyncio.get_running_loop())
        try:
            while True:
                try:
                    req = await asyncio.wait_for(self._read_request(reader, writer), KEEPALIVE_S)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                except HttpError as exc:
                    await self._send_json(writer, exc.status, exc.body(), keep_alive=False)
                    break
                if req is None:
                    break
                keep = req.keep_alive
                self._cors[writer] = self._cors_headers(req)
                if req.method == "OPTIONS":
                    status = await self._preflight(req, writer, keep)
                else:
                    status = await self._dispatch(req, reader, writer, keep)
                key = (req.path if req.path in _ROUTES else "other", status)
                self.counts[key] = self.counts.get(key, 0) + 1
                if not keep or req.close_after:
                    break
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown; ending normally spares asyncio's callback a cancelled task
        finally:
            self._cors.pop(writer, None)
            self._outs.pop(writer).close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await _linger(reader, writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader, writer) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request headers exceed {MAX_HEADER_BYTES} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None  # clean close between requests
            raise HttpError(400, "incomplete request headers") from None
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise HttpError(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505, f"unsupported HTTP version {version!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise HttpError(400, f"malformed header line {line[:60]!r}")
            key = name.strip().lower()
            if key in headers and key in ("content-length", "transfer-encoding", "host"):
                raise HttpError(400, f"the {key} header appears twice")
            headers[key] = value.strip()
        if "content-length" in headers and "transfer-encoding" in headers:
            raise HttpError(400, "a request has either Content-Length or Transfer-Encoding, "
                                 "not both")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            try:
                body = await self._read_chunked(reader)
            except asyncio.IncompleteReadError:
                raise HttpError(400, "chunked request body ended before its last chunk") from None
        elif "content-length" in headers:
            raw = headers["content-length"]
            if not (raw.isascii() and raw.isdigit()):  # no sign, no spaces, no "1,2"
                raise HttpError(400, "Content-Length is not a number")
            n = int(raw)
            if n < 0 or n > MAX_BODY_BYTES:
                raise HttpError(413, f"request body of {n} bytes exceeds {MAX_BODY_BYTES}")
            try:
                body = await reader.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                raise HttpError(400, f"request body ended after {len(exc.partial)} of the {n} "
                                     "bytes its Content-Length announced") from None
        elif method == "POST":
            raise HttpError(411, "POST needs a Content-Length or chunked body")
        return Request(method, target, version, headers, body)

    async def _read_chunked(self, reader) -> bytes:
        body = bytearray()
        while True:
            text = (await _read_line(reader, "chunk size")).split(b";")[0].strip()
            if text.startswith(b"-"):
                raise HttpError(400, "negative chunk size")
            if not _HEX.fullmatch(text):
                raise HttpError(400, f"malformed chunk size {text[:20]!r}")
            size = int(text, 16)
            if size == 0:
                for _ in range(MAX_TRAILERS + 1):
                    if await _read_line(reader, "trailer") == b"\r\n":
                        return bytes(body)
                raise HttpError(400, f"more than {MAX_TRAILERS} trailer lines")
            if len(body) + size > MAX_BODY_BYTES:
                raise HttpError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "a chunk is longer than its size says")

    # ---- routing -------------------------------------------------------------------------
    async def _dispatch(self, req: Request, reader, writer, keep: bool) -> int:
        try:
            route = _ROUTES.get(req.path)
            if route is None and req.path.startswith("/v1/models/"):
                route = ("GET", HttpApi._model)
            if route is None:
                raise HttpError(404, f"no route {req.method} {req.path}; try /v1/models, "
                                     "/v1/chat/completions, /v1/completions, /v1/embeddings, "
                                     "/health, /metrics",
                                code="unknown_url")
            method, fn = route
            if req.method != method:
                raise HttpError(405, f"{req.path} accepts {method}, not {req.method}",
                                code="method_not_allowed")
            return await fn(self, req, reader, writer, keep)
        except HttpError as exc:
            await self._send_json(writer, exc.status, exc.body(), keep_alive=keep)
            return exc.status

    # ---- CORS (off unless --cors-origin / [http] cors_origins) -------------------------------
    def _allowed_origin(self, req: Request) -> str | None:
        origin = req.headers.get("origin")
        if origin and ("*" in self.cors_origins or origin in self.cors_origins):
            return origin
        return None

    def _cors_headers(self, req: Request) -> str:
        origin = self._allowed_origin(req)
        return f"Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n" if origin else ""

    async def _preflight(self, req: Request, writer, keep: bool) -> int:
        """A browser's OPTIONS before a cross-origin request: allowed origins get 204 and the
        methods and headers they may use; others a 403 saying how to allow them."""
        if self._allowed_origin(req) is None:
            refusal = HttpError(403, "cross-origin requests are off for this origin (start "
                                     "hublabd with --cors-origin ORIGIN to allow one)",
                                code="cors_origin_not_allowed")
            await self._send_json(writer, 403, refusal.body(), keep)
            return 403
        asked = req.headers.get("access-control-request-headers", "Content-Type, Authorization")
        head = ("HTTP/1.1 204 No Content\r\n" + self._cors[writer]
                + "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                f"Access-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: 600\r\n"
                f"Content-Length: 0\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n")
        writer.write(head.encode("latin-1"))
        await asyncio.wait_for(writer.drain(), WRITE_STALL_S)
        return 204

    # ---- responses -----------------------------------------------------------------------
    async def _send(self, writer, status: int, body: bytes, ctype: str, keep_alive: bool) -> None:
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                + self._cors.get(writer, "")
                + f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
        writer.write(head.encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), WRITE_STALL_S)  # a client that never reads

    async def _send_json(self, writer, status: int, obj, keep_alive: bool) -> None:
        await self._send(writer, status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                         "application/json", keep_alive)

    async def _call(self, op: str, params: dict) -> dict:
        """Run a light op through the dispatcher and return its data (HttpError on error)."""
        out: dict = {}

        async def send(ev):
            out["ev"] = ev

        job = self.dispatcher.new_job(f"http-{protocol.new_id()}", op)
        await self.dispatcher.track(self.dispatcher.submit(job, params, send))
        ev = out["ev"]
        if ev["type"] == "error":
            raise HttpError.from_event(ev)
        return ev["data"]

    # ---- endpoints -----------------------------------------------------------------------
    async def _health(self, req, reader, writer, keep) -> int:
        data = await self._call("stats", {})
        await self._send_json(writer, 200, {
            "status": "ok", "uptime_s": data["uptime_s"], "models_loaded": len(data["resident"]),
            "used_mb": data["used_mb"], "budget_mb": data["budget_mb"]}, keep)
        return 200

    async def _models(self, req, reader, writer, keep) -> int:
        await self._send_json(writer, 200, {"object": "list", "data": await self._model_objs()},
                              keep)
        return 200

    async def _model(self, req, reader, writer, keep) -> int:
        name = req.path[len("/v1/models/"):]
        for m in await self._model_objs():
            if m["id"] == name:
                await self._send_json(writer, 200, m, keep)
                return 200
        raise HttpError(404, f"no model named {name!r}", param="model", code="model_not_found")

    async def _model_objs(self) -> list[dict]:
        """The configured models, then `moe` (MoE-R under the current `settings moe`) and each
        available expert, when there are experts."""
        objs = [_model_obj(m) for m in (await self._call("models.list", {}))["models"]]
        experts = await self._experts()
        if experts:
            moe = await self._call("settings.moe.get", {})
            objs.append({"id": MOE_MODEL, "object": "model", "created": 0, "owned_by": "hublab",
                         "hublab": {"kind": "moe", "routing": moe["routing"],
                                    "synthesis": moe["synthesis"], "router": moe["router"],
                                    "experts": sorted(r["domain"] for r in experts.values())}})
            objs += [{"id": name, "object": "model", "created": 0, "owned_by": "hublab",
                      "loaded": bool(r["loaded"]),
                      "hublab": {"kind": "expert", "domain": r["domain"]}}
                     for name, r in sorted(experts.items())]
        return objs

    async def _metrics(self, req, reader, writer, keep) -> int:
        data = await self._call("stats", {})
        body = prometheus(data, self.counts, self.dispatcher.running,
                          self.dispatcher.waiting).encode()
        await self._send(writer, 200, body, "text/plain; version=0.0.4; charset=utf-8", keep)
        return 200

    async def _chat(self, req, reader, writer, keep) -> int:
        body = req.json()
        _check_fields(body, "chat")
        try:
            plan = parse_tools(body)
        except ToolsError as exc:
            raise HttpError(400, str(exc), param=exc.param) from None
        messages = template_messages(_chat_messages(body.get("messages")))
        if plan is not None:
            messages = plan.messages(messages)
        return await self._generate(req, reader, writer, keep, body, {"messages": messages},
                                    chat=True, tools=plan)

    async def _completions(self, req, reader, writer, keep) -> int:
        body = req.json()
        _check_fields(body, "completions")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HttpError(400, "'prompt' must be a string (one prompt per request)",
                            param="prompt")
        if body.get("echo"):
            raise HttpError(400, "'echo' is not supported", param="echo")
        for key in ("tools", "tool_choice"):
            if body.get(key) is not None:
                raise HttpError(400, f"'{key}' needs /v1/chat/completions", param=key)
        return await self._generate(req, reader, writer, keep, body, {"prompt": prompt},
                                    chat=False)

    async def _embeddings(self, req, reader, writer, keep) -> int:
        """OpenAI's embeddings: `input` a string, a list of strings, a token list or a list of
        token lists; `encoding_format` float (default) or base64 (little-endian float32, what
        the openai SDK asks for). `dimensions` is refused: these vectors cannot be shortened."""
        body = req.json()
        _check_fields(body, "embeddings")
        for key in ("dimensions",):
            if body.get(key) is not None:
                raise HttpError(400, f"'{key}' is not supported: the vectors have the model's "
                                     "width", param=key)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise HttpError(400, f"'encoding_format' must be float or base64, got {fmt!r}",
                            param="encoding_format")
        items = body.get("input")
        if isinstance(items, str) or (isinstance(items, list) and items and
                                      all(isinstance(t, int) for t in items)):
            items = [items]
        if not isinstance(items, list) or not items:
            raise HttpError(400, "'input' must be a string, a list of strings, a list of token "
                                 "ids or a list of token-id lists", param="input")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError(400, "'model' must be a string", param="model")
        if model == MOE_MODEL:
            raise HttpError(400, "'moe' routes chat questions; ask a model or an expert by name "
                                 "for embeddings", param="model")
        params = {"input": items, **({"model": model} if model else {})}
        job = self.dispatcher.new_job(f"http-{protocol.new_id()}", "embed")
        _, data = await self._run_whole(job, params)
        data_out = [{"object": "embedding", "index": i,
                     "embedding": (base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                                   if fmt == "base64" else v)}
                    for i, v in enumerate(data["embeddings"])]
        n = data["prompt_tokens"]
        await self._send_json(writer, 200, {
            "object": "list", "data": data_out, "model": data["model"],
            "usage": {"prompt_tokens": n, "total_tokens": n}}, keep)
        return 200

    async def _generate(self, req, reader, writer, keep, body: dict, params: dict, *,
                        chat: bool, tools: ToolPlan | None = None) -> int:
        if body.get("n", 1) != 1:
            raise HttpError(400, "only n = 1 is supported", param="n")
        options = _options(body)
        if tools is not None:
            if "grammar" in options:
                raise HttpError(400, "tools answer in their own JSON format: no response_format "
                                     "or grammar with them", param="response_format")
            try:
                options["grammar"] = tools.grammar()
            except ToolsError as exc:
                raise HttpError(400, str(exc), param=exc.param) from None
        want_lp = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        top_n = body.get("top_logprobs") if chat else body.get("logprobs")
        if want_lp:
            if top_n is not None:
                field = "top_logprobs" if chat else "logprobs"
                try:
                    top_n = check_param(_SCHEMA["top_logprobs"], top_n)
                except ParamError as exc:
                    raise HttpError(400, f"'{field}' {exc}", param=field) from None
            options["logprobs"] = True
            if top_n:
                options["top_logprobs"] = top_n
        else:
            options["logprobs"] = False  # nobody reads them: skip the per-token log-softmax
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError(400, "'model' must be a string", param="model")
        op = "generate"
        moe_params = await self._moe_params(model, body) if model else None
        if moe_params is not None:  # MoE-R, or one expert through it
            if want_lp:
                raise HttpError(400, f"logprobs are not available from {model!r} (answers may "
                                     "be synthesized from several experts)", param="logprobs")
            if tools is not None:
                raise HttpError(400, f"tools are not available from {model!r}", param="tools")
            if model == MOE_MODEL and "grammar" in options:
                raise HttpError(400, "structured output (response_format, grammar) is not "
                                     "available from 'moe': synthesis may combine answers; ask "
                                     "an expert by name", param="response_format")
            op, options = "moe.query", {k: v for k, v in options.items() if k != "logprobs"}
            params = {("messages" if chat else "query"): params.get("messages",
                                                                   params.get("prompt")),
                      **moe_params}
        elif "hublab" in body:
            raise HttpError(400, "'hublab' routing options apply to model 'moe' and the "
                                 "experts only", param="hublab")
        elif model:
            params["model"] = model
        if options:
            params["options"] = options
        stream = bool(body.get("stream", False))
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())
        job = self.dispatcher.new_job(f"http-{protocol.new_id()}", op)
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        watcher = asyncio.ensure_future(_watch_disconnect(writer, self._outs[writer], job))
        try:
            if stream:
                req.close_after = req.version != "HTTP/1.1"
            if stream and tools is not None:  # the JSON is known only once it is complete
                return await self._stream_tools(writer, job, params, rid, created, want_lp,
                                                usage_in_stream, not req.close_after, model,
                                                tools)
            if stream:
                return await self._stream(writer, job, params, rid, created, chat, want_lp,
                                          usage_in_stream, not req.close_after, model)
            return await self._whole(writer, job, params, rid, created, chat, want_lp, keep,
                                     model, tools)
        finally:
            watcher.cancel()

    async def _moe_params(self, model: str, body: dict) -> dict | None:
        """moe.query's parameters when `model` is "moe" or an expert's name, else None.
        `hublab: {"routing": "topk 2", "synthesis": "vote"}` overrides [moe] for this request."""
        extra = body.get("hublab") or {}
        if not isinstance(extra, dict) or set(extra) - {"routing", "synthesis"}:
            raise HttpError(400, "'hublab' takes routing (\"topk 2\", \"threshold 0.4\", "
                                 "\"single\", \"all\") and synthesis only", param="hublab")
        for key, value in extra.items():
            if not isinstance(value, str):
                raise HttpError(400, f"hublab.{key} must be a string", param=f"hublab.{key}")
        if model == MOE_MODEL:
            return dict(extra)
        experts = await self._experts()
        if model in experts:
            if "routing" in extra:
                raise HttpError(400, f"{model!r} is one expert: no routing to choose",
                                param="hublab.routing")
            return {"experts": [experts[model]["domain"]], **extra}
        return None

    async def _experts(self) -> dict[str, dict]:
        """Available experts by model name ({} when MoE-R cannot load)."""
        try:
            rows = (await self._call("moe.experts", {}))["experts"]
        except HttpError:
            return {}
        return {r["model"]: r for r in rows if not r["missing"]}

    async def _run_whole(self, job, params) -> tuple[list[dict], dict]:
        """Run the job to its end: (token events, result data); an error event raises."""
        tokens: list[dict] = []
        final: dict = {}

        async def send(ev):
            if ev["type"] == "token":
                tokens.append(ev)
            elif ev["type"] in protocol.TERMINAL:
                final["ev"] = ev

        await self.dispatcher.track(self.dispatcher.submit(job, params, send))
        ev = final["ev"]
        if ev["type"] == "error":
            raise HttpError.from_event(ev)
        return tokens, ev["data"]

    async def _whole(self, writer, job, params, rid, created, chat, want_lp, keep,
                     asked: str | None, tools: ToolPlan | None = None) -> int:
        tokens, data = await self._run_whole(job, params)
        model = data.get("model") or asked
        lp = _logprobs(tokens, chat) if want_lp else None
        reason = _finish(data.get("finish_reason"))
        if tools is not None:
            choice = {"index": 0, **tools.answer(data["text"], reason, f"call_{job.id}"),
                      "logprobs": lp}
        elif chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": data["text"]},
                      "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": data["text"], "logprobs": lp, "finish_reason": reason}
        await self._send_json(writer, 200, {
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": _usage(data),
            **_extension(data)}, keep)
        return 200

    def _sse_head(self, writer, chunked: bool) -> bytes:
        """The head of a 200 event stream (chunked on HTTP/1.1; else it ends with the
        connection)."""
        return ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache"
                "\r\n" + self._cors.get(writer, "")
                + ("Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n" if chunked
                   else "Connection: close\r\n") + "\r\n").encode()

    async def _stream_tools(self, writer, job, params, rid, created, want_lp, usage_in_stream,
                            chunked: bool, asked: str | None, tools: ToolPlan) -> int:
        """A streamed answer under tools: generated whole (only complete JSON says whether it
        is a call), then sent as OpenAI's chunks: the role and the content or the tool call
        (arguments in one piece), the finish reason, usage when asked, [DONE]."""
        tokens, data = await self._run_whole(job, params)
        answer = tools.answer(data["text"], _finish(data.get("finish_reason")), f"call_{job.id}")
        msg = answer["message"]
        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": data.get("model") or asked}
        delta = {"role": "assistant", "content": msg["content"]}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": 0, **c} for c in msg["tool_calls"]]
        lp = _logprobs(tokens, True) if want_lp else None
        chunks = [{**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                        "finish_reason": None}]},
                  {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": answer["finish_reason"]}]}]
        if usage_in_stream:
            chunks.append({**base, "choices": [], "usage": _usage(data), **_extension(data)})
        body = b"".join(_sse(c, chunked) for c in [*chunks, b"[DONE]"])
        writer.write(self._sse_head(writer, chunked) + body + (b"0\r\n\r\n" if chunked else b""))
        await asyncio.wait_for(writer.drain(), WRITE_STALL_S)
        return 200

    async def _stream(self, writer, job, params, rid, created, chat, want_lp, usage_in_stream,
                      chunked: bool, asked: str | None) -> int:
        state = {"started": False, "role_sent": False,
                 "model": asked, "status": 200}
        obj_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict | None, **extra) -> dict:
            return {"id": rid, "object": obj_name, "created": created, "model": state["model"],
                    "choices": [choice] if choice is not None else [], **extra}

        def sse(obj) -> bytes:
            return _sse(obj, chunked)

        def head() -> bytes:
            state["started"] = True
            return self._sse_head(writer, chunked)

        def encode(ev) -> bytes:
            """The bytes one event puts on the wire (b"" for none)."""
            kind = ev["type"]
            if kind == "info":
                return b""  # progress lines ("loading ...") have no place in OpenAI's stream
            if kind == "error" and not state["started"]:
                state["error"] = ev  # nothing sent yet: a proper HTTP error status
                return b""
            out = b"" if state["started"] else head()
            if kind == "token":
                offset = state.get("offset", 0)
                state["offset"] = offset + len(ev["text"])
                lp = _logprobs([ev], chat, offset) if want_lp else None
                if chat:
                    delta = {"content": ev["text"]}
                    if not state["role_sent"]:
                        delta = {"role": "assistant", **delta}
                        state["role_sent"] = True
                    return out + sse(chunk({"index": 0, "delta": delta, "logprobs": lp,
                                            "finish_reason": None}))
                return out + sse(chunk({"index": 0, "text": ev["text"], "logprobs": lp,
                                        "finish_reason": None}))
            if kind == "result":
                data = ev["data"]
                state["model"] = data.get("model", state["model"])
                reason = _finish(data.get("finish_reason"))
                last = ({"index": 0, "delta": {} if state["role_sent"] else {"role": "assistant"},
                         "logprobs": None, "finish_reason": reason} if chat else
                        {"index": 0, "text": "", "logprobs": None, "finish_reason": reason})
                out += sse(chunk(last, **({"hublab": _extension(data)["hublab"]}
                                          if "route" in data else {})))
                if usage_in_stream:
                    out += sse(chunk(None, usage=_usage(data), **_extension(data)))
                return out + sse(b"[DONE]")
            if kind == "error":
                state["status"] = HttpError.from_event(ev).status
                return out + sse(HttpError.from_event(ev).body()) + sse(b"[DONE]")
            return out

        # The op's worker thread writes each event itself (SocketWriter): a token reaches the
        # client without waking the event loop, whose wake-ups would compete with llama.cpp's
        # threads for the cores on every token. The writer never blocks: what a slow client
        # leaves unread waits in this connection's buffer, not in the generation thread.
        out = self._outs[writer]

        def direct(ev) -> None:
            data = encode(ev)
            if data:
                out.write(data)

        async def send(ev):  # the dispatcher's own events (a queue-full error, ...)
            direct(ev)

        try:
            await self.dispatcher.track(self.dispatcher.submit(job, params, send, direct=direct))
            await out.drain()  # before the transport writes again (the last chunk, a status)
        except ClientGone:
            state["gone"] = True
        if "error" in state:
            raise HttpError.from_event(state["error"])
        if state.get("gone"):
            raise ConnectionResetError("the client went away during the stream")
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return state["status"]  # HTTP/1.0: the stream ends when the connection closes



def _sse(obj, chunked: bool) -> bytes:
    """One server-sent event (`data: <json or bytes>`), framed as a chunk on a chunked stream."""
    payload = b"data: " + (obj if isinstance(obj, bytes) else
                           json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload) if chunked else payload


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close gracefully: send FIN, then read and drop what the client still sends (a body the
    server refused to read) for a moment. Closing with unread input makes the kernel send a
    reset, and the client can lose the response written just before (nginx: lingering_close)."""
    if reader.at_eof() or writer.transport.is_closing():
        return
    await asyncio.wait_for(writer.drain(), LINGER_S)
    writer.write_eof()
    async def drop():
        for _ in range(64):
            if not await reader.read(65536):
                return
    await asyncio.wait_for(drop(), LINGER_S)


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(400, f"{what} line longer than {MAX_HEADER_BYTES} bytes") from None


async def _watch_disconnect(writer, out: SocketWriter, job, every: float = 0.1) -> None:
    """Cancel the job when the client has hung up. An EOF alone is not that: a client may
    shut down its sending side after the request (half-close) and still read the answer; a
    client that closed its socket is noticed once a write to it fails (a stream: the next
    token; a whole answer: when it is written)."""
    while True:
        if writer.transport.is_closing() or out.hung_up():
            job.request_cancel()
            return
        await asyncio.sleep(every)


# Fields of OpenAI's API this server does not implement: a 400 naming them, never silence.
# (tools and tool_choice: chat only, hublabio.daemon.http_tools; the sampling fields it does
# implement: hublabio.params.INFERENCE's `openai` names)
_SCHEMA = by_name(INFERENCE)
_UNSUPPORTED = ("functions", "function_call", "suffix", "audio", "modalities", "prediction",
                "web_search_options")


# Every body field each endpoint reads. `user` (the caller's own end-user id) changes nothing in
# an answer; `parallel_tool_calls` permits several calls per turn and one is always within it.
# Any other field is a 400, as OpenAI answers "Unrecognized request argument supplied".
_GENERATE_FIELDS = {"model", "stream", "stream_options", "n", "logprobs", "response_format",
                    "hublab", "user", *(f for p in INFERENCE for f in p.openai), *_UNSUPPORTED}
_FIELDS = {
    "chat": _GENERATE_FIELDS | {"messages", "top_logprobs", "tools", "tool_choice",
                                "parallel_tool_calls"},
    "completions": _GENERATE_FIELDS | {"prompt", "echo"},
    "embeddings": {"model", "input", "encoding_format", "dimensions", "user"},
}


def _check_fields(body: dict, endpoint: str) -> None:
    unknown = sorted(set(body) - _FIELDS[endpoint])
    if unknown:
        raise HttpError(400, f"Unrecognized request argument supplied: {unknown[0]} (this "
                             f"server implements: {', '.join(sorted(_FIELDS[endpoint]))})",
                        param=unknown[0])


def _options(body: dict) -> dict:
    for key in _UNSUPPORTED:
        if body.get(key) is not None:
            raise HttpError(400, f"'{key}' is not supported by this server", param=key)
    raw, came_from = openai_options(body)
    if body.get("response_format") is not None:
        if "grammar" in raw:
            raise HttpError(400, "give either 'response_format' or 'grammar', not both",
                            param="response_format")
        grammar = _response_grammar(body["response_format"])
        if grammar is not None:
            raw["grammar"] = grammar
            came_from["grammar"] = "response_format"
    out = {}
    for key, value in raw.items():
        try:
            out[key] = check_param(_SCHEMA[key], value)
        except ParamError as exc:
            raise HttpError(400, f"'{came_from[key]}' {exc}", param=came_from[key]) from None
    return out


def _response_grammar(fmt) -> str | None:
    """OpenAI's response_format as a grammar: json_object = any JSON object, json_schema = JSON
    the schema accepts (hublabio.grammar; an unsupported keyword is a 400 naming it)."""
    from hublabio.grammar import SchemaError, json_grammar

    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise HttpError(400, "response_format.json_schema.schema must be a JSON Schema "
                                 "object", param="response_format.json_schema.schema")
        try:
            return json_grammar(spec["schema"])
        except SchemaError as exc:
            raise HttpError(400, f"response_format.json_schema.{exc}",
                            param="response_format.json_schema.schema") from None
    raise HttpError(400, "response_format.type must be text, json_object or json_schema, got "
                         f"{kind!r}", param="response_format.type")


def _chat_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HttpError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise HttpError(400, f"messages[{i}].role must be system, user, assistant or tool, "
                                 f"got {role!r}", param=f"messages[{i}].role")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) for p in content) or \
                    any(p.get("type") != "text" for p in content):
                raise HttpError(400, f"messages[{i}].content: only text parts are supported",
                                param=f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise HttpError(400, f"messages[{i}].content must be a string",
                            param=f"messages[{i}].content")
        entry = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise HttpError(400, f"messages[{i}].tool_call_id must be a string (the id of "
                                     "the call this answers)", param=f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("tool_calls") is not None:
            entry["tool_calls"] = _tool_calls(m["tool_calls"], i)
        out.append(entry)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant turn's tool_calls, checked: [{id, type: function, function: {name,
    arguments (a JSON string)}}]."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise HttpError(400, f"{where} must be a non-empty array", param=where)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments"), str):
            raise HttpError(400, f"{where}[{j}] must be {{id, type: function, function: {{name, "
                                 "arguments}}}} with arguments a JSON string",
                            param=f"{where}[{j}]")
    return calls


def _model_obj(m: dict) -> dict:
    return {"id": m["name"], "object": "model", "created": 0, "owned_by": "hublab",
            "loaded": m.get("loaded", False), "quantization": m.get("quantization"),
            "parameters": m.get("parameters")}


def _lp_entries(ev: dict) -> list[dict]:
    """OpenAI chat logprobs entries, one per token of a token event."""
    return [{"token": t["text"], "logprob": t["logprob"], "bytes": t["bytes"],
             "top_logprobs": [{"token": a["text"], "logprob": a["logprob"],
                               "bytes": list(a["text"].encode("utf-8"))} for a in t["top"]]}
            for t in ev.get("tokens") or []]


def _logprobs(events: list[dict], chat: bool, offset: int = 0) -> dict:
    """The `logprobs` object of a choice: chat's {"content": [...]}, or the completions API's
    {"tokens", "token_logprobs", "top_logprobs", "text_offset"}."""
    entries = [e for ev in events for e in _lp_entries(ev)]
    if chat:
        return {"content": entries}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


def _extension(data: dict) -> dict:
    """What rides beside OpenAI's fields: llama-server's `timings` for one model; for MoE-R,
    `hublab` with the routing (experts chosen, their probabilities) and which answer won."""
    if "route" not in data:
        return {"timings": _timings(data)}
    route = data["route"]
    return {"hublab": {
        "routing": route["strategy"], "router": route["router"], "fallback": route["fallback"],
        "selected": route["selected"], "synthesis": data["synthesis"], "chosen": data["chosen"],
        "detail": data["detail"],
        "experts": [{"domain": a["domain"], "model": a["model"], "confidence": a["confidence"],
                     "tokens": a["tokens"]} for a in data["experts"]]}}


def _usage(data: dict) -> dict:
    data = data.get("usage") or data  # moe.query sums its experts' tokens in "usage"
    p, c = data.get("prompt_tokens", 0), data.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _timings(data: dict) -> dict:
    """llama-server's `timings` extension: what the engine measured for this answer."""
    n = data.get("completion_tokens", 0) or 0
    tps = data.get("gen_tps") or 0.0
    return {"prompt_n": (data.get("prompt_tokens") or 0) - (data.get("cached_tokens") or 0),
            "cache_n": data.get("cached_tokens") or 0,
            "prompt_per_second": data.get("prompt_tps") or 0.0,
            "predicted_n": n, "predicted_per_second": tps,
            "ttft_ms": (data.get("ttft_s") or 0.0) * 1e3}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


_ROUTES = {
    "/health": ("GET", HttpApi._health),
    "/metrics": ("GET", HttpApi._metrics),
    "/v1/models": ("GET", HttpApi._models),
    "/v1/chat/completions": ("POST", HttpApi._chat),
    "/v1/completions": ("POST", HttpApi._completions),
    "/v1/embeddings": ("POST", HttpApi._embeddings),
}
