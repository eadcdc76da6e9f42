"""The parameter schema: every setting a user, a file or a client can give, declared once.

Three families, each a tuple of `Param` (name, type, range or choices, default, where it may be
set, OpenAI alias, help):

- `INFERENCE`: sampling and loading. A model TOML's [inference] (where "model"), `ai config`
  (where "user"), a request's `options` on the socket and the OpenAI fields over HTTP
  (where "request", `openai` names the body field).
- `MOE`: the user settings' [moe] (`settings moe`) and a request's routing overrides.
- `DAEMON`: etc/hublab.toml's [daemon], [memory] and [http] (`section`) and hublabd's flags
  (`cli`).

Everything else is derived from these tables, never listed again:
`schema_dataclass` makes the fields of config.InferenceConfig, engine.SamplingOptions,
moe.MoESettings and config.DaemonSettings; `check` is the one validator (TOML files, `ai
config` text, socket options, HTTP bodies and flags all call it and wrap its `ParamError` in
their own error: ConfigError naming file and key, ProtocolError, HTTP 400 with `param`,
argparse's usage error); `openai_options` maps an HTTP body; `add_flags` builds hublabd's
flags; remote experts forward `openai` names. docs/ARCHITECTURE.md shows the tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


class ParamError(ValueError):
    """A value a parameter does not accept; the message says what it must be (no key name:
    each surface names the key its own way)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # int float bool str name (non-empty) strlist choice repack stop bias grammar
               # path origins listen reserve
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (text, choice) accepted for a choice
    where: frozenset = frozenset()             # model, user, request
    openai: tuple[str, ...] = ()               # HTTP body fields that set it (OpenAI's first)
    section: str = ""                          # DAEMON, MOE: the TOML table
    toml_key: str = ""                         # DAEMON: the key there when not `name`
    cli: str = ""                              # DAEMON: hublabd's flag
    annotation: str = ""                       # the dataclass field's type

    @property
    def key(self) -> str:
        return self.toml_key or self.name


def param(name, type, default, help, *, where=(), annotation=None, **kw) -> Param:
    ann = annotation or {"int": "int", "float": "float", "bool": "bool", "str": "str",
                         "choice": "str", "repack": "str | bool"}.get(type, "Any")
    return Param(name, type, default, help, where=frozenset(where), annotation=ann, **kw)


MODEL, USER, REQUEST = "model", "user", "request"
_CONF = (MODEL, USER, REQUEST)
MAX_GRAMMAR_CHARS = 256 * 1024

INFERENCE: tuple[Param, ...] = (
    param("max_tokens", "int", 256, "most tokens in one answer", lo=1, hi=131072, where=_CONF,
       openai=("max_tokens", "max_completion_tokens")),
    param("temperature", "float", 0.7, "0 = greedy", lo=0.0, hi=2.0, where=_CONF,
       openai=("temperature",)),
    param("top_p", "float", 0.9, "nucleus sampling", lo=0.0, hi=1.0, lo_open=True, where=_CONF,
       openai=("top_p",)),
    param("top_k", "int", 40, "0 = off", lo=0, where=_CONF, openai=("top_k",)),
    param("repeat_penalty", "float", 1.1, "1 = off", lo=0.0, hi=2.0, lo_open=True, where=_CONF,
       openai=("repeat_penalty",)),
    param("frequency_penalty", "float", 0.0, "OpenAI's", lo=-2.0, hi=2.0, where=(REQUEST,),
       openai=("frequency_penalty",)),
    param("presence_penalty", "float", 0.0, "OpenAI's", lo=-2.0, hi=2.0, where=(REQUEST,),
       openai=("presence_penalty",)),
    param("seed", "int", None, "sampling seed", where=(REQUEST,), openai=("seed",),
       annotation="int | None"),
    param("stop", "stop", (), "strings that end the answer", where=(REQUEST,), openai=("stop",),
       annotation="tuple[str, ...]"),
    param("logit_bias", "bias", {}, "{token id: bias in [-100, 100]}", where=(REQUEST,),
       openai=("logit_bias",), annotation="dict[int, float]"),
    param("top_logprobs", "int", 0, "alternatives per token to report", lo=0, hi=20,
       where=(REQUEST,)),  # HTTP: from logprobs/top_logprobs (hublabio.daemon.http)
    param("grammar", "grammar", None, "GBNF (rule root) the answer must be a sentence of",
       where=(REQUEST,), openai=("grammar",), annotation="str | None"),
    param("context_size", "int", 2048, "tokens of context", lo=64, hi=131072, where=(MODEL, USER)),
    param("threads", "int", 0, "generation threads; 0 = the daemon's / the board's default",
       lo=0, hi=256, where=(MODEL, USER)),
    param("threads_batch", "int", 0, "prompt-processing threads; 0 = the daemon's / the board's",
       lo=0, hi=256, where=(MODEL, USER)),
    param("parallel", "int", 0, "generations a model serves at once, batched (0 = the board's "
          "default: 1 under 1 GB of RAM, 2 under 4 GB, else 4); each slot has its own KV cache",
          lo=0, hi=16, where=(MODEL, USER)),
    param("adapter_contexts", "int", 0, "LoRA adapter sets a model keeps applied at once: each "
          "beyond the first gets a llama.cpp context of one slot (its own KV cache, counted by "
          "the memory budget) once experts use that many (0 = the board's default: 1 under 4 GB "
          "of RAM, else 2)", lo=0, hi=8, where=(MODEL, USER)),
    param("batch_mode", "choice", "continuous", "continuous: parallel generations share each "
          "decode; off: one generation at a time per model", choices=("continuous", "off"),
          where=(MODEL, USER)),
    param("repack", "repack", "auto", "weight repacking (hublabio.llama.cpu)", where=(MODEL,)),
    param("mmap", "bool", None, "None = the daemon's [memory] mmap", where=(MODEL,),
       annotation="bool | None"),
    param("mlock", "bool", None, "None = the daemon's [memory] mlock", where=(MODEL,),
       annotation="bool | None"),
    param("system_prompt", "str", None, "prepended when a chat has none", where=(MODEL,),
       annotation="str | None"),
)

