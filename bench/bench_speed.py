"""Generation speed at the seed's model sizes (issue 12): through the daemon, against llama.cpp's
llama-bench on the same file and threads, and against what the memory bandwidth allows.

For each GGUF (make them with `hublab-tools random-model hublabio-3b --out 3b.gguf`):
- llama-bench (built from the llama.cpp vendored in the pinned llama-cpp-python sdist):
  `-p 0 -n TOKENS -r 3 -t THREADS --repack R`. llama-bench can only repack everything or
  nothing; on an Intel AMX host "everything" crashes (llama.cpp #20824), so there both sides run
  with repacking off (`--repack 0`, and `repack = false` in hublabd's model TOML), elsewhere on;
- hublabd (a fresh subprocess, HTTP API, the model's other settings at their defaults):
  streamed /v1/completions of
  TOKENS tokens with the end-of-generation token biased away, decode tok/s = the tokens after
  the first / the time after the first token, median of 3;
- the limit: decoding reads every weight once per token (the output matrix whole, one row of
  the token embedding) plus the KV cache written so far, so tok/s ≤ read bandwidth / bytes per
  token. The bandwidth is measured here: numpy sums of a 1 GiB array from THREADS threads.
- load time: cold (the file's pages dropped from the page cache with posix_fadvise DONTNEED,
  as after a reboot; an SD card reads at 40-90 MB/s, this disk faster) and warm.

  python bench/bench_speed.py /tmp/3b.gguf /tmp/7b.gguf --llama-bench /tmp/llama-build/bin/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_batching  # noqa: E402  (hublabd() and the streamed request)

from hublabio.budget import bytes_per_token  # noqa: E402
from hublabio.gguf_info import read_gguf_info  # noqa: E402
from hublabio.llama.cpu import has_amx  # noqa: E402


def read_bandwidth(threads: int, gib: float = 1.0, rounds: int = 5) -> float:
    """Bytes per second that `threads` threads read (numpy sum releases the GIL)."""
    arr = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(arr, threads)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, arr.nbytes / (time.perf_counter() - t0))
    return best


def llama_bench(binary: str, model: Path, threads: int, tokens: int, repack: bool) -> float:
    out = subprocess.run([binary, "-m", str(model), "-p", "0", "-n", str(tokens), "-r", "3",
                          "-t", str(threads), "--repack", "1" if repack else "0", "-o", "json"],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed: {out.stderr[-1500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def hublabd_decode(model: Path, threads: int, tokens: int, repack: bool) -> float:
    meta = read_gguf_info(model).metadata
    eog = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
    bench_batching.NO_EOS.update({str(t): -100.0 for t in eog if isinstance(t, int)})
    bench_batching.REPEAT_PENALTY = 1.0
    rates = []
    with bench_batching.hublabd(model, 1, threads, tokens,
                                extra=f"repack = {str(repack).lower()}\n") as (base, name):
        bench_batching.one_request(base, name, 4, [None], 0)  # load + warm-up
        for _ in range(3):
            out = [None]
            bench_batching.one_request(base, name, tokens, out, 0)
            _, n, end, first = out[0]
            rates.append((n - 1) / (end - first))
    return statistics.median(rates)


def load_times(model: Path, threads: int) -> tuple[float, float]:
    code = ("import sys, time; from hublabio.engine import Engine; t = time.perf_counter(); "
            "e = Engine(sys.argv[1], n_ctx=512, threads=int(sys.argv[2])); "
            "print(time.perf_counter() - t); e.close()")
    times = []
    for cold in (True, False):
        if cold:
            fd = os.open(model, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        out = subprocess.run([sys.executable, "-c", code, str(model), str(threads)],
                             capture_output=True, text=True, timeout=1800)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times[0], times[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    repack = not has_amx()
    bw = read_bandwidth(args.threads)
    print(f"{platform.processor() or platform.machine()}, threads {args.threads}, repack "
          f"{'on' if repack else 'off (AMX host)'} on both sides; read bandwidth "
          f"{bw / 1e9:.1f} GB/s ({args.threads} threads, numpy)")
    print("| model | file MiB | llama-bench tg tok/s | hublabd tok/s | ratio | limit tok/s | "
          "of limit | load cold / warm s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for model in args.models:
        info = read_gguf_info(model)
        peer = llama_bench(args.llama_bench, model, args.threads, args.tokens, repack)
        ours = hublabd_decode(model, args.threads, args.tokens, repack)
        limit = bw / bytes_per_token(info, 32 + args.tokens // 2)
        cold, warm = load_times(model, args.threads)
        print(f"| {model.name} | {model.stat().st_size / 2**20:.0f} | {peer:.2f} | {ours:.2f} | "
              f"{ours / peer:.2f} | {limit:.2f} | {ours / limit:.2f} | {cold:.1f} / {warm:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
