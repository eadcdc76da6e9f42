"""MoE-R: route a question to domain experts, run them within the memory budget, synthesize.

    moe = MoE(pool, experts, router, MoESettings())
    moe.route("why does my borrow checker complain?")   # RouteResult: scores + selected
    for event in moe.query("..."): ...                   # info lines, then the answer's tokens

Experts run one after another through the `ModelPool`: each takes a lease on its engine, so
experts over the same base GGUF share one resident model (their LoRA adapters are switched per
request) and, when only one model fits the budget, the pool evicts the previous expert's model
before loading the next one (TopK(2) on a small board is slower, never an error). Remote experts
(`type = "remote"`) are called over HTTP (hublabio.remote). When exactly one expert is selected
its tokens stream as they are generated; with several, each answer is generated in full, then
the synthesizer (hublabio.synth) combines them (`summarize` streams the general expert's text).

Settings live in the user settings file, section [moe] (see MOE_DEFAULTS), validated here and
written crash-safe with config.write_settings. docs/MOE.md documents the whole pipeline.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping, Sequence

from hublabio import params, protocol, synth
from hublabio.config import (
    ExpertConfig,
    ModelConfig,
    load_experts,
    read_settings,
    settings_lock,
    write_settings,
)
from hublabio.errors import (
    Cancelled,
    ConfigError,
    HublabError,
    ModelNotFound,
    RouterError,
)
from hublabio.params import schema_dataclass
from hublabio.remote import RemoteExpert
from hublabio.router import (
    KeywordRouter,
    Route,
    experts_keywords_of,
    load_router,
    parse_strategy,
    select_with_fallback,
)

FALLBACK_DOMAIN = "general"
MOE_DEFAULTS: dict[str, Any] = params.defaults(params.MOE)
ROUTINGS = params.ROUTINGS
_MOE_SPEC = params.by_name(params.MOE)


# ---------------------------------------------------------------- settings

def _settings_file() -> Path:
    from hublabio.paths import settings_file

    return settings_file()


def validate_moe_setting(key: str, value: Any) -> Any:
    """One [moe] setting (hublabio.params.MOE), typed (strings from the shell are converted)
    and checked; raises ConfigError naming the settings file and the key."""
    where, k = _settings_file(), f"[moe] {key}"
    if key not in _MOE_SPEC:
        raise ConfigError(where, k, f"unknown MoE setting; known: {', '.join(_MOE_SPEC)}")
    try:
        return params.check(_MOE_SPEC[key], value, text=True)
    except params.ParamError as exc:
        raise ConfigError(where, k, str(exc)) from None


@schema_dataclass(params.MOE, frozen=True)
class MoESettings:
    """The user settings' [moe] (hublabio.params.MOE)."""

    @classmethod
    def from_dict(cls, table: Mapping[str, Any] | None) -> "MoESettings":
        values = dict(MOE_DEFAULTS)
        for key, value in (table or {}).items():
            values[key] = validate_moe_setting(key, value)
        return cls(**values)

    @classmethod
    def load(cls) -> "MoESettings":
        """From the user settings file ([moe]; defaults for what is not set)."""
        return cls.from_dict(read_settings().get("moe"))

    def strategy(self, experts: Sequence[ModelConfig] = ()):
        """The router strategy. For `threshold`, an expert whose TOML sets a threshold other
        than the default (0.5) overrides the global one for its domain."""
        if self.routing == "topk":
            return parse_strategy("topk", k=self.k)
        if self.routing == "threshold":
            default = ExpertConfig(domain="_").threshold
            per = {c.expert.domain: float(c.expert.threshold) for c in experts
                   if c.expert is not None and c.expert.threshold != default}
            return parse_strategy("threshold", t=self.threshold, per_domain=per)
        return parse_strategy(self.routing)

    def with_overrides(self, routing: str | None = None,
                       synthesis: str | None = None) -> "MoESettings":
        """These settings with one request's routing ("topk 2", ...) and synthesis."""
        updates = parse_routing(routing) if routing is not None else {}
        if synthesis is not None:
            updates["synthesis"] = validate_moe_setting("synthesis", synthesis)
        return replace(self, **updates)

    def describe(self) -> str:
        if self.routing == "topk":
            return f"topk {self.k}"
        if self.routing == "threshold":
            return f"threshold {self.threshold:g}"
        return self.routing


