"""The daemon's op registry.

An op is a function `fn(service, req, **params)`, called in a worker thread (llama.cpp calls
block), where `req.id` is the request id and `req.cancel` a threading.Event set when the client
cancels or disconnects. A plain function returns the result dict; a generator yields events
(`protocol.token(text, logprob)`, `protocol.info(text)`) and returns the result dict. Raising a
HublabError sends an error event with its code. `queued=True` ops (generation, loading,
benchmarks) go through the daemon's bounded queue and run one at a time; the others are
answered at once.

An op module declares its ops on an `OpTable` (`ops = OpTable()`, then `@ops.op("name")`) and
registers them when the daemon starts (`ops.register(registry)`, called by the Service for each
module of `service.OP_MODULES`); nothing is registered by importing a module. A name registered
twice is an error naming both functions. Each parameter is checked against the function's
annotation (str, int, float, bool, dict, list, None and unions), and every string in a request
must be valid UTF-8, so a wrong type is a `protocol` error naming the parameter.
"""

from __future__ import annotations

import inspect
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Callable

from hublabio.errors import ProtocolError


@dataclass
class Req:
    id: str
    op: str
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable
    queued: bool
    params: frozenset[str] | None  # None: the function takes **kwargs
    required: frozenset[str]
    streaming: bool
    types: dict = field(default_factory=dict)  # parameter -> accepted runtime types

    @classmethod
    def of(cls, name: str, fn: Callable, queued: bool) -> "OpSpec":
        ps = list(inspect.signature(fn).parameters.values())[2:]  # after (service, req)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in ps)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = frozenset(p.name for p in ps if p.kind in kinds)
        required = frozenset(p.name for p in ps if p.default is p.empty and p.kind in kinds)
        return cls(name, fn, queued, None if takes_any else names, required,
                   inspect.isgeneratorfunction(fn),
                   {k: v for k, v in _param_types(fn).items() if k in names})


class DuplicateOp(ValueError):
    """Two functions registered under one op name."""


class Registry:
    """The ops one daemon serves, by name."""

    def __init__(self):
        self._specs: dict[str, OpSpec] = {}

    def add(self, name: str, fn: Callable, *, queued: bool = False) -> OpSpec:
        if name in self._specs:
            old = self._specs[name].fn
            raise DuplicateOp(f"op {name!r} is registered twice: by {_where(old)} and by "
                              f"{_where(fn)}")
        spec = self._specs[name] = OpSpec.of(name, fn, queued)
        return spec

    def spec(self, name: str) -> OpSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise ProtocolError(f"unknown op {name!r}; known ops: {', '.join(sorted(self))}")
        return spec

    def check_params(self, spec: OpSpec, params: dict) -> None:
        if spec.params is not None:
            unknown = sorted(set(params) - spec.params)
            if unknown:
                known = ", ".join(sorted(spec.params)) or "none"
                raise ProtocolError(f"op {spec.name!r}: unknown parameter {unknown[0]!r} "
                                    f"(parameters: {known})")
        missing = sorted(spec.required - set(params))
        if missing:
            raise ProtocolError(f"op {spec.name!r}: missing parameter {missing[0]!r}")
        for key, value in params.items():
            if key in spec.types:
                _check_type(spec.name, key, value, spec.types[key])
            _check_text(spec.name, key, value)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs)


class OpTable:
    """One module's ops, declared with `@table.op(name, queued=)` and registered later."""

    def __init__(self):
        self._entries: list[tuple[str, Callable, bool]] = []

    def op(self, name: str, *, queued: bool = False):
        def declare(fn):
            self._entries.append((name, fn, queued))
            return fn

        return declare

    def register(self, registry: Registry) -> None:
        for name, fn, queued in self._entries:
            registry.add(name, fn, queued=queued)


def _where(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


_RUNTIME = {str: (str,), int: (int,), float: (int, float), bool: (bool,), dict: (dict,),
            list: (list,), type(None): (type(None),)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object", list: "a list", type(None): "null"}


def _param_types(fn) -> dict[str, tuple[type, ...]]:
    """Each annotated parameter's accepted JSON types (str, int, float, bool, dict, list, None
    and unions of them); Any or an unannotated parameter accepts anything."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: no check
        return {}
    out = {}
    for name, hint in hints.items():
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                       types.UnionType) else (hint,)
        members = tuple(typing.get_origin(m) or m for m in members)
        if all(m in _RUNTIME for m in members):
            out[name] = tuple(t for m in members for t in _RUNTIME[m])
    return out


def _check_type(op_name: str, key: str, value, allowed: tuple[type, ...]) -> None:
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        want = " or ".join(_TYPE_NAMES[t] for t in dict.fromkeys(
            t for t in allowed if not (t is int and float in allowed)))
        raise ProtocolError(f"op {op_name!r}: parameter {key!r} must be {want}, got "
                            f"{type(value).__name__}")


def _check_text(op_name: str, where: str, value, depth: int = 0) -> None:
    """Refuse strings that cannot be UTF-8 (lone surrogates such as \\ud800), anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(f"op {op_name!r}: {where} contains a lone surrogate "
                                f"({value[exc.start]!r} at character {exc.start})") from None
    elif isinstance(value, dict) and depth < 64:
        for k, v in value.items():
            _check_text(op_name, f"{where}.{k}", v, depth + 1)
    elif isinstance(value, list) and depth < 64:
        for i, v in enumerate(value):
            _check_text(op_name, f"{where}[{i}]", v, depth + 1)