ROUTINGS = ("topk", "threshold", "single", "all")
SYNTHESES = ("best", "weighted", "voting", "concatenate", "summarize")  # hublabio.synth
MOE: tuple[Param, ...] = (
    param("enabled", "bool", True, "?question goes to the experts (off: the plain model)",
          section="moe"),
    param("routing", "choice", "topk", "how many experts answer", choices=ROUTINGS,
       aliases=(("top_k", "topk"), ("top-k", "topk")), section="moe"),
    param("k", "int", 2, "experts for routing topk", lo=1, section="moe"),
    param("threshold", "float", 0.5, "lowest router probability for routing threshold",
       lo=0.0, hi=1.0, section="moe"),
    param("synthesis", "choice", "best", "how the answers are combined", choices=SYNTHESES,
          section="moe"),
    param("confidence_weight", "float", 0.5, "weight of an answer's mean token log-probability "
          "against the router's log-probability when answers are combined (0: the router alone;"
          " fitted by bench/calibrate_synthesis.py)", lo=0.0, hi=1.0, section="moe"),
)

DAEMON: tuple[Param, ...] = (
    param("socket", "path", None, "Unix socket path (default: $HUBLAB_SOCKET or <state dir>/"
       "hublabd.sock)", section="daemon", cli="--socket", annotation="Path | None"),
    param("models_dir", "path", None, "folder with model-config.toml and *.gguf",
       section="daemon", cli="--models-dir", annotation="Path | None"),
    param("queue_size", "int", 8, "requests that may wait behind the running one before new ones "
       "get a busy error", lo=1, hi=1024, section="daemon", cli="--queue-size"),
    param("idle_ttl_s", "float", 600.0, "unload a model idle this long (0 = never)", lo=0.0,
       section="daemon"),
    param("threads", "int", 0, "llama.cpp threads for generation (0 = the board's default)",
       lo=0, hi=256, section="daemon", cli="--threads"),
    param("threads_batch", "int", 0, "llama.cpp threads for prompt processing (0 = the board's "
       "default)", lo=0, hi=256, section="daemon", cli="--threads-batch"),
    param("repack", "repack", "auto", "weight repacking for faster kernels: auto = every repack "
       "except Intel AMX (llama.cpp #20824), on = AMX too, off = none", section="daemon",
       cli="--repack"),
    param("model_paths", "choice", "models_dir", "clients may name a GGUF by path: inside the "
       "models dir only, off, or any (the shell's own daemon)",
       choices=("models_dir", "off", "any"), section="daemon"),
    param("budget_mb", "int", 0, "MiB all loaded models may use (0 = board RAM minus the OS "
       "reserve)", lo=0, section="memory", cli="--budget-mb"),
    param("os_reserve_mb", "reserve", None, "MiB kept for the OS (\"auto\" = the board profile)",
       section="memory", annotation="int | None"),
    param("mmap", "bool", True, "map model files instead of reading them", section="memory"),
    param("mlock", "bool", False, "lock models in RAM", section="memory"),
    param("http", "listen", None, "also serve the OpenAI-compatible API, e.g. 127.0.0.1:8080 "
       "(give another host explicitly to listen beyond loopback)", section="http",
       toml_key="listen", cli="--http", annotation="str | None"),
    param("cors_origins", "origins", (), "let browser pages from ORIGIN (e.g. "
       "http://localhost:3000, or *) call the HTTP API; repeat for more (default: none)",
       section="http", cli="--cors-origin", annotation="tuple[str, ...]"),
)


