"""Router latency per query: the shipped ONNX router (numpy featurization + onnxruntime, one
thread) against the keyword router, measured interleaved over the labelled query set.

    python bench/bench_router.py [--router models/router] [--data data/router_queries.jsonl]
                                 [--rounds 3]

Prints p50 / p90 / p99 / max per query in microseconds, twice: wall-clock time, and the
calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), which leaves out the time the scheduler gave
to other processes -- on a shared, overloaded machine the wall-clock tail measures the
neighbours, not the router. A third view takes, per query, the fastest of the rounds (wall
clock) before the percentiles: a query's intrinsic cost with preemption filtered out.
Also the share of queries within 1 ms by each clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from hublabio.config import load_experts
from hublabio.router import KeywordRouter, OnnxRouter
from hublabio.router_features import featurize_into

REPO = Path(__file__).resolve().parent.parent


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50": float(np.percentile(us, 50)), "p90": float(np.percentile(us, 90)),
            "p99": float(np.percentile(us, 99)), "max": float(us.max()),
            "mean": float(us.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default=str(REPO / "models" / "router"))
    parser.add_argument("--data", default=str(REPO / "data" / "router_queries.jsonl"))
    parser.add_argument("--models", default=str(REPO / "models"),
                        help="models dir whose experts/*.toml give the keyword router")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")
             if line.strip()]
    onnx = OnnxRouter.load(args.router)
    experts, errors = load_experts(args.models)
    if errors:
        raise SystemExit("; ".join(map(str, errors)))
    keyword = KeywordRouter(experts)
    row = np.zeros(onnx.spec.dim, dtype=np.float32)

    def features_only(text: str) -> None:
        touched = featurize_into(row, text, onnx.spec)
        row[touched] = 0.0

    for text in texts[:200]:  # warm-up: onnxruntime arenas, regex caches
        onnx.score(text)
        keyword.score(text)
    names = ["onnx router (featurize + infer)", "  featurize only", "keyword router"]
    calls = [onnx.score, features_only, keyword.score]
    clocks = {"wall": time.perf_counter_ns, "thread cpu": time.thread_time_ns}
    timings = {(c, n): [] for c in clocks for n in names}
    for _ in range(args.rounds):
        for text in texts:
            for name, call in zip(names, calls):
                w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                call(text)
                c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
                timings[("wall", name)].append(w1 - w0)
                timings[("thread cpu", name)].append(c1 - c0)

    n = len(texts) * args.rounds
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"python {platform.python_version()}; {len(texts)} queries x {args.rounds} rounds, "
          f"interleaved; router {args.router} ({onnx.meta.get('trained', {}).get('parameters')}"
          f" parameters, dim {onnx.spec.dim})")
    print(f"{'clock':10s} {'router':34s} {'p50 us':>8s} {'p90 us':>8s} {'p99 us':>8s} "
          f"{'max us':>9s} {'mean us':>8s}")
    rows = list(timings.items())
    for name in names:  # per query: the fastest round
        per_round = np.asarray(timings[("wall", name)]).reshape(args.rounds, len(texts))
        rows.append((("wall, min", name), per_round.min(axis=0).tolist()))
    for (clock, name), samples in rows:
        p = percentiles(samples)
        print(f"{clock:10s} {name:34s} {p['p50']:8.1f} {p['p90']:8.1f} {p['p99']:8.1f} "
              f"{p['max']:9.1f} {p['mean']:8.1f}")
    for clock in clocks:
        within = np.mean(np.asarray(timings[(clock, names[0])]) <= 1_000_000)
        print(f"onnx router within 1 ms ({clock}): {within * 100:.2f}% of {n} queries")


if __name__ == "__main__":
    main()
