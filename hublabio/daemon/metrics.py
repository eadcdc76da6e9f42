"""What the daemon counts about generations, and its Prometheus text (GET /metrics).

`GenerationMetrics.record(model, stats)` takes every finished generation (hublabio.engine's
GenerationStats): totals, per-model counters, and histograms of time to first token and
generation speed. `prometheus(stats, http_counts, queue)` writes the text format with
llama-server's metric names where llama-server has one (`llamacpp:prompt_tokens_total`,
`llamacpp:tokens_predicted_total`, ... — dashboards made for it work here) and `hublab_*` for
the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), then +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1


@dataclass
class GenerationMetrics:
    prompt_tokens: int = 0            # evaluated (not from the cache)
    prompt_tokens_cached: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    predicted_seconds: float = 0.0
    by_model: dict = field(default_factory=dict)  # name -> {generations, prompt_tokens, ...}
    ttft_s: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    tokens_per_s: Histogram = field(default_factory=lambda: Histogram(TPS_BUCKETS))

    def record(self, model: str, stats) -> None:
        evaluated = max(0, stats.prompt_tokens - stats.cached_tokens)
        self.prompt_tokens += evaluated
        self.prompt_tokens_cached += stats.cached_tokens
        if stats.prompt_tps and evaluated:
            self.prompt_seconds += evaluated / stats.prompt_tps
        self.tokens_predicted += stats.completion_tokens
        if stats.gen_tps and stats.completion_tokens:
            self.predicted_seconds += stats.completion_tokens / stats.gen_tps
            self.tokens_per_s.observe(stats.gen_tps)
        if stats.completion_tokens:
            self.ttft_s.observe(stats.ttft_s)
        row = self.by_model.setdefault(model, {"generations": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0})
        row["generations"] += 1
        row["prompt_tokens"] += stats.prompt_tokens
        row["completion_tokens"] += stats.completion_tokens


def prometheus(s: dict, http_counts: dict, running: int, waiting: int) -> str:
    """The text format for the `stats` op's data `s` (its "metrics" is a GenerationMetrics
    as a dict), the HTTP request counts {(path, status): n} and the queue."""
    out: list[str] = []

    def metric(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def histogram(name, help_, h: dict):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        total = 0
        for bound, n in zip(list(h["buckets"]) + ["+Inf"], h["counts"]):
            total += n
            le = bound if bound == "+Inf" else _num(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out.append(f"{name}_sum {_num(h['sum'])}")
        out.append(f"{name}_count {h['count']}")

    m = s["metrics"]
    # llama-server's names
    metric("llamacpp:prompt_tokens_total", "counter",
           "Number of prompt tokens processed, excluding cached tokens", [({}, m["prompt_tokens"])])
    metric("llamacpp:prompt_tokens_cached_total", "counter",
           "Number of prompt tokens reused from the cache", [({}, m["prompt_tokens_cached"])])
    metric("llamacpp:prompt_seconds_total", "counter", "Total time spent processing prompts",
           [({}, m["prompt_seconds"])])
    metric("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed",
           [({}, m["tokens_predicted"])])
    metric("llamacpp:tokens_predicted_seconds_total", "counter",
           "Total time spent generating tokens", [({}, m["predicted_seconds"])])
    metric("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s",
           [({}, m["prompt_tokens"] / m["prompt_seconds"] if m["prompt_seconds"] else 0.0)])
    metric("llamacpp:predicted_tokens_seconds", "gauge",
           "Average generation throughput in tokens/s",
           [({}, m["tokens_predicted"] / m["predicted_seconds"] if m["predicted_seconds"]
             else 0.0)])
    metric("llamacpp:requests_processing", "gauge", "Number of requests processing",
           [({}, running)])
    metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred", [({}, waiting)])
    # hublabio's own
    histogram("hublab_time_to_first_token_seconds", "Time to the first token of an answer.",
              m["ttft_s"])
    histogram("hublab_generation_tokens_per_second", "Generation speed of an answer.",
              m["tokens_per_s"])
    per_model = sorted(m["by_model"].items())
    for key, help_ in (("generations", "Completed generations, by model."),
                       ("prompt_tokens", "Prompt tokens (cached included), by model."),
                       ("completion_tokens", "Tokens generated, by model.")):
        metric(f"hublab_model_{key}_total", "counter", help_,
               [({"model": name}, row[key]) for name, row in per_model] or [({}, 0)])
    metric("hublab_requests_total", "counter", "Requests handled by the daemon, by op.",
           [({"op": op}, n) for op, n in sorted(s["by_op"].items())] or [({}, 0)])
    metric("hublab_request_errors_total", "counter", "Requests that ended in an error.",
           [({}, s["errors"])])
    metric("hublab_generations_total", "counter", "Completed generations.",
           [({}, s["generations"])])
    metric("hublab_prompt_tokens_total", "counter", "Prompt tokens processed.",
           [({}, s["prompt_tokens"])])
    metric("hublab_tokens_generated_total", "counter", "Tokens generated.",
           [({}, s["completion_tokens"])])
    metric("hublab_last_tokens_per_second", "gauge", "Generation speed of the last answer.",
           [({}, s["last_tps"] or 0.0)])
    metric("hublab_last_ttft_seconds", "gauge", "Time to first token of the last answer.",
           [({}, s["last_ttft_s"] or 0.0)])
    metric("hublab_memory_used_bytes", "gauge", "Estimated memory of the loaded models.",
           [({}, s["used_mb"] * 1048576)])
    metric("hublab_memory_budget_bytes", "gauge", "Memory budget for models.",
           [({}, s["budget_mb"] * 1048576)])
    metric("hublab_models_loaded", "gauge", "Models resident in memory.",
           [({}, len(s["resident"]))])
    metric("hublab_model_loaded", "gauge", "1 for each resident model (by config name).",
           [({"model": n, "n_ctx": r["n_ctx"]}, 1) for r in s["resident"] for n in r["names"]])
    metric("hublab_queue_running", "gauge", "Queued-op requests running now.", [({}, running)])
    metric("hublab_queue_waiting", "gauge", "Requests waiting in the queue.", [({}, waiting)])
    metric("hublab_http_requests_total", "counter", "HTTP requests by path and status.",
           [({"path": p, "code": c}, n) for (p, c), n in sorted(http_counts.items())])
    metric("hublab_uptime_seconds", "gauge", "Seconds since the daemon started.",
           [({}, s["uptime_s"])])
    return "\n".join(out) + "\n"


def _esc(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