def by_name(family: Iterable[Param]) -> dict[str, Param]:
    return {p.name: p for p in family}


def names(family: Iterable[Param], where: str) -> tuple[str, ...]:
    return tuple(p.name for p in family if where in p.where)


# ---------------------------------------------------------------------------- checking

_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "name": "a string", "path": "a string",
               "repack": "\"auto\", true or false", "strlist": "a list of strings"}
_TRUE = {"on", "true", "yes", "1", "enable", "enabled"}
_FALSE = {"off", "false", "no", "0", "disable", "disabled"}


def check(p: Param, value: Any, *, text: bool = False) -> Any:
    """`value` typed and range-checked for `p`, or ParamError saying what it must be.
    text=True: `value` may be a string from a command line ("0.5", "on", "auto") and is
    converted first."""
    if text and isinstance(value, str):
        value = _from_text(p, value.strip())
    kind = p.type
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not math.isfinite(value)) or \
                (kind == "int" and not float(value).is_integer()):
            raise ParamError(f"expected {_KIND_NAMES[kind]}, got {value!r}")
        value = int(value) if kind == "int" else float(value)
        _check_range(p, value)
        return value
    if kind in ("bool", "str", "name", "path"):
        want = bool if kind == "bool" else str
        if not isinstance(value, want):
            raise ParamError(f"expected {_KIND_NAMES[kind]}, got {value!r}")
        if kind == "name" and not value.strip():
            raise ParamError("must not be empty")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ParamError(f"expected {_KIND_NAMES[kind]}, got {value!r}")
        return list(value)
    if kind == "repack":
        if value is True or value is False or value == "auto":
            return value
        raise ParamError(f"expected {_KIND_NAMES[kind]}, got {value!r}")
    return _SPECIAL[kind](p, value)


def _from_text(p: Param, s: str) -> Any:
    if p.type in ("int", "float"):
        try:
            return int(s) if p.type == "int" else float(s)
        except ValueError:
            raise ParamError(f"expected {_KIND_NAMES[p.type]}, got {s!r}") from None
    if p.type in ("bool", "repack"):
        low = s.lower()
        if p.type == "repack" and low == "auto":
            return "auto"
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ParamError(f"expected on or off{' or auto' if p.type == 'repack' else ''}, "
                         f"got {s!r}")
    if p.type == "choice":
        return s.lower()
    return s


def _check_range(p: Param, v: float) -> None:
    lo_ok = p.lo is None or (v > p.lo if p.lo_open else v >= p.lo)
    hi_ok = p.hi is None or v <= p.hi
    if lo_ok and hi_ok:
        return
    if p.hi is None:
        raise ParamError(f"must be >= {p.lo}, got {v}")
    raise ParamError(f"must be in {'(' if p.lo_open else '['}{p.lo}, {p.hi}], got {v}")


def _choice(p: Param, v):
    v = dict(p.aliases).get(v, v)
    if v not in p.choices:
        raise ParamError(f"must be one of {', '.join(map(repr, p.choices))}, got {v!r}")
    return v


def _stop(p: Param, v) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise ParamError("must be a string or a list of non-empty strings")
    return tuple(v)


def _bias(p: Param, v) -> dict[int, float]:
    if not isinstance(v, dict):
        raise ParamError("must be an object {token id: bias}")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise ParamError(f"has key {k!r}, which is not a token id") from None
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ParamError(f"[{k!r}] must be a number in [-100, 100], got {b!r}")
        out[tok] = float(b)
    return out


def _grammar(p: Param, v) -> str:
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_GRAMMAR_CHARS:
        raise ParamError(f"must be a GBNF grammar (rule root) of at most {MAX_GRAMMAR_CHARS} "
                         "characters")
    return v


