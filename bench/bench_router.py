"""Router latency per query: the shipped ONNX router (numpy featurization + onnxruntime, one
thread) against the keyword router, measured interleaved over the labelled query set.

    python bench/bench_router.py [--router models/router] [--data data/router_queries.jsonl]
                                 [--rounds 3]

Prints a table of p50 / p90 / p99 / max per query in microseconds, and the share of queries
the ONNX router handled within 1 ms.
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
    parser.add_argument("--rounds", type=int, default=3)
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
    timings: dict[str, list[int]] = {"onnx router (featurize + infer)": [],
                                     "  featurize only": [], "keyword router": []}
    clock = time.perf_counter_ns
    for _ in range(args.rounds):
        for text in texts:
            t0 = clock()
            onnx.score(text)
            t1 = clock()
            features_only(text)
            t2 = clock()
            keyword.score(text)
            t3 = clock()
            timings["onnx router (featurize + infer)"].append(t1 - t0)
            timings["  featurize only"].append(t2 - t1)
            timings["keyword router"].append(t3 - t2)

    n = len(texts) * args.rounds
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"python {platform.python_version()}; {len(texts)} queries x {args.rounds} rounds, "
          f"interleaved; router {args.router} ({onnx.meta.get('trained', {}).get('parameters')}"
          f" parameters, dim {onnx.spec.dim})")
    print(f"{'router':34s} {'p50 us':>8s} {'p90 us':>8s} {'p99 us':>8s} {'max us':>9s} "
          f"{'mean us':>8s}")
    for name, samples in timings.items():
        p = percentiles(samples)
        print(f"{name:34s} {p['p50']:8.1f} {p['p90']:8.1f} {p['p99']:8.1f} {p['max']:9.1f} "
              f"{p['mean']:8.1f}")
    within = np.mean(np.asarray(timings["onnx router (featurize + infer)"]) <= 1_000_000)
    print(f"onnx router within 1 ms: {within * 100:.2f}% of {n} queries")


if __name__ == "__main__":
    main()
