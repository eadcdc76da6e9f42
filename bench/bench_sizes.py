"""The memory estimate against measured RSS at the seed's model sizes (issue 12).

For each GGUF (make them with `hublab-tools random-model hublabio-1b --out 1b.gguf`), each
context size and each repack policy, a fresh child process loads it with the daemon's Engine,
answers a prompt of one micro-batch plus 8 generated tokens, and reports its RSS growth; the
table puts budget.estimate_memory (with the same repack policy) beside it.

  python bench/bench_sizes.py /tmp/0.5b.gguf /tmp/1b.gguf [--ctx 512,4096] [--repack auto,off]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

from hublabio.budget import estimate_memory
from hublabio.gguf_info import read_gguf_info
from hublabio.llama.cpu import decide as repack_policy

CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    from hublabio.engine import Engine, SamplingOptions

    path, n_ctx, threads, repack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    repack = {"auto": "auto", "on": True, "off": False}[repack]
    proc = psutil.Process()
    before = proc.memory_info().rss
    engine = Engine(path, n_ctx=n_ctx, threads=threads, repack=repack)
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()
    target = min(engine.n_batch, engine.n_ctx) - 24
    prompt = " ".join(words[i % len(words)] for i in range(target))
    while len(engine.tokenize(prompt)) > target:
        prompt = prompt[: int(len(prompt) * 0.95)]
    engine.complete(prompt, SamplingOptions(max_tokens=8, temperature=0.0))
    print(json.dumps({"rss": proc.memory_info().rss - before,
                      "buffers": getattr(engine, "buffers", {})}))
""")


def measure(path: Path, n_ctx: int, threads: int, repack: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_ctx), str(threads),
                           repack], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{path} n_ctx {n_ctx} repack {repack}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--ctx", default="512,4096")
    ap.add_argument("--repack", default="auto,off", help="auto, on, off (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, threads {args.threads}; RSS growth "
          "after a one-micro-batch prompt + 8 tokens, fresh process per row")
    print("| model | type | n_ctx | repack | estimate MiB | RSS MiB | error |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for path in args.models:
        info = read_gguf_info(path)
        for n_ctx in (int(x) for x in args.ctx.split(",")):
            for repack in args.repack.split(","):
                policy = repack_policy({"auto": "auto", "on": True, "off": False}[repack])
                est = estimate_memory(info, n_ctx, repack=policy).total_mb
                rss = measure(path, n_ctx, args.threads, repack)["rss"] / 2**20
                print(f"| {path.name} | {info.quantization} | {n_ctx} | {repack} | {est:.0f} | "
                      f"{rss:.0f} | {(est - rss) / rss:+.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