def check_origin(v) -> str | None:
    """None when `v` is "*" or a browser origin (scheme://host[:port], nothing after)."""
    if v == "*" or (isinstance(v, str) and re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+", v)):
        return None
    return f"expected \"*\" or an origin like \"http://localhost:3000\", got {v!r}"


def _origins(p: Param, v) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ParamError(f"expected a list of origins, got {v!r}")
    problem = next((m for m in map(check_origin, v) if m), None)
    if problem:
        raise ParamError(problem)
    return tuple(v)


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT', or ':PORT' for loopback) → (host, port). Port 0 = any."""
    import ipaddress

    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ParamError(f"expected HOST:PORT such as 127.0.0.1:8080, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise ParamError(f"{host!r} is not an IP address or host name") from None
    return host, int(port)


def _listen(p: Param, v) -> str | None:
    if not isinstance(v, str):
        raise ParamError(f"expected a string, got {v!r}")
    if v == "":
        return None  # no HTTP API
    parse_listen(v)
    return v


def _reserve(p: Param, v) -> int | None:
    if v == "auto":
        return None
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamError(f"expected an integer (MiB) or \"auto\", got {v!r}")
    if v < 0:
        raise ParamError(f"must be >= 0 or \"auto\", got {v}")
    return v


_SPECIAL: dict[str, Callable[[Param, Any], Any]] = {
    "choice": _choice, "stop": _stop, "bias": _bias, "grammar": _grammar,
    "origins": _origins, "listen": _listen, "reserve": _reserve}


# ---------------------------------------------------------------------------- derived

def schema_dataclass(family: Iterable[Param], *, where: str | None = None, frozen: bool = False):
    """Class decorator: the schema's parameters (those settable `where`, or all) become the
    class's first dataclass fields, with their defaults; the class's own annotated fields and
    methods follow."""
    params = [p for p in family if where is None or where in p.where]

    def wrap(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {**{p.name: p.annotation for p in params}, **own}
        for p in params:
            if p.name in own:
                raise TypeError(f"{cls.__name__}.{p.name} is declared in the schema already")
            default = p.default
            if isinstance(default, (dict, list)):
                setattr(cls, p.name, field(default_factory=lambda d=default: type(d)(d)))
            else:
                setattr(cls, p.name, default)
        return dataclass(frozen=frozen)(cls)

    return wrap


def defaults(family: Iterable[Param]) -> dict[str, Any]:
    return {p.name: p.default for p in family}


def openai_options(body: dict) -> tuple[dict, dict[str, str]]:
    """The request options an OpenAI-style body sets ({option: value}, unchecked) and the body
    field each came from ({option: field}, for errors naming what the client sent)."""
    out, came_from = {}, {}
    for p in INFERENCE:
        for name in p.openai:
            if body.get(name) is not None:
                out[p.name], came_from[p.name] = body[name], name
    return out, came_from


def forwarded(family: Iterable[Param] = INFERENCE) -> dict[str, str]:
    """{option: OpenAI field} for the request options another OpenAI server is sent."""
    return {p.name: p.openai[0] for p in family if p.openai}


def add_flags(parser, family: Iterable[Param] = DAEMON) -> None:
    """One argparse flag per parameter with `cli`, its text checked by `check` (a bad value is
    argparse's usage error naming the flag); repeated flags (origins) accumulate."""
    import argparse
    from pathlib import Path

    for p in family:
        if not p.cli:
            continue

        def parse(text, p=p):
            if p.type == "path":
                return Path(text)
            try:
                return check(p, text, text=True) if p.type != "origins" else _origins(p, text)[0]
            except ParamError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        kw: dict[str, Any] = {"type": parse, "help": p.help, "dest": p.name}
        if p.type == "origins":
            kw.update(action="append", metavar="ORIGIN")
        elif p.type == "repack":
            kw.update(metavar="{auto,on,off}")
        elif p.type == "listen":
            kw.update(metavar="HOST:PORT")
        parser.add_argument(p.cli, **kw)


def flag_values(args, family: Iterable[Param] = DAEMON) -> dict[str, Any]:
    """The parameters the command line set (flags not given are absent)."""
    out = {}
    for p in family:
        if p.cli and getattr(args, p.name, None) is not None:
            value = getattr(args, p.name)
            out[p.name] = tuple(value) if p.type == "origins" else value
    return out


def table_rows(family: Iterable[Param]) -> list[str]:
    """Markdown rows (name, type, range/choices, default, where/section, OpenAI or flag) for
    docs; tests compare docs/ARCHITECTURE.md against them."""
    rows = []
    for p in family:
        if p.choices:
            rng = " ".join(p.choices)
        elif p.lo is not None:
            hi = f"{p.hi}]" if p.hi is not None else "∞)"
            rng = f"{'(' if p.lo_open else '['}{p.lo}, {hi}"
        else:
            rng = ""
        where = p.section and f"[{p.section}] {p.key}" or ", ".join(sorted(p.where))
        also = ", ".join(p.openai) or p.cli
        rows.append(f"| {p.name} | {p.type} | {rng} | {p.default!r} | {where} | {also} |")
    return rows


def markdown(family: Iterable[Param]) -> str:
    """The family as the table docs/ARCHITECTURE.md shows (python -m hublabio.params)."""
    return "\n".join(["| name | type | range / choices | default | set in | OpenAI field / flag |",
                      "| --- | --- | --- | --- | --- | --- |", *table_rows(family)])


__all__ = ["Param", "ParamError", "INFERENCE", "MOE", "DAEMON", "param", "check",
           "schema_dataclass", "openai_options", "forwarded", "add_flags", "flag_values",
           "names", "by_name", "defaults", "check_origin"]


if __name__ == "__main__":
    for _name in ("INFERENCE", "MOE", "DAEMON"):
        print(f"{_name}\n\n{markdown(globals()[_name])}\n")
