"""Quantization benchmark: time and size per llama.cpp file type on an F16 GGUF dequantized from the
real SmolLM2-135M-Instruct Q4_1, and the perplexity of Q2_K and IQ2_XXS with and without an
importance matrix (plus F16 / Q8_0 / Q4_K_M as references).

    python bench/bench_quantize.py [--types Q8_0,Q4_K_M,...] [--ctx 256] [--chunks 4] [--threads 2]

Text: the Python documentation topics shipped with the standard library (pydoc_data), even
topics for the importance matrix, odd topics for perplexity, so the two never overlap.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

from hublabio.paths import embedded_model_path
from hublabio_tools.evaluate import perplexity
from hublabio_tools.gguf_float import requantize_to_float
from hublabio_tools.imatrix import compute_imatrix, save_imatrix
from hublabio_tools.quantize import REQUIRES_IMATRIX, SEED_TYPES, QuantizeError, quantize
from hublabio_tools.sample_text import python_docs_text


def type_mix(path: Path) -> str:
    """Share of tensor bytes per ggml type, largest first (llama.cpp mixes types per tensor)."""
    sizes = collections.Counter()
    for t in GGUFReader(path).tensors:
        sizes[t.tensor_type.name] += int(t.n_bytes)
    total = sum(sizes.values())
    return " ".join(f"{k} {v / total:.0%}" for k, v in sizes.most_common(3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(SEED_TYPES))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = python_docs_text("calibration", 120_000)
    evaltext = python_docs_text("evaluation", 120_000)

    t0 = time.perf_counter()
    src = requantize_to_float(embedded_model_path(), work / "smollm2-135m-f16.gguf", "F16")
    print(f"source: {src.name} ({src.stat().st_size / 2**20:.1f} MiB), dequantized from the "
          f"SmolLM2 Q4_1 in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    im = compute_imatrix(src, calib, n_ctx=args.ctx, n_chunks=2 * args.chunks,
                         threads=args.threads, dataset="pydoc_data calibration topics")
    imfile = save_imatrix(work / "smollm2.imatrix.gguf", im)
    print(f"imatrix: {len(im.sums)} matrices, {im.chunk_count} x {im.chunk_size} tokens in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"machine: {os.cpu_count()} CPUs, threads={args.threads}\n")

    print(f"{'type':8} {'imatrix':7} {'time s':>7} {'MiB':>7} {'bpw':>5}  tensor types")
    outputs: dict[tuple[str, bool], Path] = {}
    n_params = sum(int(t.n_elements) for t in GGUFReader(src).tensors)
    for t in args.types.split(","):
        variants = [True] if t in REQUIRES_IMATRIX else [False]
        if t in ("Q2_K", "IQ2_XXS"):
            variants = [False, True]
        for use_im in variants:
            try:
                r = quantize(src, t, work / f"smollm2-{t}{'-im' if use_im else ''}.gguf",
                             imatrix=imfile if use_im else None, threads=args.threads)
            except QuantizeError as err:
                print(f"{t:8} {'yes' if use_im else 'no':7} refused: {str(err).splitlines()[0]}")
                continue
            outputs[(t, use_im)] = r.out
            print(f"{t:8} {'yes' if use_im else 'no':7} {r.seconds:7.1f} {r.out_bytes / 2**20:7.1f} "
                  f"{8 * r.out_bytes / n_params:5.2f}  {type_mix(r.out)}", flush=True)

    print(f"\nperplexity ({args.chunks} chunks x {args.ctx} tokens of held-out text, lower is better)")
    rows = [("F16", False, src)] + [(t, im_, outputs[(t, im_)]) for t, im_ in
                                    [("Q8_0", False), ("Q4_K_M", False), ("Q2_K", False),
                                     ("Q2_K", True), ("IQ2_XXS", True)] if (t, im_) in outputs]
    for t, use_im, path in rows:
        r = perplexity(path, evaltext, n_ctx=args.ctx, n_chunks=args.chunks, threads=args.threads)
        print(f"{t:8} imatrix={'yes' if use_im else 'no ':3}  PPL {r.ppl:8.3f} +/- {r.stderr:.3f}",
              flush=True)
    print(f"\nfiles in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
