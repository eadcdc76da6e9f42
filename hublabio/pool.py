"""Loaded engines under the memory budget.

Every model load goes through `ModelPool`: it estimates what the model needs at the requested
context (hublabio.budget), evicts least-recently-used unpinned models that are not in use if that
makes room, or refuses with the numbers. Models are keyed by their GGUF file: experts that share
a base GGUF share one resident engine, and their LoRA adapters are loaded on it once and switched
per request. A lease (`acquire`) takes one of the engine's slots: an engine loaded with `parallel = N`
serves N generations at once (their decodes batched, hublabio.batching), one with N = 1 one
at a time; leases on different engines run concurrently. Unloading waits for every lease.

Engines are made by `engine_factory` (hublabio.engine.Engine by default) with the load settings
of `LoadSettings`: threads for generation and for prompts, mmap/mlock and the repack policy,
the daemon's defaults overridden by a model's [inference]. Unit tests pass a fake factory.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from hublabio.budget import (Estimate, Resident, estimate_memory, extra_context_mb,
                             max_context_fitting, plan_admission)
from hublabio.config import check_architecture
from hublabio.errors import BudgetError, GGUFError, HublabError, ModelNotFound
from hublabio.gguf_check import problems as header_problems
from hublabio.gguf_info import ModelInfo, read_gguf_info
from hublabio.llama.cpu import decide as repack_policy


@dataclass(frozen=True)
class LoadSettings:
    """How an engine is loaded; 0 / None mean "the default" (board, then llama.cpp)."""
    threads: int = 0
    threads_batch: int = 0
    mmap: bool = True
    mlock: bool = False
    repack: str | bool = "auto"
    parallel: int = 1               # slots per engine (`ai config parallel`, the board's)
    batch_mode: str = "continuous"  # "off": one slot whatever `parallel` says
    adapter_contexts: int = 1       # adapter sets kept applied at once (a context each)

    def for_model(self, inf) -> "LoadSettings":
        """These defaults overridden by a model's [inference] (threads, mmap, repack, ...).
        batch_mode off in either gives one slot."""
        off = "off" in (self.batch_mode, getattr(inf, "batch_mode", "continuous"))
        return LoadSettings(
            threads=inf.threads or self.threads,
            threads_batch=inf.threads_batch or self.threads_batch,
            mmap=self.mmap if inf.mmap is None else inf.mmap,
            mlock=self.mlock if inf.mlock is None else inf.mlock,
            repack=self.repack if inf.repack == "auto" else inf.repack,
            parallel=1 if off else max(1, getattr(inf, "parallel", 0) or self.parallel),
            batch_mode="off" if off else "continuous",
            adapter_contexts=1 if off else max(1, getattr(inf, "adapter_contexts", 0)
                                               or self.adapter_contexts))


def _default_factory(path, **kwargs):
    from hublabio.engine import Engine

    return Engine(path, **kwargs)


@dataclass
class ResidentModel:
    key: str
    path: Path
    n_ctx: int
    info: ModelInfo
    estimate: Estimate
    engine: object  # hublabio.engine.Engine, or what the pool's engine_factory makes
    names: set[str] = field(default_factory=set)
    pinned: bool = False
    adapter_mb: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    load_s: float = 0.0
    users: int = 0
    parallel: int = 1
    parallel_asked: int = 1  # what the settings asked (the budget may have allowed fewer)
    slots: threading.Semaphore = field(default_factory=threading.Semaphore, repr=False)
    context_mb: float = 0.0  # what the contexts beyond the first add
    adapter_sets: set = field(default_factory=set)  # (adapter, scale) its experts have used

    @property
    def mb(self) -> float:
        return self.estimate.total_mb + self.adapter_mb + self.context_mb

    @property
    def contexts(self) -> int:
        """llama.cpp contexts: one of `parallel` slots, any more of one slot each."""
        return getattr(self.engine, "contexts", 1)

    @property
    def leases(self) -> int:
        """Generations it serves at once: its slots."""
        return self.parallel + self.contexts - 1


def _mb(nbytes: int) -> float:
    return nbytes / (1024 * 1024)


class ModelPool:
    def __init__(self, budget_mb: float, *, idle_ttl_s: float = 0.0,
                 load: LoadSettings | None = None, n_threads: int | None = None,
                 engine_factory: Callable[..., object] | None = None, prober=None):
        """`prober.check(path)` runs before a file's first load (default with the real engine:
        hublabio.llama.probe.Prober, a child process that survives llama.cpp's asserts)."""
        self.budget_mb = float(budget_mb)
        self.idle_ttl_s = idle_ttl_s
        self.load = load or LoadSettings(threads=n_threads or 0)
        self.engine_factory = engine_factory or _default_factory
        if prober is None and engine_factory is None:
            from hublabio.llama.probe import Prober

            prober = Prober()
        self.prober = prober
        self._models: dict[str, ResidentModel] = {}
        self._lock = threading.RLock()

    # ---- queries -------------------------------------------------------------------------
    def resident(self) -> list[ResidentModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda r: r.last_used, reverse=True)

    def used_mb(self) -> float:
        with self._lock:
            return sum(r.mb for r in self._models.values())

    def fit(self, cfg, info: ModelInfo) -> dict:
        """Whether `cfg`'s model fits this pool's whole budget (what `ai list` shows): the
        estimate at its context with one slot and the load's repack policy, as a load would
        count it. {"needs_mb", "fits": "yes" | "ctx" | "no", "max_ctx"}: "ctx" when only a
        smaller context fits (`max_ctx`, the largest), "no" when not even 256 tokens do.
        Other resident models are not counted: a load may evict them."""
        load = self.load.for_model(cfg.inference)
        policy = repack_policy(load.repack)
        n_ctx = cfg.inference.context_size
        needs = estimate_memory(info, n_ctx, repack=policy).total_mb
        max_ctx = max_context_fitting(info, self.budget_mb, repack=policy)
        fits = "yes" if needs <= self.budget_mb else "ctx" if max_ctx else "no"
        return {"needs_mb": round(needs, 1), "fits": fits, "max_ctx": max_ctx}

    def find(self, name: str) -> ResidentModel | None:
        with self._lock:
            for r in self._models.values():
                if name in r.names or name == r.path.name or name == r.key:
                    return r
        return None

    # ---- loading -------------------------------------------------------------------------
    @staticmethod
    def _key(path: Path) -> str:
        return str(Path(path).resolve())

    def ensure_loaded(self, cfg, *, n_ctx: int | None = None) -> ResidentModel:
        """Make `cfg`'s model (and adapter) resident, evicting if needed; BudgetError if it
        cannot fit. `cfg` is a config.ModelConfig of type gguf."""
        if cfg.type != "gguf" or cfg.path is None:
            raise HublabError(f"{cfg.name}: only local GGUF models can be loaded "
                              f"(type {cfg.type!r})")
        path = Path(cfg.path)
        if not path.is_file():
            raise ModelNotFound(f"{cfg.name}: model file {path} not found")
        n_ctx = n_ctx or cfg.inference.context_size
        key = self._key(path)
        with self._lock:
            res = self._models.get(key)
            load = self.load.for_model(cfg.inference)
            if res is not None and (res.n_ctx, res.parallel_asked) != (n_ctx, load.parallel) \
                    and res.users == 0:
                res = None  # context size or slots changed: reload so, if it is admitted
            if res is None:
                res = self._load(key, path, n_ctx, cfg, load)
            elif cfg.name not in res.names:
                check_architecture(cfg, res.info.architecture)
            res.names.add(cfg.name)
            res.pinned = res.pinned or bool(cfg.pinned)
            if cfg.adapter is not None and Path(cfg.adapter).resolve() not in res.engine.adapters:
                adapter = Path(cfg.adapter)
                if not adapter.is_file():
                    raise ModelNotFound(f"{cfg.name}: adapter file {adapter} not found")
                res.engine.load_adapter(adapter)
                res.adapter_mb += _mb(adapter.stat().st_size)
            self._more_contexts(res, cfg, load)
            res.last_used = time.monotonic()
            return res

    def _more_contexts(self, res: ResidentModel, cfg, load: LoadSettings) -> None:
        """Give `res` one more context (Engine.add_context) when its experts now use more
        adapter sets than it has contexts, up to `load.adapter_contexts`, if the budget has
        room without evicting anything: it saves a graph re-reservation per adapter switch
        (docs/BENCHMARKS.md), which is not worth unloading another model for."""
        res.adapter_sets.add((cfg.adapter and str(Path(cfg.adapter).resolve()),
                              cfg.adapter_scale))
        add = getattr(res.engine, "add_context", None)
        # load.adapter_contexts is 1 where batch_mode is off (LoadSettings.for_model)
        wanted = min(load.adapter_contexts, len(res.adapter_sets))
        if add is None or res.contexts >= wanted:
            return
        extra = extra_context_mb(res.info, res.n_ctx)
        if self.used_mb() + extra > self.budget_mb:
            return
        add()
        res.context_mb += extra
        res.slots.release()  # its one slot: one more lease

    def _load(self, key: str, path: Path, n_ctx: int, cfg,
              load: LoadSettings) -> ResidentModel:
        info = read_gguf_info(path)
        check_architecture(cfg, info.architecture)
        bad = header_problems(info)
        if bad:
            raise GGUFError(path, "refused before loading: " + "; ".join(bad))
        if self.prober is not None:
            self.prober.check(path)  # llama.cpp, in a child process
        others = [Resident(k, r.mb, r.pinned or r.users > 0, r.last_used)
                  for k, r in self._models.items() if k != key]
        asked = load.parallel
        while True:  # fewer slots (each has its own KV cache) before a refusal
            est = estimate_memory(info, n_ctx, repack=repack_policy(load.repack),
                                  parallel=load.parallel)
            try:
                victims = plan_admission(est.total_mb, self.budget_mb, others, info=info,
                                         n_ctx=n_ctx)
                break
            except BudgetError:
                if load.parallel == 1:
                    raise
                load = replace(load, parallel=max(1, load.parallel // 2))
        # admitted: only now does anything leave memory (a refusal above unloaded nothing)
        for victim in ([key] if key in self._models else []) + victims:
            self._unload_key(victim)
        t0 = time.perf_counter()
        kwargs = {}
        # The daemon's batch mode, not this model's: with continuous batching queued ops run on
        # several threads, so even a one-slot (batch_mode off) model decodes on the decoder's
        # one thread — two threads decoding would each keep an OpenMP team, and both slow down
        if self.load.batch_mode == "continuous" and self.engine_factory is _default_factory:
            from hublabio.batching import shared_decoder

            kwargs = {"parallel": load.parallel, "decoder": shared_decoder()}
        elif load.parallel > 1:
            kwargs = {"parallel": load.parallel}
        engine = self.engine_factory(path, n_ctx=n_ctx, threads=load.threads or None,
                                     threads_batch=load.threads_batch or None, mmap=load.mmap,
                                     mlock=load.mlock, repack=load.repack, **kwargs)
        res = ResidentModel(key=key, path=path, n_ctx=n_ctx, info=info, estimate=est,
                            engine=engine, names={cfg.name}, load_s=time.perf_counter() - t0,
                            parallel=load.parallel, parallel_asked=asked,
                            slots=threading.Semaphore(load.parallel))
        self._models[key] = res
        return res

    @contextmanager
    def acquire(self, cfg, *, n_ctx: int | None = None) -> Iterator:
        """Lease `cfg`'s engine for one request (loads it first if needed)."""
        with self._lock:
            res = self.ensure_loaded(cfg, n_ctx=n_ctx)
            res.users += 1
        try:
            with res.slots:
                res.last_used = time.monotonic()
                yield res.engine
        finally:
            with self._lock:
                res.users -= 1
                res.last_used = time.monotonic()

    # ---- unloading -----------------------------------------------------------------------
    def _unload_key(self, key: str) -> None:
        res = self._models.pop(key)
        for _ in range(res.leases):  # waits for the generations in progress on it
            res.slots.acquire()
        try:
            res.engine.close()
        finally:
            for _ in range(res.leases):
                res.slots.release()

    def unload(self, name: str | None = None) -> list[str]:
        """Unload the model called `name` (config name, file name or key), or every model.
        Returns the names of what was unloaded."""
        with self._lock:
            if name is None:
                targets = list(self._models.values())
            else:
                res = self.find(name)
                if res is None:
                    raise ModelNotFound(f"no loaded model named {name!r}")
                targets = [res]
            names = []
            for res in targets:
                self._unload_key(res.key)
                names.extend(sorted(res.names))
            return names

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Unload unpinned models idle for longer than idle_ttl_s (0 disables)."""
        if self.idle_ttl_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [r for r in self._models.values()
                    if not r.pinned and r.users == 0 and now - r.last_used > self.idle_ttl_s]
            for r in idle:
                self._unload_key(r.key)
            return [n for r in idle for n in sorted(r.names)]

    def close(self) -> None:
        with self._lock:
            for key in list(self._models):
                self._unload_key(key)