def parse_routing(value: Any) -> dict[str, Any]:
    """"topk 2" / "threshold 0.4" / "single" / "all" -> the [moe] keys it sets."""
    words = str(value).split()
    if not words:
        raise ConfigError(_settings_file(), "[moe] routing", "expected a routing strategy")
    routing = validate_moe_setting("routing", words[0])
    updates: dict[str, Any] = {"routing": routing}
    if len(words) > 2 or (len(words) == 2 and routing not in ("topk", "threshold")):
        raise ConfigError(_settings_file(), "[moe] routing",
                          f"{routing} takes {'one number' if routing in ('topk', 'threshold') else 'no parameter'}, "
                          f"got {value!r}")
    if len(words) == 2:
        param = "k" if routing == "topk" else "threshold"
        updates[param] = validate_moe_setting(param, words[1])
    return updates


def set_moe_setting(key: str, value: Any) -> MoESettings:
    """Validate and persist one [moe] setting atomically (temp file, fsync, rename). For
    `routing` the value may carry the strategy's parameter: "topk 2", "threshold 0.4" (both
    keys are written in the same atomic replace). Returns the new settings."""
    updates = parse_routing(value) if key == "routing" else {key: validate_moe_setting(key, value)}
    with settings_lock():
        data = read_settings()
        table = data.setdefault("moe", {})
        table.update(updates)
        new = MoESettings.from_dict(table)  # the whole section must stay valid
        write_settings(data)
    return new


# ---------------------------------------------------------------- results

@dataclass
class RouteResult:
    query: str
    scores: dict[str, float]
    selected: list[Route]
    strategy: str
    router: str                     # "onnx" | "keyword"
    fallback: bool = False          # nothing passed the strategy: general answers

    def as_dict(self) -> dict:
        return {"query": self.query, "scores": self.scores,
                "selected": [{"domain": r.domain, "probability": r.probability}
                             for r in self.selected],
                "strategy": self.strategy, "router": self.router, "fallback": self.fallback}


@dataclass
class _Run:
    """What one expert's generation left behind (filled while its tokens stream)."""
    texts: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tokenizer_key: str = ""
    finish_reason: str = "stop"
    stats: Any = None


def _pieces(gen, run: _Run):
    """(text, logprob) for each Piece of a generation, its text kept in `run`; returns the
    generation's GenerationStats."""
    from hublabio.engine import map_pieces

    def keep(piece):
        run.texts.append(piece.text)
        return piece.text, piece.logprob

    return (yield from map_pieces(gen, keep))


# ---------------------------------------------------------------- the pipeline

