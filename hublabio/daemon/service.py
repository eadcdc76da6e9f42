"""The daemon's operations, free of any transport (the socket server and the HTTP API both call
`Service.run`).

What an op is, and how it is declared and registered: hublabio/daemon/registry.py. A Service
registers the ops of every module in OP_MODULES when it is made (`module.ops.register`): the
core ops (hublabio/daemon/ops_core.py) and MoE-R's (hublabio/daemon/ops_moe.py, which also
serves `ask`); a name registered twice stops the daemon with both functions named.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hublabio import params, paths, protocol
from hublabio.config import (
    DaemonSettings,
    ModelConfig,
    effective_inference,
    load_model_dir,
    read_settings,
    seed_path,
)
from hublabio.daemon.metrics import GenerationMetrics
from hublabio.daemon.registry import Registry, Req
from hublabio.errors import (
    ConfigError,
    HublabError,
    ModelNotFound,
    ProtocolError,
)

log = logging.getLogger("hublabd")

SETTLE_WAIT_S = 5.0  # how long a request waits for a `pkg install` moving files into place
OP_MODULES = ("hublabio.daemon.ops_core", "hublabio.daemon.ops_moe")


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    by_op: dict = field(default_factory=dict)
    generations: int = 0
    cancelled: int = 0
    busy: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_tps: float | None = None
    last_ttft_s: float | None = None
    last_model: str | None = None
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)  # /metrics


def _mb(n_bytes: int | float) -> float:
    return round(n_bytes / (1024 * 1024), 1)


def files_signature(folder: Path, pattern: str = "*") -> tuple:
    """(name, mtime, size) of each entry of `folder` matching `pattern`: it changes when one is
    added, removed or edited (a missing folder gives ())."""
    sig = []
    try:
        for p in sorted(folder.glob(pattern)):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig.append((p.name, st.st_mtime_ns, st.st_size))
    except OSError:
        pass
    return tuple(sig)


class Service:
    """Settings, the model pool, the model configs (re-read when a *.toml in the models dir
    changes) and counters. Thread-safe: ops run in worker threads."""

    def __init__(self, settings: DaemonSettings | None = None, *, board=None, pool=None,
                 op_modules: tuple[str, ...] = OP_MODULES):
        self.settings = settings or DaemonSettings()
        self.models_dir = Path(self.settings.models_dir or paths.models_dir()).expanduser().absolute()
        if board is None:
            from hublabio.board import detect_board

            board = detect_board()
        self.board = board
        if pool is None:
            from hublabio.board import budget_mb
            from hublabio.pool import ModelPool

            pool = ModelPool(budget_mb(self.settings, self.board),
                             idle_ttl_s=self.settings.idle_ttl_s,
                             load=load_settings(self.settings, self.board))
        self.pool = pool
        self.stats = Stats()
        self._lock = threading.RLock()
        self._configs: list[ModelConfig] = []
        self._config_errors: list[ConfigError] = []
        self._config_sig: tuple | None = None
        self._adhoc: dict[str, ModelConfig] = {}  # models loaded by path with `models.load`
        self._current: str | None = None
        self._info_cache: dict[tuple, Any] = {}
        self._recovery_refused = ""  # the last refusal logged (logged once, not per request)
        self.ops = Registry()
        for module in op_modules:
            importlib.import_module(module).ops.register(self.ops)

    # ---- configs -------------------------------------------------------------------------
    def _signature(self) -> tuple:
        return files_signature(self.models_dir, "*.toml")

    def configs(self) -> tuple[list[ModelConfig], list[ConfigError]]:
        """The model configs, re-read when any top-level *.toml changed (added, removed, edited)."""
        self.settle_packages()
        with self._lock:
            sig = self._signature()
            if sig != self._config_sig:
                self._configs, self._config_errors = load_model_dir(self.models_dir)
                self._config_sig = sig
                for err in self._config_errors:
                    log.warning("skipped model config: %s", err)
                if self._current and self._find(self._current) is None:
                    self._current = None
            return list(self._configs), list(self._config_errors)

    def _find(self, name: str) -> ModelConfig | None:
        for cfg in self._configs:
            if cfg.name == name:
                return cfg
        return self._adhoc.get(name)

    def default_config(self) -> ModelConfig:
        """The current model: the one last loaded with models.load, else the first config
        (model-config.toml sorts first)."""
        configs, errors = self.configs()
        with self._lock:
            if self._current:
                cfg = self._find(self._current)
                if cfg is not None:
                    return cfg
        if not configs:
            where = f"{self.models_dir}"
            why = f"; skipped: {'; '.join(map(str, errors))}" if errors else ""
            raise ModelNotFound(f"no model configured in {where} (add a model-config.toml){why}")
        return configs[0]

    def config_for(self, name: str | None) -> ModelConfig:
        """A config by name (None = the current model); a path to a .gguf file works too."""
        if not name:
            return self.default_config()
        configs, errors = self.configs()
        with self._lock:
            cfg = self._find(name)
        if cfg is not None:
            return cfg
        if name.endswith(".gguf") or "/" in name:
            for c in configs:  # `ai load /models/x.gguf`, the path as a config writes it
                if c.path_spec == name and not Path(name).exists():
                    return c
            p = self._allowed_path(name)
            cfg = ModelConfig(name=p.stem, type="gguf", path=p, source=p, path_spec=str(p))
            with self._lock:
                self._adhoc[cfg.name] = cfg
            return cfg
        known = ", ".join(c.name for c in configs) or "none"
        bad = [str(e) for e in errors if name in str(e.path)]
        hint = f"; its config was skipped: {bad[0]}" if bad else ""
        raise ModelNotFound(f"no model named {name!r} (known: {known}){hint}")

    def _allowed_path(self, name: str) -> Path:
        """A client-given GGUF path, under `[daemon] model_paths`: by default only a regular
        file whose real path (symlinks resolved) lies inside the models directory. A refusal
        says nothing about files outside it (not even whether they exist)."""
        policy = self.settings.model_paths
        p = Path(name).expanduser()
        if not p.is_absolute():
            p = (self.models_dir / p) if policy != "any" else p.absolute()
        elif not p.exists():  # the seed's SD-card paths: /models/x.gguf
            p = seed_path(p, self.models_dir, self.models_dir) or p
        if policy == "off":
            raise ModelNotFound(f"no model named {name!r}; naming models by path is off "
                                "([daemon] model_paths)")
        if policy != "any":
            real = Path(os.path.realpath(p))
            root = Path(os.path.realpath(self.models_dir))
            if root not in real.parents:
                raise ModelNotFound(f"no model named {name!r}; a path must lie inside the "
                                    f"models directory {self.models_dir} ([daemon] model_paths)")
            p = real
        if not p.is_file():
            raise ModelNotFound(f"no model named {name!r} and no such file: {p}")
        return p.absolute()

    def tidy_at_start(self) -> list[str]:
        """Start-up clean-up: remove temp files that killed writers left, and finish or discard
        package installs a crash interrupted (settle_packages)."""
        from hublabio import pkg
        from hublabio.fsutil import remove_stale_temps

        for folder in (paths.state_dir(), self.models_dir, self.models_dir / "experts",
                       self.models_dir / pkg.RECORDS):
            for p in remove_stale_temps(folder):
                log.info("removed a temp file a killed writer left: %s", p)
        if not self.models_dir.is_dir():
            return []
        return self._recover(lambda: pkg.recover(self.models_dir, timeout=SETTLE_WAIT_S))

    def settle_packages(self) -> list[str]:
        """Requests never see a half-installed package: while a `pkg install` is between its
        journal and its end (moving files into place now, or killed while doing it), wait for
        it (at most SETTLE_WAIT_S) or finish it (hublabio.pkg.recover) before reading the
        models directory. Costs one directory read when no install is under way."""
        from hublabio import pkg

        if not pkg.has_journal(self.models_dir):
            return []
        return self._recover(lambda: pkg.recover(self.models_dir, timeout=SETTLE_WAIT_S))

    def _recover(self, run) -> list[str]:
        """Run package recovery; log what it did. A refused (tampered) journal or a lock held
        too long is logged once and left for the administrator: the daemon keeps serving."""
        from hublabio.fsutil import LockTimeout

        try:
            done = run()
        except (HublabError, LockTimeout) as exc:
            if str(exc) != self._recovery_refused:
                log.error("package recovery refused: %s", exc)
                self._recovery_refused = str(exc)
            return []
        for line in done:
            log.info("package recovery: %s", line)
        return done

    def set_current(self, name: str) -> None:
        with self._lock:
            self._current = name

    def inference(self, cfg: ModelConfig):
        """The model's [inference] with the user's persisted `ai config` overrides."""
        return effective_inference(cfg, read_settings())

    def model_info(self, path: Path):
        """GGUF header facts, cached per (path, mtime, size). Raises GGUFError."""
        from hublabio.gguf_info import read_gguf_info

        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._info_cache.get(key)
        if hit is None:
            hit = read_gguf_info(path)
            with self._lock:
                self._info_cache[key] = hit
        return hit

    def is_loaded(self, name: str) -> bool:
        return any(name in r.names for r in self.pool.resident())

    def concurrency(self) -> int:
        """How many queued ops (generations) may run at once: the slots a model gets under
        the current settings (`ai config parallel` / the board; 1 with batch_mode off), or
        more where a resident model was given more by its own [inference]."""
        load = self.pool.load
        asked = max(1, load.parallel) if load.batch_mode == "continuous" else 1
        return max([asked] + [r.leases for r in self.pool.resident()])

    # ---- running ops ---------------------------------------------------------------------
    def run(self, name: str, params: dict | None = None, *, request_id: str | None = None,
            cancel: threading.Event | None = None) -> Iterator[dict]:
        """Run one op in the calling thread: yields its events, each stamped with the request
        id, ending with exactly one result or error event. Never raises (a bug in an op becomes
        an "internal" error event)."""
        params = params or {}
        req = Req(request_id or protocol.new_id(), name, cancel or threading.Event())
        with self._lock:
            self.stats.requests += 1
            if name in self.ops:  # unknown names are not counted per op (unbounded labels)
                self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1
        try:
            spec = self.ops.spec(name)
            self.ops.check_params(spec, params)
            if spec.streaming:
                gen = spec.fn(self, req, **params)
                while True:
                    try:
                        ev = next(gen)
                    except StopIteration as stop:
                        data = stop.value
                        break
                    ev["id"] = req.id
                    yield ev
            else:
                data = spec.fn(self, req, **params)
            yield protocol.result(data, req.id)
        except GeneratorExit:
            req.cancel.set()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error event
            with self._lock:
                self.stats.errors += 1
            if not isinstance(exc, HublabError):
                log.exception("op %s failed", name)
            yield protocol.error_event(exc, req.id)

    def call(self, name: str, /, **params) -> dict:
        """Run an op to completion and return its result data (raises its error)."""
        data = None
        for ev in self.run(name, params):
            if ev["type"] == "result":
                data = ev["data"]
            elif ev["type"] == "error":
                raise protocol.exception_from_event(ev)
        return data

    def record_generation(self, model: str, stats) -> None:
        with self._lock:
            s = self.stats
            s.generations += 1
            if stats.finish_reason == "cancelled":
                s.cancelled += 1
            s.prompt_tokens += stats.prompt_tokens
            s.completion_tokens += stats.completion_tokens
            if stats.gen_tps:
                s.last_tps = stats.gen_tps
            if stats.completion_tokens:
                s.last_ttft_s = stats.ttft_s
            s.last_model = model
            s.metrics.record(model, stats)

    def stream_generation(self, req: Req, cfg: ModelConfig, prompt, options: dict | None = None,
                          *, system_prompt: bool = False) -> Iterator[dict]:
        """Generate with `cfg` (its effective inference settings + per-request `options`),
        yielding token events; returns the result data. Used by generate/ask and the HTTP API.
        Local and remote models share one interface: generate() yields Pieces, returns stats."""
        from hublabio.engine import SamplingOptions

        if cfg.type == "gguf" and cfg.missing:
            raise ModelNotFound(f"model {cfg.name!r} cannot be loaded: {cfg.missing}")
        options = dict(options or {})
        asked = options.pop("logprobs", None)  # True: per-token detail; False: none at all
        inf = self.inference(cfg)
        opts = SamplingOptions.from_inference(inf, **_check_options(options))
        detail = bool(asked) or opts.top_logprobs > 0
        if asked is False and not detail:
            opts.logprobs = False
        if system_prompt and inf.system_prompt and isinstance(prompt, list) \
                and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": inf.system_prompt}, *prompt]
        parts: list[str] = []
        extra = {}
        if cfg.type == "remote":
            from hublabio.remote import RemoteExpert

            if not isinstance(prompt, list):
                raise ProtocolError(f"model {cfg.name!r} is remote (chat API): send 'messages', "
                                    "not a raw 'prompt'")
            remote = RemoteExpert(cfg.url, cfg.remote_model or cfg.name)
            stats = yield from token_events(remote.generate(prompt, opts, cancel=req.cancel),
                                            parts, detail=detail)
            extra = {"remote": cfg.url}
        else:
            if not self.is_loaded(cfg.name):
                yield protocol.info(f"loading {cfg.name} ...")
            with self.pool.acquire(cfg, n_ctx=inf.context_size) as engine:
                gen = engine.generate(prompt, opts, adapter=cfg.adapter,
                                      adapter_scale=cfg.adapter_scale, cancel=req.cancel)
                stats = yield from token_events(gen, parts, detail=detail)
        self.record_generation(cfg.name, stats)
        return {"text": "".join(parts), "model": cfg.name, **extra, **stats.as_dict()}

    def close(self) -> None:
        self.pool.close()


def token_events(gen, parts: list[str], *, detail: bool = False) -> Iterator[dict]:
    """Token events for the Pieces of a generation (appending their text to `parts`); returns
    the generation's return value (its GenerationStats). With `detail`, each event also lists
    its tokens with their log-probabilities and top alternatives."""
    from hublabio.engine import map_pieces

    def event(piece) -> dict:
        parts.append(piece.text)
        tokens = None
        if detail:
            tokens = [{"text": t.text, "bytes": list(t.data), "logprob": t.logprob,
                       "top": [{"text": text, "logprob": lp} for _, text, lp in t.top]}
                      for t in piece.tokens]
        return protocol.token(piece.text, piece.logprob, tokens=tokens)

    return (yield from map_pieces(gen, event))


def load_settings(settings: DaemonSettings, board):
    """The pool's load defaults: daemon settings, then `ai config` (threads, parallel,
    batch_mode, adapter_contexts), then the board."""
    from hublabio.pool import LoadSettings

    user = _user_inference()
    return LoadSettings(
        threads=settings.threads or user.get("threads") or getattr(board, "threads", 0) or 0,
        threads_batch=(settings.threads_batch or user.get("threads_batch")
                       or getattr(board, "threads_batch", 0) or 0),
        mmap=settings.mmap, mlock=settings.mlock, repack=settings.repack,
        parallel=user.get("parallel") or getattr(board, "parallel", 1) or 1,
        batch_mode=user.get("batch_mode", "continuous"),
        adapter_contexts=(user.get("adapter_contexts") or getattr(board, "adapter_contexts", 1)
                          or 1))


def _user_inference() -> dict:
    """The user's `ai config` inference settings ({} when unreadable)."""
    try:
        return read_settings().get("inference", {})
    except ConfigError as exc:
        log.warning("ignoring user settings: %s", exc)
        return {}


_REQUEST_SPEC = params.by_name(p for p in params.INFERENCE if params.REQUEST in p.where)


def _check_options(options: dict | None) -> dict:
    """Per-request sampling overrides (hublabio.params.INFERENCE, where "request"), typed and
    range-checked; an unknown key or a bad value is an error naming the key."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ProtocolError(f"options must be an object, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        p = _REQUEST_SPEC.get(key)
        if p is None:
            raise ProtocolError(f"options: unknown key {key!r} (known: {', '.join(_REQUEST_SPEC)})")
        if value is None:
            continue
        try:
            out[key] = params.check(p, value)
        except params.ParamError as exc:
            raise ProtocolError(f"options.{key}: {exc}") from None
    return out
