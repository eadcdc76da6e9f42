"""Fit the synthesizer's confidence weight (beta, `[moe] confidence_weight`) on real answers.

usage: python bench/calibrate_synthesis.py [--per-domain 12] [--max-tokens 48] [--threads N]
                                           [--models-dir models] [--json OUT.json]

The questions are the router's held-out split of data/router_queries.jsonl (seed 0, 20 %, as
`hublab-tools train-router` draws it), so the router never saw them; --per-domain of them per
domain (seeded). Each goes through the shipped MoE-R path at the default routing (topk 2) with
greedy decoding: the two routed experts answer, and their router probabilities p_i and mean
token log-probabilities l_i are recorded. For the questions whose labelled domain is among the
two, beta is the value in [0, 1] that maximises the likelihood of the labelled domain under
post_i = softmax_i(log p_i + beta * l_i) (hublabio.synth.posterior). Printed: the fitted beta
(and the unconstrained optimum up to 4), the share of questions where each rule shows the
labelled domain's answer (router alone, confidence alone as the old `best` did, the fit, the
shipped default), the log-loss of each, and the expected calibration error of the posterior
(10 equal-width bins of the top posterior against whether its domain is the labelled one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from hublabio import synth  # noqa: E402
from hublabio.moe import MoE, MoESettings  # noqa: E402
from hublabio.pool import LoadSettings, ModelPool  # noqa: E402
from hublabio_tools.router_train import read_examples, stratified_split  # noqa: E402


def held_out_questions(path: Path, per_domain: int, seed: int) -> list[tuple[str, str]]:
    examples = read_examples(path)
    domains = sorted({e.domain for e in examples})
    labels = np.array([domains.index(e.domain) for e in examples])
    _, held = stratified_split(labels, len(domains), 0.2, 0)
    by_domain: dict[str, list[str]] = {d: [] for d in domains}
    for i in held:
        by_domain[examples[i].domain].append(examples[i].text)
    rng = random.Random(seed)
    out = []
    for d in domains:
        rng.shuffle(by_domain[d])
        out += [(q, d) for q in by_domain[d][:per_domain]]
    return out


def posterior_of(case: dict, beta: float) -> np.ndarray:
    return np.array(synth.posterior(case["answers"], beta)[0])


def log_loss(cases: list[dict], beta: float) -> float:
    return -float(np.mean([math.log(max(posterior_of(c, beta)[c["true"]], 1e-12))
                           for c in cases]))


def accuracy(cases: list[dict], pick) -> float:
    return float(np.mean([pick(c) == c["true"] for c in cases]))


def ece(cases: list[dict], beta: float, bins: int = 10) -> float:
    conf, right = [], []
    for c in cases:
        post = posterior_of(c, beta)
        conf.append(float(post.max()))
        right.append(float(int(post.argmax()) == c["true"]))
    conf, right = np.array(conf), np.array(right)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - right[inside].mean())
    return total


def collect(args) -> tuple[list[dict], list[dict]]:
    pool = ModelPool(4096, load=LoadSettings(threads=args.threads))
    moe, warnings = MoE.from_models_dir(pool, args.models_dir, MoESettings())
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    questions = held_out_questions(ROOT / "data" / "router_queries.jsonl", args.per_domain,
                                   args.seed)
    options = {"max_tokens": args.max_tokens, "temperature": 0.0}
    records, cases = [], []
    for n, (q, domain) in enumerate(questions, 1):
        answers = synth.collect(moe.query(q, options=options))["experts"]
        rec = {"question": q, "domain": domain,
               "answers": [{k: a[k] for k in ("domain", "router_probability", "mean_logprob",
                                              "confidence", "tokens")} for a in answers]}
        records.append(rec)
        names = [a["domain"] for a in answers]
        if len(answers) >= 2 and domain in names and all(
                a["mean_logprob"] is not None for a in answers):
            cases.append({"answers": [synth.ExpertAnswer(**a) for a in answers],
                          "true": names.index(domain)})
        if n % 10 == 0:
            print(f"{n}/{len(questions)} questions", file=sys.stderr)
    pool.close()
    return records, cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-domain", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the answers' numbers and the fit here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    records, cases = collect(args)
    if not cases:
        print("no question had its labelled domain among two answers: nothing to fit")
        return 1
    grid = np.round(np.arange(0, 4.0001, 0.01), 2)
    losses = [log_loss(cases, b) for b in grid]
    free = float(grid[int(np.argmin(losses))])
    inside = grid <= 1.0
    fitted = float(grid[inside][int(np.argmin(np.array(losses)[inside]))])
    default = synth.DEFAULT_CONFIDENCE_WEIGHT
    rules = [
        ("router alone (beta 0)", 0.0, lambda c: int(np.argmax([a.router_probability for a in c["answers"]]))),
        ("confidence alone (the old `best`)", None, lambda c: int(np.argmax([a.mean_logprob for a in c["answers"]]))),
        (f"fitted beta {fitted:g}", fitted, lambda c: int(np.argmax(posterior_of(c, fitted)))),
        (f"shipped default beta {default:g}", default,
         lambda c: int(np.argmax(posterior_of(c, default)))),
    ]
    print(f"\n{len(records)} held-out questions, {len(cases)} with the labelled domain among the "
          f"two answers; {args.max_tokens}-token greedy answers, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s\n")
    print("| rule | labelled domain's answer shown | log-loss | ECE |")
    print("| --- | ---: | ---: | ---: |")
    for name, beta, pick in rules:
        ll = "n/a" if beta is None else f"{log_loss(cases, beta):.3f}"
        e = "n/a" if beta is None else f"{ece(cases, beta):.3f}"
        print(f"| {name} | {accuracy(cases, pick):.3f} | {ll} | {e} |")
    print(f"\nmaximum-likelihood beta in [0, 1]: {fitted:g}; unconstrained in [0, 4]: {free:g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"fitted": fitted, "unconstrained": free,
                                               "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
