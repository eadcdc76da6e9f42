"""hublab-tools quantize: GGUF -> a llama.cpp quantization, optionally guided by an importance matrix.

Usage: hublab-tools quantize IN.gguf TYPE [--out FILE] [--imatrix FILE] [--threads N]
                            [--allow-requantize]

TYPE is a llama.cpp file type: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q5_1 Q5_0 Q4_K_M Q4_K_S
Q4_1 Q4_0 IQ4_NL IQ4_XS Q3_K_L Q3_K_M Q3_K_S IQ3_M IQ3_S IQ3_XS IQ3_XXS Q2_K Q2_K_S IQ2_M IQ2_S
IQ2_XS IQ2_XXS IQ1_M IQ1_S. IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S and Q2_K_S need an
importance matrix (`hublab-tools imatrix`). Q8_K is not a file type (see the message).

The work is done by llama.cpp's own quantizer (llama_model_quantize from llama-cpp-python, no
llama.cpp checkout or binaries) in a child process, so a crash inside the C code is reported as a
message, never a dead CLI. The result is written to a temporary file and renamed on success.
Quantize from an F32/F16/BF16 GGUF; an already-quantized input is refused unless
--allow-requantize (its rounding errors add up with the new ones).
Mixed layouts are llama.cpp's: e.g. Q4_K_M keeps some attn_v/ffn_down tensors at Q6_K, and a
tensor whose row length is not a multiple of 256 falls back to a 32-block type. When most of the
matrices came out in another type than asked (SmolLM2's 576-wide rows under any K-quant), it says
so and names the 32-block types that would be used as written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hublabio.errors import HublabError
from hublabio_tools.common import ToolError


class QuantizeError(ToolError):
    code = "quantize"


# name -> llama.cpp LLAMA_FTYPE_* value (llama.h, enum llama_ftype)
FILE_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29,
    "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# The seed's list (docs/EXPORT.md, tests cover every one of these).
SEED_TYPES = ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
              "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ3_S", "IQ3_XXS",
              "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S"]

# File types whose main tensors are of a ggml type llama.cpp refuses to produce without an imatrix
# (src/llama-quant.cpp, tensor_requires_imatrix: IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_M, IQ1_S, and
# Q2_K inside a Q2_K_S file). IQ3_XXS files also put attn_q/attn_k in IQ2_S.
REQUIRES_IMATRIX = {"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K_S"}

# The ggml type most of a file type's matrices should have (llama_ftype_get_default_type in
# src/llama-quant.cpp); llama.cpp mixes in others per tensor (Q4_K_M: some Q6_K).
MAIN_TENSOR_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
    "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "IQ2_M": "IQ2_S",
    "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}
BLOCK_32_TYPES = "Q4_0, Q4_1, IQ4_NL, Q5_0, Q5_1, Q8_0"

NOT_FILE_TYPES = {
    "Q8_K": ("Q8_K is not a file type: llama.cpp uses Q8_K only internally, as the 8-bit format "
             "activations are converted to for K-quant dot products; there is no LLAMA_FTYPE for "
             "it and llama_model_quantize cannot write it. For 8-bit weights use Q8_0 (8.5 bits "
             "per weight, practically lossless); for a smaller near-lossless file use Q6_K."),
}


@dataclass
class QuantizeResult:
    out: Path
    file_type: str
    in_bytes: int
    out_bytes: int
    seconds: float
    imatrix_entries: int
    main_type_share: float | None = None  # of the matrices' weights, in MAIN_TENSOR_TYPE
    fallback: str | None = None           # a warning when most of them are another type


def fallback_note(out: Path, ftype: str) -> tuple[float | None, str | None]:
    """(the share of the layers' matrix weights that came out in the file type's main ggml
    type, a warning
    when that is under half: llama.cpp fell back, usually because rows are not a multiple of
    the type's 256-wide block)."""
    from collections import Counter

    from hublabio.gguf_info import read_gguf_info

    main = MAIN_TENSOR_TYPE.get(ftype)
    # the layers' matrices: llama.cpp gives token_embd and output types of their own
    matrices = [t for t in read_gguf_info(out).tensors
                if len(t.shape) >= 2 and t.name.startswith("blk.")]
    total = sum(t.n_elements for t in matrices)
    if main is None or not total:
        return None, None
    by_type = Counter()
    for t in matrices:
        by_type[t.type_name] += t.n_elements
    share = by_type[main] / total
    if share >= 0.5:
        return share, None
    top, n = by_type.most_common(1)[0]
    odd = sorted({t.shape[0] for t in matrices if t.shape[0] % 256})
    why = (f"rows of {', '.join(map(str, odd[:4]))} are not a multiple of the 256-wide "
           f"{main} block" if odd and main.startswith(("Q", "IQ")) and main not in
           ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL") else "llama.cpp chose so")
    return share, (f"only {share:.0%} of the layers' weights are {main}; llama.cpp wrote "
                   f"{n / total:.0%} as {top} ({why}). A type with 32-wide blocks is used as "
                   f"asked on this model: {BLOCK_32_TYPES}")


def normalize_type(name: str) -> str:
    """Validate a type name (case-insensitive); raises QuantizeError with the choices."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key in NOT_FILE_TYPES:
        raise QuantizeError(NOT_FILE_TYPES[key])
    if key not in FILE_TYPES:
        raise QuantizeError(f"unknown quantization type {name!r}; choose one of: "
                            + " ".join(FILE_TYPES))
    return key


def default_output(src: Path, ftype: str) -> Path:
    stem = re.sub(r"[-_.](f32|f16|bf16|q\d\w*|iq\d\w*)$", "", src.stem, flags=re.IGNORECASE)
    return src.with_name(f"{stem}-{ftype}.gguf")


def quantize(src: str | os.PathLike, ftype: str, out: str | os.PathLike | None = None, *,
             imatrix: str | os.PathLike | None = None, threads: int = 0,
             allow_requantize: bool = False) -> QuantizeResult:
    src = Path(src)
    ftype = normalize_type(ftype)
    try:
        with open(src, "rb") as f:
            if f.read(4) != b"GGUF":
                raise QuantizeError(f"{src}: not a GGUF file")
    except OSError as err:
        raise QuantizeError(f"{src}: cannot read ({err.strerror})") from err
    if ftype in REQUIRES_IMATRIX and imatrix is None:
        raise QuantizeError(
            f"{ftype} needs an importance matrix: llama.cpp refuses to write {ftype} tensors "
            "without one, because at this bit width the result would be garbage. Compute one "
            f"from representative text and pass it in:\n"
            f"  hublab-tools imatrix {src} calibration.txt --out model.imatrix.gguf\n"
            f"  hublab-tools quantize {src} {ftype} --imatrix model.imatrix.gguf")
    n_entries = 0
    if imatrix is not None:
        from hublabio_tools.imatrix import load_imatrix

        n_entries = len(load_imatrix(imatrix).sums)  # validates the file before the C code runs
    out = Path(out) if out else default_output(src, ftype)
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizeError(f"{out}: output would overwrite the input")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    job = {"src": str(src), "tmp": str(tmp), "ftype": ftype, "threads": threads,
           "imatrix": str(imatrix) if imatrix is not None else None,
           "allow_requantize": bool(allow_requantize)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "hublabio_tools.quantize", "--child",
                               json.dumps(job)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not tmp.exists():
            raise QuantizeError(_failure_message(src, ftype, proc))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    share, note = fallback_note(out, ftype)
    return QuantizeResult(out=out, file_type=ftype, in_bytes=src.stat().st_size,
                          out_bytes=out.stat().st_size, seconds=seconds,
                          imatrix_entries=n_entries, main_type_share=share, fallback=note)


def _failure_message(src: Path, ftype: str, proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = f"llama.cpp's quantizer crashed ({sig})"
    else:
        why = "llama.cpp's quantizer failed"
    detail = lines[-1] if lines else "no message"
    if "requantizing from type" in detail:
        detail += (" (the input is already quantized: quantize from an F32/F16/BF16 GGUF, or "
                   "pass --allow-requantize and accept the extra loss)")
    return f"{src} -> {ftype}: {why}: {detail}"


# ---------------------------------------------------------------------------------------------
# child process: the only place llama_model_quantize runs
# ---------------------------------------------------------------------------------------------

def _child(job: dict) -> int:
    from hublabio.errors import LlamaError
    from hublabio.llama.quantize import quantize_file

    imatrix, overrides = None, []
    if job["imatrix"]:
        from hublabio_tools.imatrix import load_imatrix

        im = load_imatrix(job["imatrix"])
        imatrix = im.means()
        overrides = [("quantize.imatrix.file", Path(job["imatrix"]).name),
                     ("quantize.imatrix.entries_count", len(imatrix))]
        if im.datasets and im.datasets[0]:
            overrides.append(("quantize.imatrix.dataset", im.datasets[0]))
        if im.chunk_count:
            overrides.append(("quantize.imatrix.chunks_count", im.chunk_count))
    t0 = time.perf_counter()
    try:
        quantize_file(job["src"], job["tmp"], ftype=FILE_TYPES[job["ftype"]],
                      threads=int(job["threads"]), allow_requantize=bool(job.get("allow_requantize")),
                      imatrix=imatrix, kv_overrides=overrides)
    except LlamaError as err:
        for line in str(err).splitlines()[-6:]:
            print(line, file=sys.stderr)
        return 1
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(json.loads(argv[1]))
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="source GGUF (F32/F16/BF16 gives the best result)")
    ap.add_argument("type", help="llama.cpp file type, e.g. Q4_K_M")
    ap.add_argument("--out", type=Path, help="output file (default: <input stem>-<TYPE>.gguf)")
    ap.add_argument("--imatrix", type=Path, help="importance matrix from `hublab-tools imatrix`")
    ap.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="accept an already-quantized input (quality loses twice)")
    args = ap.parse_args(argv)
    try:
        res = quantize(args.input, args.type, args.out, imatrix=args.imatrix, threads=args.threads,
                       allow_requantize=args.allow_requantize)
    except HublabError as err:
        print(f"hublab-tools quantize: {err}", file=sys.stderr)
        return 1
    ratio = res.out_bytes / res.in_bytes if res.in_bytes else 0
    extra = f", imatrix {res.imatrix_entries} entries" if res.imatrix_entries else ""
    print(f"{args.input} ({_mb(res.in_bytes)}) -> {res.out} ({_mb(res.out_bytes)}, "
          f"{ratio:.1%}) as {res.file_type} in {res.seconds:.1f} s{extra}")
    if res.fallback:
        print(f"hublab-tools quantize: warning: {res.fallback}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