class MoE:
    def __init__(self, pool, experts: Sequence[ModelConfig], router,
                 settings: MoESettings | None = None, *, router_warning: str | None = None,
                 inference_overrides: Mapping[str, Any] | None = None):
        self.pool = pool
        self.router = router
        self.router_warning = router_warning
        self.settings = settings or MoESettings()
        self.inference_overrides = dict(inference_overrides or {})
        self.experts: dict[str, ModelConfig] = {}
        for cfg in experts:
            if cfg.expert is None:
                raise ConfigError(cfg.source, "[expert]", "an expert config needs an [expert] "
                                                          "table with a domain")
            other = self.experts.get(cfg.expert.domain)
            if other is not None:
                raise ConfigError(cfg.source, "[expert] domain",
                                  f"domain {cfg.expert.domain!r} is already served by "
                                  f"{other.name} ({other.source})")
            self.experts[cfg.expert.domain] = cfg
        self._tokenizer_keys: dict[str, str] = {}

    @classmethod
    def from_models_dir(cls, pool, models_dir: str | Path,
                        settings: MoESettings | None = None) -> tuple["MoE", list[str]]:
        """Experts from <models_dir>/experts/*.toml, the router from <models_dir>/router/
        (keyword fallback), settings from the user settings file. Returns (moe, warnings)."""
        models_dir = Path(models_dir)
        found, errors = load_experts(models_dir)
        warnings = [f"skipped expert config: {e}" for e in errors]
        experts, seen = [], {}
        for cfg in found:
            if cfg.expert.domain in seen:
                warnings.append(f"skipped expert config: {cfg.source}: [expert] domain: "
                                f"{cfg.expert.domain!r} is already served by {seen[cfg.expert.domain]}")
                continue
            seen[cfg.expert.domain] = cfg.source
            experts.append(cfg)
        router, warning = load_router(models_dir / "router", experts_keywords_of(experts))
        if warning:
            warnings.append(warning)
        moe = cls(pool, experts, router, settings or MoESettings.load(), router_warning=warning)
        return moe, warnings

    @property
    def router_kind(self) -> str:
        return "keyword" if isinstance(self.router, KeywordRouter) else "onnx"

    # ---- routing -------------------------------------------------------------------------
    def available(self) -> dict[str, ModelConfig]:
        """Experts that can run (local ones whose files exist, and remote ones)."""
        return {d: c for d, c in self.experts.items() if not c.missing}

    def route(self, query: str) -> RouteResult:
        if not isinstance(query, str) or not query.strip():
            raise RouterError("moe: the query is empty")
        if not self.experts:
            raise ModelNotFound("moe: no experts configured (models/experts/*.toml)")
        raw = self.router.score(query)
        scores = {d: float(raw.get(d, 0.0)) for d in self.experts}
        scores.update({d: float(p) for d, p in raw.items() if d not in scores})
        usable = self.available()
        if not usable:
            why = "; ".join(f"{c.name}: {c.missing}" for c in self.experts.values())
            raise ModelNotFound(f"moe: no expert can run ({why})")
        strategy = self.settings.strategy(list(self.experts.values()))
        candidates = {d: p for d, p in scores.items() if d in usable}
        selected = strategy.select(candidates)
        fallback = not selected
        if fallback:
            domain = FALLBACK_DOMAIN if FALLBACK_DOMAIN in usable else \
                max(candidates, key=lambda d: (candidates[d], d == FALLBACK_DOMAIN))
            selected = select_with_fallback(strategy, candidates, fallback=domain)
        return RouteResult(query, scores, selected, self.settings.describe(), self.router_kind,
                           fallback)

    def route_to(self, query: str, domains: Sequence[str]) -> RouteResult:
        """A route the caller chose: these experts, with the router's scores for the record."""
        usable = self.available()
        unknown = [d for d in domains if d not in usable]
        if unknown or not domains:
            raise ModelNotFound(f"moe: no available expert {', '.join(map(repr, unknown))}; "
                                f"available: {', '.join(sorted(usable)) or 'none'}")
        raw = self.router.score(query)
        scores = {d: float(raw.get(d, 0.0)) for d in self.experts}
        return RouteResult(query, scores, [Route(d, scores[d]) for d in domains],
                           "chosen by the request", self.router_kind)

    # ---- running experts -----------------------------------------------------------------
    def inference(self, cfg: ModelConfig):
        return cfg.inference.with_overrides(self.inference_overrides) \
            if self.inference_overrides else cfg.inference

    def messages(self, cfg: ModelConfig, query: str,
                 history: Sequence[Mapping[str, str]] = ()) -> list[dict]:
        """The expert's system prompt (with the conversation's own system text after it), the
        earlier turns of the conversation, then the query."""
        inf = self.inference(cfg)
        system = [inf.system_prompt] if inf.system_prompt else []
        system += [m["content"] for m in history if m["role"] == "system"]
        msgs = [{"role": "system", "content": "\n\n".join(system)}] if system else []
        msgs += [{"role": m["role"], "content": m["content"]} for m in history
                 if m["role"] in ("user", "assistant")]
        return msgs + [{"role": "user", "content": query}]

    def _tokenizer_key(self, engine) -> str:
        """Same key = same vocabulary: architecture, vocab size and a CRC of a sample of the
        token texts (so two quantizations of one model match, two different models do not)."""
        key = str(engine.path)
        hit = self._tokenizer_keys.get(key)
        if hit is None:
            n = engine.n_vocab
            step = max(1, n // 256)
            sample = "\x00".join(engine.token_text(i) for i in range(0, n, step))
            hit = f"{engine.architecture}:{n}:{zlib.crc32(sample.encode('utf-8')):08x}"
            self._tokenizer_keys[key] = hit
        return hit

    def stream_expert(self, cfg: ModelConfig, messages: list[dict], run: _Run, *,
                      options: Mapping[str, Any] | None = None,
                      cancel=None) -> Iterator[tuple[str, float | None]]:
        """Generate with one expert (local or remote: one interface), yielding (text, logprob)
        pieces and filling `run`."""
        from hublabio.engine import SamplingOptions

        inf = self.inference(cfg)
        opts = SamplingOptions.from_inference(inf, **dict(options or {}))
        if cfg.type == "remote":
            remote = RemoteExpert(cfg.url, cfg.remote_model or cfg.name)
            run.tokenizer_key = remote.tokenizer_key
            run.stats = yield from _pieces(remote.generate(messages, opts, cancel=cancel), run)
        else:
            if cfg.missing:
                raise ModelNotFound(f"expert {cfg.name!r} cannot be loaded: {cfg.missing}")
            with self.pool.acquire(cfg, n_ctx=inf.context_size) as engine:
                run.tokenizer_key = self._tokenizer_key(engine)
                run.stats = yield from _pieces(
                    engine.generate(messages, opts, adapter=cfg.adapter,
                                    adapter_scale=cfg.adapter_scale, cancel=cancel), run)
        run.finish_reason = run.stats.finish_reason
        run.logprobs = list(run.stats.logprobs)  # one per token, stop-string tokens included

    def batches_together(self, configs: Sequence[ModelConfig]) -> bool:
        """Can these experts generate at once? When all are local over one base GGUF that the
        pool loads with continuous batching, under the same adapter set (prompt-only experts,
        or one shared adapter): their decodes then share steps (hublabio.batching). Experts
        with different LoRA adapters cannot share a decode (llama.cpp applies adapters per
        context) and alternating them step by step was slower than one after another (an
        adapter switch every step: docs/BENCHMARKS.md), so they run one after another, as do
        experts on different models (a small budget can then evict one for the next)."""
        load = getattr(self.pool, "load", None)
        if len(configs) < 2 or load is None or getattr(load, "batch_mode", "off") != "continuous":
            return False
        if any(c.type != "gguf" or c.path is None for c in configs):
            return False
        if len({Path(c.path).resolve() for c in configs}) != 1:
            return False
        if len({(c.adapter and Path(c.adapter).resolve(), c.adapter_scale)
                for c in configs}) != 1:
            return False
        return load.for_model(configs[0].inference).parallel >= 2

    def _run_experts(self, chosen, query, history, options, cancel, together: bool):
        """Each chosen expert's whole answer: (cfg, route, run, seconds, error or None), in
        the routing order; at once (a thread each) when `together`, else one after another."""
        def one(cfg, r):
            run, t1 = _Run(), time.perf_counter()
            try:
                for _ in self.stream_expert(cfg, self.messages(cfg, query, history), run,
                                            options=options, cancel=cancel):
                    pass
            except (Cancelled, HublabError) as err:
                return cfg, r, run, time.perf_counter() - t1, err
            return cfg, r, run, time.perf_counter() - t1, None

        if not together:
            for cfg, r in chosen:
                yield one(cfg, r)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(chosen), thread_name_prefix="hublabd-expert") as ex:
            futures = [ex.submit(one, cfg, r) for cfg, r in chosen]
            for f in futures:
                yield f.result()

    def _answer(self, cfg: ModelConfig, route: Route, run: _Run, elapsed: float):
        mean, conf = synth.confidence_from_logprobs(run.logprobs)
        return synth.ExpertAnswer(
            domain=cfg.expert.domain, text="".join(run.texts).strip(), confidence=conf,
            mean_logprob=mean, router_probability=route.probability,
            tokens=run.stats.completion_tokens if run.stats else len(run.texts),
            tokenizer_key=run.tokenizer_key, model=cfg.name, elapsed_s=elapsed)

    def describe_expert(self, cfg: ModelConfig) -> str:
        if cfg.type == "remote":
            return f"{cfg.name} @ {cfg.url}"
        return f"{cfg.name} + {cfg.adapter.name}" if cfg.adapter else cfg.name

    def fuser(self, options=None, cancel=None, runs: list | None = None):
        """`fuse(messages)` for the summarize strategy: the general expert generates."""
        general = self.available().get(FALLBACK_DOMAIN)
        if general is None:
            return None

        def fuse(messages: list[dict]) -> Iterator[str]:
            run = _Run()
            if runs is not None:
                runs.append((general, run))
            for text, _ in self.stream_expert(general, messages, run, options=options,
                                              cancel=cancel):
                yield text

        return fuse

    def query(self, query: str, *, cancel=None, options: Mapping[str, Any] | None = None,
              route: RouteResult | None = None,
              history: Sequence[Mapping[str, str]] = ()) -> Generator[dict, None, dict]:
        """Events (protocol.info / protocol.token dicts) and, as the generator's return value,
        the result: text, synthesis, experts (answers), routes, timings. `history`: the
        conversation before `query` (role/content dicts), given to every expert."""
        t0 = time.perf_counter()
        routed = route or self.route(query)
        t_route = time.perf_counter() - t0
        strategy = self.settings.synthesis
        if strategy == "summarize" and FALLBACK_DOMAIN not in self.available() \
                and len(routed.selected) > 1:
            raise ConfigError(_settings_file(), "[moe] synthesis",
                              "summarize needs an available expert with domain 'general' "
                              "(models/experts/general.toml)")
        chosen = [(self.experts[r.domain], r) for r in routed.selected]
        yield protocol.info("[Router] Selected expert: " + ", ".join(
            f"{r.domain} ({r.probability:.2f})" for r in routed.selected)
            + (" (no expert passed: general answers)" if routed.fallback else ""))
        answers: list[synth.ExpertAnswer] = []
        errors: list[Exception] = []
        runs: list[tuple[ModelConfig, _Run]] = []
        ttft = None

        if len(chosen) == 1:
            cfg, r = chosen[0]
            yield protocol.info(f"[Expert] {r.domain}: {self.describe_expert(cfg)} answering")
            yield protocol.info(f"[Synthesizer] {strategy}: one expert, its answer streams")
            yield protocol.info("")
            run = _Run()
            runs.append((cfg, run))
            t1 = time.perf_counter()
            if strategy == "concatenate":
                yield protocol.token(f"### {r.domain}\n", None)
            for text, lp in self.stream_expert(cfg, self.messages(cfg, query, history), run,
                                               options=options, cancel=cancel):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                yield protocol.token(text, lp)
            self._check_cancel(cancel, run)
            answer = self._answer(cfg, r, run, time.perf_counter() - t1)
            answers.append(answer)
            result = synth.collect(synth.run("best", query, answers))
            result.strategy = strategy
            result.detail = f"{strategy}: one expert ({r.domain}), nothing to combine"
            text = result.text if strategy != "concatenate" else \
                f"### {r.domain}\n{answer.text}"
            result.text = text
        else:
            together = self.batches_together([cfg for cfg, _ in chosen])
            if together:
                yield protocol.info(f"[Experts] {len(chosen)} answer at once (one batched "
                                    "base model)")
            for cfg, r, run, elapsed, err in self._run_experts(chosen, query, history,
                                                                options, cancel, together):
                runs.append((cfg, run))
                if isinstance(err, Cancelled):
                    raise err
                if err is not None:
                    errors.append(err)
                    yield protocol.info(f"[Expert] {r.domain} failed: {err}")
                    continue
                self._check_cancel(cancel, run)
                a = self._answer(cfg, r, run, elapsed)
                answers.append(a)
                yield protocol.info(
                    f"[Expert] {a.domain}: {a.tokens} tokens, confidence "
                    f"{synth.fmt_confidence(a.confidence)}, {a.elapsed_s:.1f} s "
                    f"({self.describe_expert(cfg)})")
            if not answers:
                raise errors[0]
            fuse = self.fuser(options, cancel, runs) if strategy == "summarize" else None
            gen = synth.run(strategy, query, answers, fuse=fuse,
                            confidence_weight=self.settings.confidence_weight)
            if strategy == "summarize" and len(answers) > 1:
                yield protocol.info(f"[Synthesizer] summarize: general fuses "
                                    f"{len(answers)} answers")
                yield protocol.info("")
                while True:
                    try:
                        piece = next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    yield protocol.token(piece, None)
                self._check_cancel(cancel, runs[-1][1])
            else:
                result = synth.collect(gen)
                yield protocol.info(f"[Synthesizer] {result.detail}")
                yield protocol.info("")
                ttft = time.perf_counter() - t0
                yield protocol.token(result.text, None)
        return {
            "text": result.text, "synthesis": result.strategy, "detail": result.detail,
            "chosen": result.chosen, "basis": result.basis,
            "route": routed.as_dict(),
            "experts": [_answer_dict(a) for a in answers],
            "errors": [str(e) for e in errors],
            "route_ms": round(t_route * 1000, 3),
            "ttft_s": ttft, "total_s": time.perf_counter() - t0,
            "generations": [(cfg.name, run.stats) for cfg, run in runs if run.stats is not None],
            # the streamed answer's: one expert's own, or the fusing general expert's
            "finish_reason": runs[-1][1].finish_reason if runs and (
                len(chosen) == 1 or strategy == "summarize") else "stop",
        }

    @staticmethod
    def _check_cancel(cancel, run: _Run) -> None:
        from hublabio.remote import is_cancelled

        if run.finish_reason == "cancelled" or is_cancelled(cancel):
            raise Cancelled("cancelled")

    # ---- introspection -------------------------------------------------------------------
    def experts_status(self) -> list[dict]:
        """Per expert: domain, model, type, adapter, loaded, memory (of its resident model,
        shared by every expert on the same base), missing."""
        resident = {str(r.path.resolve()): r for r in self.pool.resident()}
        rows = []
        for domain, cfg in sorted(self.experts.items()):
            res = resident.get(str(cfg.path.resolve())) if cfg.type == "gguf" and cfg.path \
                and cfg.path.exists() else None
            sharing = sorted(c.expert.domain for c in self.experts.values()
                             if c.type == "gguf" and c.path and cfg.path
                             and c.path.resolve() == cfg.path.resolve())
            adapter_on = bool(res and cfg.adapter
                              and cfg.adapter.resolve() in getattr(res.engine, "adapters", []))
            rows.append({
                "domain": domain, "model": cfg.name, "type": cfg.type,
                "path": str(cfg.path) if cfg.path else cfg.url,
                "adapter": str(cfg.adapter) if cfg.adapter else None,
                "adapter_loaded": adapter_on,
                "loaded": res is not None if cfg.type == "gguf" else None,
                "memory_mb": round(res.mb, 1) if res is not None else None,
                "shared_base_with": [d for d in sharing if d != domain],
                "pinned": cfg.pinned, "missing": cfg.missing,
                "keywords": len(cfg.expert.keywords), "threshold": cfg.expert.threshold,
                "description": cfg.expert.description,
            })
        return rows


def _answer_dict(a: synth.ExpertAnswer) -> dict:
    d = asdict(a)
    d["elapsed_s"] = round(a.elapsed_s, 3)
    return d
