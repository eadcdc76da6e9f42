"""Do the experts answer better? Mean log-probability of held-out references, per domain.

usage: python bench/bench_quality.py [--experts-dir runs/experts] [--per-domain 20]
                                     [--max-tokens 48] [--threads N] [--seed 0]

Held-out references (never trained on; prepare-data --docs split them by page):
- per domain with docs (data/experts/<domain>/docs_heldout.jsonl, written by the recipe in
  models/experts/README.md): up to --per-domain documentation chunks, each turned into
  question = its heading lines ("# page", "## section"), reference = the rest; and up to
  --per-domain question-answer pairs from held-out FAQ pages;
- general: tools/data/expert_general.jsonl (question-answer pairs no expert trains on).
Every reference is scored as the assistant turn after [system prompt, question] in the base's
chat template (as the device sends it), mean log-probability per reference token, under:
  base+general   the base model with the general expert's system prompt
  base+domain    the base model with the domain's system prompt
  expert         the domain's adapter (EXPERTS_DIR/experts/<domain>.lora.gguf) + its prompt
  moe single     the router's first choice for the question (model and prompt)
  moe topk2      the shipped default: the router's two experts answer (--max-tokens greedy
                 tokens), `best` picks one by the posterior; the reference is scored under it
The MoE columns also give the time the path spends per question (topk2 generates both answers).
Goal (issue 13): expert >= 15 % lower log-loss than base+domain on its domain, <= 3 % higher
on general; MoE-R topk2 better than base+general on the mixed set, never > 2 % worse on general.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from hublabio import synth  # noqa: E402
from hublabio.bare_experts import DOMAINS_FILE  # noqa: E402
from hublabio.moe import MoE, MoESettings  # noqa: E402
from hublabio.paths import embedded_model_path  # noqa: E402
from hublabio.pool import LoadSettings, ModelPool  # noqa: E402
from hublabio_tools.common import load_toml  # noqa: E402
from hublabio_tools.data import load_chat_format  # noqa: E402
from hublabio_tools.llama_context import LlamaModel  # noqa: E402

N_CTX = 1024


def load_items(domain: str, per_domain: int, seed: int) -> list[dict]:
    """[{domain, kind, question, reference}] for one domain (empty without held-out data)."""
    rng = random.Random(seed)
    if domain == "general":
        rows = [json.loads(l) for l in (ROOT / "tools/data/expert_general.jsonl").open()]
        items = [{"domain": domain, "kind": "qa", "question": r["prompt"],
                  "reference": r["response"]} for r in rows if "prompt" in r]
        rng.shuffle(items)
        return items[:per_domain]
    path = ROOT / "data" / "experts" / domain / "docs_heldout.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(l) for l in path.open()]
    chunks, pairs = [], []
    for r in rows:
        if r["kind"] == "qa":
            pairs.append({"domain": domain, "kind": "qa", "question": r["prompt"],
                          "reference": r["response"]})
            continue
        lines = r["text"].split("\n\n")
        head = [l for l in lines[:2] if l.startswith("#")]
        body = "\n\n".join(lines[len(head):]).strip()
        if head and len(body) >= 100:
            chunks.append({"domain": domain, "kind": "doc", "question": "\n".join(head),
                           "reference": body})
    rng.shuffle(chunks)
    rng.shuffle(pairs)
    return chunks[:per_domain] + pairs[:per_domain]


class Scorer:
    """Mean log-probability of a reference answer after [system, user] in the chat template."""

    def __init__(self, base: Path, threads: int):
        self.fmt = load_chat_format(str(base))
        self.base = base
        self.threads = threads
        self.models: dict[str | None, LlamaModel] = {}

    def model(self, adapter: Path | None) -> LlamaModel:
        key = None if adapter is None else str(adapter)
        if key not in self.models:
            self.models[key] = LlamaModel(self.base, n_ctx=N_CTX, threads=self.threads,
                                          lora=adapter)
        return self.models[key]

    def score(self, item: dict, system: str, adapter: Path | None) -> float:
        m = self.model(adapter)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": item["question"]}]
        prompt = self.fmt.render(messages, add_generation_prompt=True)
        p_ids = m.tokenize(prompt, special=True)
        full = m.tokenize(prompt + item["reference"], special=True)[:N_CTX]
        first = len(p_ids)
        if first >= len(full) - 1:
            raise ValueError("reference does not fit the context")
        logits = m.logits(full, first=first - 1)[:-1].astype(np.float64)
        targets = full[first:]
        mx = logits.max(axis=1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
        return float(np.mean(logits[np.arange(len(targets)), targets] - lse))

    def close(self):
        for m in self.models.values():
            m.close()


def moe_choice(moe: MoE, question: str, routing: str, max_tokens: int) -> tuple[str, float]:
    """(domain the MoE-R path shows, seconds it took)."""
    t0 = time.perf_counter()
    if routing == "single":
        route = moe.route(question)
        return route.selected[0].domain, time.perf_counter() - t0
    result = synth.collect(moe.query(question, options={"max_tokens": max_tokens,
                                                         "temperature": 0.0}))
    return result["chosen"][0], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts-dir", default=str(ROOT / "models"),
                    help="models dir whose experts/ holds the adapters and TOMLs")
    ap.add_argument("--per-domain", type=int, default=20)
    ap.add_argument("--domains", help="comma-separated subset of the domains to score")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every score here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    base = Path(embedded_model_path())
    domains = load_toml(DOMAINS_FILE)
    experts_dir = Path(args.experts_dir)
    adapters = {d: experts_dir / "experts" / f"{d}.lora.gguf" for d in domains
                if (experts_dir / "experts" / f"{d}.lora.gguf").exists()}
    pool = ModelPool(4096, load=LoadSettings(threads=args.threads))
    moe, warnings = MoE.from_models_dir(pool, experts_dir, MoESettings())
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    # the router always comes from the shipped models/router
    moe.router = MoE.from_models_dir(pool, ROOT / "models", MoESettings())[0].router
    scorer = Scorer(base, args.threads)
    general_prompt = domains["general"]["system_prompt"]
    rows = []
    wanted = args.domains.split(",") if args.domains else list(domains)
    for domain in wanted:
        if domain not in domains:
            raise SystemExit(f"--domains: unknown domain {domain!r}; known: {', '.join(domains)}")
    for domain in wanted:
        for item in load_items(domain, args.per_domain, args.seed):
            prompt = domains[domain]["system_prompt"]
            r = dict(item)
            r["base_general"] = scorer.score(item, general_prompt, None)
            r["base_domain"] = scorer.score(item, prompt, None)
            r["expert"] = scorer.score(item, prompt, adapters.get(domain)) \
                if domain in adapters else None
            if domain == "general":  # what each adapter costs on text off its domain
                r["adapters_on_general"] = {
                    d: [scorer.score(item, domains[d]["system_prompt"], None),
                        scorer.score(item, domains[d]["system_prompt"], a)]
                    for d, a in adapters.items()}
            for routing in ("single", "topk2"):
                chosen, seconds = moe_choice(moe, item["question"], routing, args.max_tokens)
                r[f"moe_{routing}_domain"] = chosen
                r[f"moe_{routing}_s"] = seconds
                r[f"moe_{routing}"] = scorer.score(item, domains[chosen]["system_prompt"],
                                                   adapters.get(chosen))
            rows.append(r)
            print(f"{domain} {item['kind']}: base {r['base_domain']:.3f} "
                  f"expert {r['expert'] if r['expert'] is None else round(r['expert'], 3)} "
                  f"moe {r['moe_topk2']:.3f} ({r['moe_topk2_domain']})", file=sys.stderr)
    scorer.close()
    pool.close()
    report(rows, adapters, args, time.perf_counter() - t_start)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def _gain(new, old):
    """Relative log-loss change, negative = better: (-new) / (-old) - 1."""
    return "n/a" if new is None or old is None else f"{(new / old - 1) * 100:+.1f} %"


def report(rows, adapters, args, seconds):
    print(f"\nbench_quality: {len(rows)} held-out references, --per-domain {args.per_domain}, "
          f"topk2 answers {args.max_tokens} greedy tokens, {args.threads} threads, "
          f"{seconds:.0f} s; adapters: {', '.join(sorted(adapters)) or 'none'}\n")
    print("Mean log-prob per reference token (higher is better); change = relative log-loss "
          "change against the first column it names (negative = better).\n")
    print("| set | n | base+general | base+domain | expert | expert vs base+domain | "
          "moe single | moe topk2 | topk2 vs base+general |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    groups = {}
    for r in rows:
        groups.setdefault(f"{r['domain']} {r['kind']}", []).append(r)
    groups["mixed (all)"] = rows
    for name, rs in groups.items():
        bg = _mean(rs, "base_general")
        bd = _mean(rs, "base_domain")
        ex = _mean(rs, "expert")
        bd_ex = _mean([r for r in rs if r["expert"] is not None], "base_domain")
        ms = _mean(rs, "moe_single")
        mt = _mean(rs, "moe_topk2")
        print(f"| {name} | {len(rs)} | {_fmt(bg)} | {_fmt(bd)} | {_fmt(ex)} | "
              f"{_gain(ex, bd_ex)} | {_fmt(ms)} | {_fmt(mt)} | {_gain(mt, bg)} |")
    single_s = _mean(rows, "moe_single_s")
    topk_s = _mean(rows, "moe_topk2_s")
    ms = _mean(rows, "moe_single")
    mt = _mean(rows, "moe_topk2")
    print(f"\nTopK(2) vs Single on the mixed set: log-prob {_fmt(mt)} vs {_fmt(ms)} "
          f"({_gain(mt, ms)}), time to choose {topk_s:.2f} s vs {single_s * 1000:.1f} ms per "
          "question (topk2 generates both answers; single only routes)")
    general = [r for r in rows if r["domain"] == "general"]
    if adapters and general:
        print("\nEach adapter on the general references (its own system prompt, base vs adapter; "
              "goal: <= 3 % more log-loss):\n")
        print("| adapter | n | base | adapter | change |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for d in sorted(adapters):
            pairs = [r["adapters_on_general"][d] for r in general]
            b_, a_ = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
            print(f"| {d} | {len(pairs)} | {b_:.3f} | {a_:.3f} | {_gain(a_, b_)} |")


if __name__ == "__main__":
    raise SystemExit(main())
