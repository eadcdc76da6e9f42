"""The daemon's core ops: models, info, config, stats, benchmark, generate, embed.

Declared on `ops` and registered by the Service at start (hublabio/daemon/registry.py);
`ask` is MoE-R's (hublabio/daemon/ops_moe.py), with the plain model as its fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import hublabio
from hublabio import protocol
from hublabio.config import (
    architecture_problem,
    read_settings,
    reset_settings,
    update_settings,
    validate_inference_override,
)
from hublabio.daemon.registry import OpTable, Req
from hublabio.daemon.service import Service, _mb, load_settings
from hublabio.errors import GGUFError, HublabError, ModelNotFound, ProtocolError
from hublabio.gguf_check import problems as header_problems

log = logging.getLogger("hublabd")

ops = OpTable()  # registered by the Service at start (hublabio.daemon.registry)


def _messages(messages, prompt) -> list[dict] | str:
    if (messages is None) == (prompt is None):
        raise ProtocolError("generate needs exactly one of 'messages' (chat) or 'prompt' (raw text)")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ProtocolError("prompt must be a string")
        return prompt
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ProtocolError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ProtocolError(f"messages[{i}].role must be system, user or assistant, "
                                f"got {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ---- core ops ----------------------------------------------------------------------------

@ops.op("hello")
def _hello(svc: Service, req: Req) -> dict:
    board = svc.board
    return {
        "version": hublabio.__version__, "protocol": protocol.VERSION,
        "models_dir": str(svc.models_dir), "budget_mb": svc.pool.budget_mb,
        "board": dataclasses.asdict(board) if dataclasses.is_dataclass(board) else str(board),
        "ops": sorted(svc.ops),
    }


@ops.op("models.list")
def _models_list(svc: Service, req: Req) -> dict:
    configs, errors = svc.configs()
    current = svc.default_config().name if configs or svc._current else None
    resident = {n for r in svc.pool.resident() for n in r.names}
    models = []
    for cfg in configs:
        row = {"name": cfg.name, "type": cfg.type, "path": str(cfg.path) if cfg.path else cfg.url,
               "loaded": cfg.name in resident, "pinned": cfg.pinned, "current": cfg.name == current,
               "missing": cfg.missing, "size_mb": None, "quantization": None, "parameters": None,
               "error": None, "needs_mb": None, "fits": None, "max_ctx": None}
        if cfg.type == "gguf" and not cfg.missing:
            try:
                row["size_mb"] = _mb(cfg.path.stat().st_size)
                info = svc.model_info(cfg.path)
                row["quantization"] = info.quantization
                row["parameters"] = info.parameters_human
                bad = header_problems(info)
                mismatch = architecture_problem(cfg, info.architecture)
                if bad:
                    row["error"] = f"{cfg.path}: " + "; ".join(bad)
                elif mismatch:
                    row["error"] = f"{cfg.source}: [model] type: {mismatch}"
                elif svc.pool.prober is not None:  # refused by the probe at a load attempt
                    row["error"] = svc.pool.prober.problem(cfg.path)
                if not row["error"]:
                    row.update(svc.pool.fit(cfg, info))
            except (GGUFError, OSError) as exc:
                row["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd file must not break the list
                log.exception("models.list: %s", cfg.path)
                row["error"] = f"{cfg.path}: unreadable header ({type(exc).__name__})"
        models.append(row)
    return {"models": models, "models_dir": str(svc.models_dir), "budget_mb": svc.pool.budget_mb,
            "errors": [{"path": e.path, "key": e.key, "message": str(e)} for e in errors]}


def _resident_rows(svc: Service) -> list[dict]:
    rows = []
    for r in svc.pool.resident():
        engine = r.engine
        policy = getattr(engine, "repack", None)
        rows.append({
            "names": list(r.names), "path": str(r.path), "n_ctx": r.n_ctx,
            "memory_mb": round(getattr(r, "mb", r.estimate.total_mb), 1), "pinned": r.pinned,
            "idle_s": round(time.monotonic() - r.last_used, 1) if r.last_used else None,
            "threads": getattr(engine, "threads", None),
            "threads_batch": getattr(engine, "threads_batch", None),
            "buffers_mb": {k: round(v, 1) for k, v in getattr(engine, "buffers", {}).items()},
            "repack": policy.reason if policy is not None else None,
            "parallel": getattr(r, "parallel", 1), "contexts": getattr(r, "contexts", 1)})
    return rows


@ops.op("models.load", queued=True)
def _models_load(svc: Service, req: Req, name: str | None = None, path: str | None = None,
                 n_ctx: int | None = None) -> dict:
    if (name is None) == (path is None):
        raise ProtocolError("models.load needs exactly one of 'name' or 'path'")
    cfg = svc.config_for(name or str(Path(path).expanduser().absolute()))
    if cfg.type != "gguf":
        raise HublabError(f"model {cfg.name!r} is type {cfg.type!r}: nothing to load locally")
    if cfg.missing:
        raise ModelNotFound(f"model {cfg.name!r} cannot be loaded: {cfg.missing}")
    info = svc.model_info(cfg.path)  # a corrupt file fails here, before llama.cpp sees it
    inf = svc.inference(cfg)
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int)):
        raise ProtocolError(f"n_ctx must be an integer, got {n_ctx!r}")
    ctx = n_ctx or inf.context_size
    t0 = time.perf_counter()
    was_loaded = svc.is_loaded(cfg.name)
    res = svc.pool.ensure_loaded(cfg, n_ctx=ctx)
    svc.set_current(cfg.name)
    return {"name": cfg.name, "path": str(cfg.path), "architecture": info.architecture,
            "parameters": info.parameters, "parameters_human": info.parameters_human,
            "quantization": info.quantization, "context_size": res.n_ctx,
            "memory_mb": round(getattr(res, "mb", res.estimate.total_mb), 1),
            "load_s": round(time.perf_counter() - t0, 3),
            "already_loaded": was_loaded, "used_mb": round(svc.pool.used_mb(), 1),
            "budget_mb": svc.pool.budget_mb}


@ops.op("models.unload", queued=True)
def _models_unload(svc: Service, req: Req, name: str | None = None) -> dict:
    if name is not None and not svc.is_loaded(name):
        loaded = ", ".join(n for r in svc.pool.resident() for n in r.names) or "none"
        raise ModelNotFound(f"model {name!r} is not loaded (loaded: {loaded})")
    return {"unloaded": svc.pool.unload(name), "used_mb": round(svc.pool.used_mb(), 1)}


@ops.op("info")
def _info(svc: Service, req: Req) -> dict:
    cfg = svc.default_config()
    out = {"model": cfg.name, "path": str(cfg.path) if cfg.path else cfg.url,
           "loaded": svc.is_loaded(cfg.name), "parameters": None, "parameters_human": None,
           "quantization": None, "architecture": None, "context_size": svc.inference(cfg).context_size,
           "used_mb": round(svc.pool.used_mb(), 1), "budget_mb": svc.pool.budget_mb,
           "last_tps": svc.stats.last_tps, "resident": _resident_rows(svc)}
    load = svc.pool.load.for_model(cfg.inference)  # the budget may allow fewer: see resident
    out.update(parallel=load.parallel, batch_mode=load.batch_mode)
    if cfg.type == "gguf" and not cfg.missing:
        try:
            info = svc.model_info(cfg.path)
            out.update(parameters=info.parameters, parameters_human=info.parameters_human,
                       quantization=info.quantization, architecture=info.architecture)
        except GGUFError as exc:
            out["error"] = str(exc)
    return out


@ops.op("config.get")
def _config_get(svc: Service, req: Req) -> dict:
    cfg = svc.default_config()
    inf = svc.inference(cfg)
    return {"model": cfg.name, "settings": dataclasses.asdict(inf),
            "overrides": read_settings().get("inference", {})}


@ops.op("config.set")
def _config_set(svc: Service, req: Req, key: str, value: Any) -> dict:
    typed = validate_inference_override(key, value)
    update_settings("inference", key, typed)
    note = "applies to the next request"
    if key == "context_size":
        note = "the model reloads with the new context on its next request"
    elif key in ("threads", "threads_batch", "parallel", "batch_mode", "adapter_contexts"):
        note = "applies to models loaded from now on (ai unload to reload)"
        # the same precedence as at start: daemon flags, then ai config, then the board
        svc.pool.load = load_settings(svc.settings, svc.board)
    return {"key": key, "value": typed, "note": note}


@ops.op("config.reset")
def _config_reset(svc: Service, req: Req) -> dict:
    """Move the user settings file aside (e.g. after it was damaged) and start from defaults."""
    aside = reset_settings()
    return {"reset": aside is not None, "kept_as": str(aside) if aside else None}


@ops.op("stats")
def _stats(svc: Service, req: Req) -> dict:
    with svc._lock:
        s = dataclasses.asdict(svc.stats)
    s["uptime_s"] = round(time.time() - s.pop("started"), 1)
    s["used_mb"] = round(svc.pool.used_mb(), 1)
    s["budget_mb"] = svc.pool.budget_mb
    s["resident"] = _resident_rows(svc)
    return s


@ops.op("benchmark", queued=True)
def _benchmark(svc: Service, req: Req, name: str | None = None, pp: int = 128,
               tg: int = 32) -> dict:
    for key, val, hi in (("pp", pp, 8192), ("tg", tg, 4096)):
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= hi:
            raise ProtocolError(f"benchmark: {key} must be an integer in [1, {hi}], got {val!r}")
    cfg = svc.config_for(name)
    if cfg.missing:
        raise ModelNotFound(f"model {cfg.name!r} cannot be loaded: {cfg.missing}")
    inf = svc.inference(cfg)
    with svc.pool.acquire(cfg, n_ctx=inf.context_size) as engine:
        out = engine.bench(pp=pp, tg=tg, cancel=req.cancel)
    info = svc.model_info(cfg.path)
    return {"model": cfg.name, "parameters_human": info.parameters_human,
            "quantization": info.quantization, **out}


@ops.op("generate", queued=True)
def _generate(svc: Service, req: Req, messages: list | None = None, prompt: str | None = None,
              model: str | None = None, options: dict | None = None):
    """Chat messages (the model's system_prompt is added when they have no system message)
    or a raw prompt (used as is)."""
    text = _messages(messages, prompt)
    cfg = svc.config_for(model)
    return (yield from svc.stream_generation(req, cfg, text, options, system_prompt=True))


MAX_EMBED_INPUTS = 256


@ops.op("embed", queued=True)
def _embed(svc: Service, req: Req, input: list, model: str | None = None) -> dict:
    """Embeddings of `input` (texts, or token-id lists) from a local decoder model: each the
    mean of its tokens' final hidden states, L2-normalized (engine.Engine.embed)."""
    if not input or len(input) > MAX_EMBED_INPUTS:
        raise ProtocolError(f"input must hold 1 to {MAX_EMBED_INPUTS} texts or token lists, "
                            f"got {len(input)}")
    cfg = svc.config_for(model)
    if cfg.type == "remote":
        raise ProtocolError(f"model {cfg.name!r} is remote: embeddings come from local GGUF "
                            "models only")
    if cfg.missing:
        raise ModelNotFound(f"model {cfg.name!r} cannot be loaded: {cfg.missing}")
    inf = svc.inference(cfg)
    vectors, n_tokens = [], 0
    with svc.pool.acquire(cfg, n_ctx=inf.context_size) as engine:
        for i, item in enumerate(input):
            tokens = _embed_input(engine, item, i)
            n_tokens += len(tokens)
            vec = engine.embed(tokens, adapter=cfg.adapter, adapter_scale=cfg.adapter_scale,
                               cancel=req.cancel)
            vectors.append([float(x) for x in vec])
    return {"model": cfg.name, "embeddings": vectors, "prompt_tokens": n_tokens}


def _embed_input(engine, item, i: int) -> list[int]:
    if isinstance(item, str):
        if not item:
            raise ProtocolError(f"input[{i}] is empty")
        return engine.embed_tokens(item)
    if isinstance(item, list) and item and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item):
        bad = next((t for t in item if not 0 <= t < engine.n_vocab), None)
        if bad is not None:
            raise ProtocolError(f"input[{i}]: token id {bad} is not in this model's vocabulary "
                                f"(0..{engine.n_vocab - 1})")
        return list(item)
    raise ProtocolError(f"input[{i}] must be a non-empty string or a non-empty list of token ids")
