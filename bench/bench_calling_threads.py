"""Why hublabd runs all llama.cpp work on one thread: generation speed when the decodes of
successive requests come from one thread vs from changing threads of a pool.

llama.cpp's OpenMP build (llama-cpp-python's default) keeps a team of worker threads per thread
that calls llama_decode. Requests served by a pool of worker threads each start their own team;
the idle teams then compete with the working one for the cores.

  python bench/bench_calling_threads.py [--threads N] [--requests 12] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from hublabio.board import detect_board
from hublabio.engine import Engine, SamplingOptions
from hublabio.paths import embedded_model_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="0 = the board's default")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    threads = args.threads or detect_board().threads
    engine = Engine(embedded_model_path(), n_ctx=512, threads=threads)
    opts = SamplingOptions(max_tokens=args.tokens, temperature=0, repeat_penalty=1.0)

    def one(i: int) -> float:
        return engine.complete(f"Story {i}: once upon a time", opts)[2].gen_tps

    results = {}
    for label, workers in (("one calling thread", 1), ("a pool of 4 threads", 4)):
        pool = ThreadPoolExecutor(workers)
        speeds = []
        for i in range(args.requests):
            speeds.append(pool.submit(one, i).result())
            # let every worker of the pool run something, so the next request may land on any
            for f in [pool.submit(time.sleep, 0.01) for _ in range(workers)]:
                f.result()
        pool.shutdown()
        results[label] = speeds
        print(f"{label}: " + " ".join(f"{s:.0f}" for s in speeds), flush=True)
    print(f"\nthreads {threads}, {args.tokens} tokens; median tok/s: " + ", ".join(
        f"{k} {statistics.median(v):.1f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
