"""MoE-R benchmarks, each against its alternative in the same run (interleaved where timed).

usage: python bench/bench_moe.py [--runs N] [--threads N] [--only overhead,switch,rss]

1. overhead: time to first token of `moe.query` through the daemon's op layer (Service.run:
   settings read, router, strategy, pool lease, adapter, chat template) vs the chosen expert's
   own engine.generate on the same warm engine, same adapter, distinct questions of equal shape
   (so neither side hits the other's prompt cache). Goal: median difference <= 10 ms.
2. switch: switching the live context between two LoRA adapter experts (llama_set_adapters_lora,
   and a whole request's time to first token after a switch) vs a full model reload (close,
   Engine(path) + adapter load, first token). Goal: switch <= 50 ms.
3. rss: resident memory of five experts sharing one base with five LoRA adapters vs five
   separate copies of the GGUF (copied to tmp so mmap cannot share pages) vs the base alone,
   each in a fresh process after one decode per expert. Goal: shared <= 1.2x base alone.
   The adapters are written by hublab-tools convert-lora from random peft adapters of
   train-expert's default shape and type (hublabio_tools.experts EXPERT_*: r 8 on q,k,v,o, F16),
   of r 16 on q,k,v,o F16, and of finetune's seed default (r 64 on all seven projections, F32).
Prints a markdown table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from integration.lora_fixture import make_lora_adapter  # noqa: E402

from hublabio.paths import embedded_model_path  # noqa: E402

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_NAME = dict(zip(ALL_PROJ, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                "ffn_down")))
QUESTIONS = [f"In python, how do I {verb} a {noun}?" for verb, noun in [
    ("sort", "list"), ("reverse", "string"), ("copy", "dict"), ("merge", "dataframe"),
    ("read", "file"), ("parse", "date"), ("join", "path"), ("split", "string"),
    ("filter", "list"), ("flatten", "list"), ("count", "word"), ("round", "float"),
    ("print", "table"), ("open", "socket"), ("zip", "tuple"), ("sum", "column"),
    ("slice", "array"), ("format", "number"), ("hash", "password"), ("encode", "URL"),
    ("load", "JSON"), ("dump", "YAML"), ("sleep", "second"), ("find", "substring"),
    ("strip", "line"), ("map", "function"), ("shuffle", "list"), ("compare", "set"),
    ("time", "function"), ("test", "class"), ("mock", "request"), ("log", "error"),
    ("cache", "result"), ("type", "variable"), ("raise", "exception"), ("catch", "KeyError"),
    ("import", "module"), ("install", "package"), ("freeze", "set"), ("batch", "iterator"),
]]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def write_expert(folder: Path, base: Path, domain: str, adapter: Path | None, threads: int):
    import tomllib

    import tomli_w

    data = tomllib.loads((ROOT / "models/experts" / f"{domain}.toml").read_text())
    data["model"]["path"] = str(base)
    if adapter is not None:
        data["model"]["adapter"] = str(adapter)
    data["inference"].update(max_tokens=1, context_size=512, threads=threads, temperature=0.0)
    (folder / f"{domain}.toml").write_text(tomli_w.dumps(data))


# ------------------------------------------------------------------ 1. orchestration overhead

def bench_overhead(base: Path, tmp: Path, runs: int, threads: int) -> dict:
    from hublabio.config import DaemonSettings
    from hublabio.daemon.service import Service
    from hublabio.engine import SamplingOptions

    models = tmp / "models"
    (models / "experts").mkdir(parents=True)
    adapters = {}
    for i, domain in enumerate(("python", "rust", "system", "ai", "general")):
        adapters[domain] = make_lora_adapter(base, models / "experts" / f"{domain}.lora.gguf",
                                             seed=i + 1)
        write_expert(models / "experts", base, domain, adapters[domain], threads)
    router_src = ROOT / "models" / "router"
    if (router_src / "router.onnx").exists():
        shutil.copytree(router_src, models / "router")
    os.environ["HUBLAB_STATE_DIR"] = str(tmp / "state")
    (tmp / "state").mkdir()
    (tmp / "state" / "settings.toml").write_text('[moe]\nrouting = "single"\nsynthesis = "best"\n')
    svc = Service(DaemonSettings(models_dir=models, budget_mb=2048, threads=threads,
                                 idle_ttl_s=0))
    routed = svc.call("moe.route", query=QUESTIONS[0])
    assert routed["selected"][0]["domain"] == "python", routed
    cfg = next(e for e in __import__("hublabio.config", fromlist=["x"]).load_experts(models)[0]
               if e.expert.domain == "python")
    opts = SamplingOptions(max_tokens=1, temperature=0.0)
    msgs = lambda q: [{"role": "system", "content": cfg.inference.system_prompt},  # noqa: E731
                      {"role": "user", "content": q}]

    def direct(q):
        with svc.pool.acquire(cfg, n_ctx=512) as engine:
            t0 = time.perf_counter()
            for _ in engine.generate(msgs(q), opts, adapter=cfg.adapter):
                return time.perf_counter() - t0

    # The expert's own time to first token inside the same moe request: from the first next()
    # on engine.generate to its first token. moe TTFT minus this is the orchestration overhead
    # of that very request (robust to the noise that moves whole requests on a shared machine).
    import hublabio.engine as engine_mod

    original = engine_mod.Engine.generate
    inner_ttft: list[float] = []

    def timed_generate(self, *a, **k):
        t_start = time.perf_counter()
        for n, tok in enumerate(original(self, *a, **k)):
            if n == 0:
                inner_ttft.append(time.perf_counter() - t_start)
            yield tok

    engine_mod.Engine.generate = timed_generate

    def moe(q):
        t0 = time.perf_counter()
        first = None
        for ev in svc.run("moe.query", {"query": q, "options": {"max_tokens": 1,
                                                                "temperature": 0.0}}):
            if ev["type"] == "token" and first is None:
                first = time.perf_counter() - t0
            if ev["type"] == "error":
                raise RuntimeError(ev)
        return first

    def route_only(q):
        t0 = time.perf_counter()
        svc.call("moe.route", query=q)
        return time.perf_counter() - t0

    direct(QUESTIONS[-1])
    moe(QUESTIONS[-2])  # warm: engine loaded, adapters loaded, caches filled
    d, m, r, inner = [], [], [], []
    qs = QUESTIONS[: 2 * runs] if 2 * runs <= len(QUESTIONS) else QUESTIONS * (2 * runs // len(QUESTIONS) + 1)
    for i in range(runs):
        a, b = qs[2 * i], qs[2 * i + 1]
        if i % 2:
            m.append(moe(a)); inner.append(inner_ttft[-1]); d.append(direct(b))
        else:
            d.append(direct(a)); m.append(moe(b)); inner.append(inner_ttft[-1])
        r.append(route_only(a))
    diffs = [x - y for x, y in zip(m, d)]
    own = [x - y for x, y in zip(m, inner)]
    engine_mod.Engine.generate = original
    svc.close()
    return {"router": "onnx" if (models / "router" / "router.onnx").exists() else "keyword",
            "direct_ms": med(d) * 1e3, "moe_ms": med(m) * 1e3,
            "overhead_ms": med(diffs) * 1e3, "overhead_p90_ms": p90(diffs) * 1e3,
            "route_op_ms": med(r) * 1e3, "runs": runs, "inner_ms": med(inner) * 1e3,
            "own_overhead_ms": med(own) * 1e3, "own_overhead_p90_ms": p90(own) * 1e3}


# ------------------------------------------------------------------ 2. adapter switch vs reload

def bench_switch(base: Path, tmp: Path, runs: int, threads: int) -> dict:
    from hublabio.engine import Engine, SamplingOptions

    a = make_lora_adapter(base, tmp / "a.lora.gguf", seed=1)
    b = make_lora_adapter(base, tmp / "b.lora.gguf", seed=2)
    opts = SamplingOptions(max_tokens=1, temperature=0.0)
    msgs = [{"role": "user", "content": "What is a Python list?"}]

    def first_token(engine, adapter):
        t0 = time.perf_counter()
        for _ in engine.generate(msgs, opts, adapter=adapter):
            break
        return time.perf_counter() - t0

    engine = Engine(base, n_ctx=512, threads=threads)
    engine.load_adapter(a)
    engine.load_adapter(b)
    first_token(engine, a)
    switch, switch_ttft, same_ttft, reload_, reload_ttft = [], [], [], [], []
    for i in range(runs):
        target = b if i % 2 == 0 else a
        t0 = time.perf_counter()
        engine._use_adapter(target, 1.0)  # the switch itself: llama_set_adapters_lora
        switch.append(time.perf_counter() - t0)
        engine._use_adapter(a if target == b else b, 1.0)
        switch_ttft.append(first_token(engine, target))  # switch + prompt re-evaluated
        same_ttft.append(first_token(engine, target))    # same adapter: prompt cache hit
        t0 = time.perf_counter()
        engine.close()
        engine = Engine(base, n_ctx=512, threads=threads)
        engine.load_adapter(a)
        engine.load_adapter(b)
        reload_.append(time.perf_counter() - t0)
        reload_ttft.append(reload_[-1] + first_token(engine, target))
    engine.close()
    return {"switch_ms": med(switch) * 1e3, "switch_p90_ms": p90(switch) * 1e3,
            "switch_ttft_ms": med(switch_ttft) * 1e3, "same_ttft_ms": med(same_ttft) * 1e3,
            "reload_ms": med(reload_) * 1e3, "reload_ttft_ms": med(reload_ttft) * 1e3,
            "runs": runs}


# ------------------------------------------------------------------ 3. RSS

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def rss_child(mode: str, files: list[str], threads: int) -> None:
    """Runs in a fresh process: load, one decode per expert, print RSS growth as JSON."""
    from hublabio.engine import Engine, SamplingOptions

    opts = SamplingOptions(max_tokens=1, temperature=0.0)
    msgs = [{"role": "user", "content": "Hello"}]
    before = rss_mb()
    engines = []
    if mode == "base":
        engines.append(Engine(files[0], n_ctx=512, threads=threads))
        list(engines[0].generate(msgs, opts))
    elif mode == "shared":
        e = Engine(files[0], n_ctx=512, threads=threads)
        engines.append(e)
        for adapter in files[1:]:
            list(e.generate(msgs, opts, adapter=adapter))
    elif mode == "separate":
        for f in files:
            e = Engine(f, n_ctx=512, threads=threads)
            engines.append(e)
            list(e.generate(msgs, opts))
    print(json.dumps({"mode": mode, "rss_mb": rss_mb() - before}))


def run_child(mode: str, files: list[Path], threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--threads",
                          str(threads), *map(str, files)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]


def peft_adapter_gguf(base: Path, out: Path, *, rank: int, alpha: float, targets, outtype: str,
                      seed: int) -> Path:
    """A random peft-layout LoRA (numpy + safetensors, no torch) for the GGUF `base`, converted by
    hublab-tools convert-lora exactly as train-expert converts a trained one."""
    import gguf
    from safetensors.numpy import save_file

    from hublabio_tools.convert_lora import convert_lora

    reader = gguf.GGUFReader(str(base))
    shapes = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors if len(t.shape) == 2}
    n_layers = int(reader.fields["llama.block_count"].contents())
    rng = np.random.default_rng(seed)
    tensors = {}
    for il in range(n_layers):
        for t in targets:
            n_in, n_out = shapes[f"blk.{il}.{GGUF_NAME[t]}.weight"]
            prefix = f"base_model.model.model.layers.{il}.{'mlp' if t in ALL_PROJ[4:] else 'self_attn'}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, n_in ** -0.5, (rank, n_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (n_out, rank)).astype(np.float32)
    peft_dir = out.with_suffix(".peft")
    peft_dir.mkdir()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
         "target_modules": list(targets)}))
    return convert_lora(peft_dir, base, out, outtype=outtype, log=lambda *_: None)


def bench_rss(base: Path, tmp: Path, threads: int) -> dict:
    from hublabio_tools.experts import EXPERT_ALPHA, EXPERT_OUTTYPE, EXPERT_RANK, EXPERT_TARGETS

    kinds = {  # name: (rank, alpha, targets, outtype)
        "expert_default": (EXPERT_RANK, EXPERT_ALPHA, EXPERT_TARGETS, EXPERT_OUTTYPE),
        "r16_attn_f16": (16, 32.0, EXPERT_TARGETS, "f16"),
        "seed_default": (64, 128.0, ALL_PROJ, "f32"),
    }
    adapters = {name: [peft_adapter_gguf(base, tmp / f"{name}{i}.lora.gguf", rank=k[0], alpha=k[1],
                                         targets=k[2], outtype=k[3], seed=i) for i in range(5)]
                for name, k in kinds.items()}
    copies = []
    for i in range(5):
        dst = tmp / f"copy{i}.gguf"
        shutil.copyfile(base, dst)
        copies.append(dst)
    out = {"base": run_child("base", [base], threads), "kinds": kinds,
           "separate": run_child("separate", copies, threads)}
    out["one_default"] = run_child("shared", [base, adapters["expert_default"][0]], threads)
    for name, files in adapters.items():
        out[name] = run_child("shared", [base, *files], threads)
        out[name + "_mb"] = files[0].stat().st_size / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="overhead,switch,rss")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.files, args.threads)
        return
    base = embedded_model_path()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_moe") as d:
        tmp = Path(d)
        if "overhead" in parts:
            (tmp / "o").mkdir()
            r = bench_overhead(base, tmp / "o", args.runs, args.threads)
            print(f"\n### Orchestration overhead ({r['runs']} runs each, interleaved, "
                  f"{r['router']} router, routing single, synthesis best)\n")
            print("| path | median TTFT ms |\n| --- | ---: |")
            print(f"| expert's engine.generate directly | {r['direct_ms']:.1f} |")
            print(f"| moe.query via the daemon op layer | {r['moe_ms']:.1f} |")
            print(f"| moe.query minus direct (median of interleaved pairs) | "
                  f"{r['overhead_ms']:.2f} (p90 {r['overhead_p90_ms']:.2f}) |")
            print(f"| the expert's own TTFT inside the moe requests | {r['inner_ms']:.1f} |")
            print(f"| **overhead: moe TTFT minus its expert's own TTFT, same request** | "
                  f"**{r['own_overhead_ms']:.2f}** (p90 {r['own_overhead_p90_ms']:.2f}) |")
            print(f"| moe.route op alone | {r['route_op_ms']:.2f} |")
        if "switch" in parts:
            (tmp / "s").mkdir()
            r = bench_switch(base, tmp / "s", args.runs, args.threads)
            print(f"\n### Adapter switch vs full reload ({r['runs']} runs, median)\n")
            print("| operation | ms |\n| --- | ---: |")
            print(f"| switch adapters on the live context (llama_set_adapters_lora) | "
                  f"{r['switch_ms']:.3f} (p90 {r['switch_p90_ms']:.3f}) |")
            print(f"| reload: close + load base + 2 adapters | {r['reload_ms']:.1f} |")
            print(f"| first token after a switch (prompt re-evaluated) | {r['switch_ttft_ms']:.1f} |")
            print(f"| first token, same adapter again (prompt cached) | {r['same_ttft_ms']:.1f} |")
            print(f"| first token after a full reload | {r['reload_ttft_ms']:.1f} |")
        if "rss" in parts:
            (tmp / "r").mkdir()
            r = bench_rss(base, tmp / "r", args.threads)
            b = r["base"]
            print("\n### RSS growth, fresh process per row (n_ctx 512, one decode per expert)\n")
            print("| setup | MiB | × base |\n| --- | ---: | ---: |")
            print(f"| base alone (1 engine) | {b:.1f} | 1.00 |")
            print(f"| 1 expert, base + 1 train-expert default adapter | {r['one_default']:.1f} | "
                  f"{r['one_default'] / b:.3f} |")
            for name, (rank, _, targets, outtype) in r["kinds"].items():
                what = "all 7 projections" if len(targets) == 7 else ",".join(targets)
                label = {"expert_default": "train-expert default", "seed_default": "finetune seed default"}
                print(f"| 5 experts, shared base + 5 adapters: {label.get(name, 'alternative')} "
                      f"(r {rank} on {what}, {outtype.upper()}, {r[name + '_mb']:.2f} MiB each) | "
                      f"{r[name]:.1f} | {r[name] / b:.3f} |")
            print(f"| 5 experts, 5 separate GGUF copies | {r['separate']:.1f} | "
                  f"{r['separate'] / b:.2f} |")


if __name__ == "__main__":
    main()
