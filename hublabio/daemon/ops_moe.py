"""MoE-R ops for hublabd (declared on `ops`, registered by the Service at start).

- `moe.route {query}`            -> {query, scores, selected, strategy, router, fallback}
- `moe.query {query | messages, options?, routing?, synthesis?, experts?}`
                                 -> streams `[Router]`/`[Expert]`/`[Synthesizer]` info lines and
                                    the answer's tokens; result {text, synthesis, chosen, route,
                                    experts, usage, ...}. `messages` (a conversation) routes its
                                    last user turn and gives the earlier turns to the experts;
                                    `routing` ("topk 2", ...) and `synthesis` override the
                                    [moe] settings for this request; `experts` (domains) skips
                                    the router (the HTTP API's expert models use it).
- `moe.experts`                  -> per expert: domain, model, loaded, memory_mb, adapter, ...
- `settings.moe.get`             -> the [moe] settings, router kind, active experts
- `settings.moe.set {key, value}`-> validates and persists one setting (crash-safe);
                                    `routing` takes "topk 2" / "threshold 0.4" / "single" / "all"
- `ask {question}`               -> through MoE-R when it is enabled and experts exist (and no
                                    `model` is named), else the plain model as before.

The MoE object (experts + router) is rebuilt when a file in <models>/experts or <models>/router
changes; settings are read from the user settings file on every request.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import weakref
from pathlib import Path

from hublabio import protocol
from hublabio.config import read_settings
from hublabio.daemon.registry import OpTable, Req
from hublabio.daemon.service import Service, _check_options, _mb, files_signature
from hublabio.errors import HublabError, ProtocolError
from hublabio.moe import MoE, MoESettings, set_moe_setting

log = logging.getLogger("hublabd")

ops = OpTable()  # registered by the Service at start (hublabio.daemon.registry)

_cache: "weakref.WeakKeyDictionary[Service, tuple[tuple, MoE, list[str]]]" = \
    weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _signature(models_dir: Path) -> tuple:
    """What the experts are read from: experts/ and router/ (router/final/: the seed's tokenizer
    and domains.json), and the top-level model TOMLs (model-config.toml's [expert] and
    [inference] make the default model an expert and set the bare experts' inference)."""
    return (files_signature(models_dir, "*.toml"), files_signature(models_dir / "experts"),
            files_signature(models_dir / "router"), files_signature(models_dir / "router" / "final"))


def moe_for(svc: Service) -> tuple[MoE, list[str]]:
    """The service's MoE with the current settings (and warnings from loading it)."""
    settings = read_settings()
    moe_settings = MoESettings.from_dict(settings.get("moe"))
    sig = _signature(svc.models_dir)
    with _cache_lock:
        hit = _cache.get(svc)
        if hit is None or hit[0] != sig:
            moe, warnings = MoE.from_models_dir(svc.pool, svc.models_dir, moe_settings)
            for w in warnings:
                log.warning("moe: %s", w)
            hit = (sig, moe, warnings)
            _cache[svc] = hit
    _, shared, warnings = hit
    moe = copy.copy(shared)  # per-request settings on a shallow copy: no races between ops
    moe.settings = moe_settings
    moe.inference_overrides = dict(settings.get("inference") or {})
    return moe, warnings


def _query_text(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ProtocolError("moe needs a non-empty 'query' string")
    return query.strip()


@ops.op("moe.route")
def _moe_route(svc: Service, req: Req, query: str) -> dict:
    moe, _ = moe_for(svc)
    out = moe.route(_query_text(query)).as_dict()
    out["router_warning"] = moe.router_warning
    return out


def _run_moe(svc: Service, req: Req, moe: MoE, query: str, options, *, route=None,
             history=()):
    result = yield from moe.query(query, cancel=req.cancel, options=_check_options(options),
                                  route=route, history=history)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for name, stats in result.pop("generations", []):
        svc.record_generation(name, stats)
        usage["prompt_tokens"] += stats.prompt_tokens
        usage["completion_tokens"] += stats.completion_tokens
    result["usage"] = usage
    return result


def _conversation(messages) -> tuple[str, list[dict]]:
    """(the last user turn, the turns before it) of a role/content conversation."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("moe.query: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ProtocolError(f"moe.query: messages[{i}] must have a role (system, user or "
                                "assistant) and a string content")
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None or last != len(messages) - 1:
        raise ProtocolError("moe.query: the conversation must end with a user message")
    return _query_text(messages[last]["content"]), messages[:last]


@ops.op("moe.query", queued=True)
def _moe_query(svc: Service, req: Req, query: str | None = None, options: dict | None = None,
               messages: list | None = None, routing: str | None = None,
               synthesis: str | None = None, experts: list | None = None):
    if (query is None) == (messages is None):
        raise ProtocolError("moe.query needs either 'query' or 'messages'")
    text, history = _conversation(messages) if messages is not None else (_query_text(query), [])
    moe, _ = moe_for(svc)
    if routing is not None or synthesis is not None:
        moe.settings = moe.settings.with_overrides(routing, synthesis)
    route = None
    if experts is not None:
        if not all(isinstance(d, str) for d in experts):
            raise ProtocolError("moe.query: 'experts' must be a list of expert domains")
        route = moe.route_to(text, experts)
    return (yield from _run_moe(svc, req, moe, text, options, route=route, history=history))


@ops.op("moe.experts")
def _moe_experts(svc: Service, req: Req) -> dict:
    moe, warnings = moe_for(svc)
    return {"experts": moe.experts_status(), "router": moe.router_kind,
            "router_warning": moe.router_warning, "warnings": warnings,
            "settings": dataclasses.asdict(moe.settings),
            "used_mb": round(svc.pool.used_mb(), 1), "budget_mb": svc.pool.budget_mb}


def _expert_size(cfg) -> dict:
    """What an expert adds on disk (and in memory): its adapter over a shared base, else its
    own GGUF; a remote expert takes none here."""
    if cfg.type == "remote":
        return {"model": cfg.name, "kind": "remote", "mb": None}
    path, kind = (cfg.adapter, "adapter") if cfg.adapter else (cfg.path, "model")
    try:
        mb = _mb(path.stat().st_size)
    except (OSError, AttributeError):
        mb = None
    return {"model": cfg.name, "kind": kind, "mb": mb}


def _settings_view(moe: MoE, warnings: list[str]) -> dict:
    available = moe.available()
    return {"settings": dataclasses.asdict(moe.settings), "routing": moe.settings.describe(),
            "expert_sizes": {d: _expert_size(c) for d, c in sorted(available.items())},
            "synthesis": moe.settings.synthesis, "enabled": moe.settings.enabled,
            "active_experts": sorted(available),
            "unavailable_experts": {d: c.missing for d, c in moe.experts.items()
                                    if d not in available},
            "router": moe.router_kind, "router_warning": moe.router_warning,
            "warnings": warnings}


@ops.op("settings.moe.get")
def _settings_moe_get(svc: Service, req: Req) -> dict:
    moe, warnings = moe_for(svc)
    return _settings_view(moe, warnings)


@ops.op("settings.moe.set")
def _settings_moe_set(svc: Service, req: Req, key: str, value) -> dict:
    if not isinstance(key, str):
        raise ProtocolError("settings.moe.set: 'key' must be a string")
    set_moe_setting(key, value)
    moe, warnings = moe_for(svc)
    return {"key": key, "value": value, **_settings_view(moe, warnings)}


@ops.op("ask", queued=True)
def _ask(svc: Service, req: Req, question: str, model: str | None = None,
         options: dict | None = None):
    if not isinstance(question, str) or not question.strip():
        raise ProtocolError("ask needs a non-empty 'question'")
    if model is None:
        try:
            moe, _ = moe_for(svc)
        except HublabError as err:  # broken MoE settings or experts must not break `?question`
            moe = None
            yield protocol.info(f"[MoE] not used: {err}")
        if moe is not None and moe.settings.enabled and moe.available():
            return (yield from _run_moe(svc, req, moe, question.strip(), options))
    cfg = svc.config_for(model)
    return (yield from svc.stream_generation(req, cfg, [{"role": "user", "content": question}],
                                             options, system_prompt=True))
