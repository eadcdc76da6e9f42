"""hublab-tools imatrix: compute an importance matrix from calibration text.

Usage: hublab-tools imatrix MODEL.gguf CALIBRATION.txt [--out FILE] [--ctx N] [--chunks N] [--threads N]

The importance of each input column of each weight matrix is the mean squared activation that
reaches it: for every matrix multiplication `W @ x` in the model (W a GGUF tensor named blk.*),
sum x_j^2 over every token and divide by the number of tokens. It is measured with llama.cpp
itself: an eval callback (cb_eval) sees each MUL_MAT's weight and its input activations while the
model reads the calibration text in chunks of --ctx tokens, as llama.cpp's llama-imatrix does.

The result is written in llama.cpp's imatrix GGUF format (`<tensor>.in_sum2`, `<tensor>.counts`,
imatrix.datasets/chunk_count/chunk_size), which `hublab-tools quantize --imatrix` and llama.cpp's
llama-quantize both read. Legacy .dat imatrix files are read too.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hublabio.errors import HublabError
from hublabio_tools.common import ToolError


class ImatrixError(ToolError):
    code = "imatrix"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)    # name -> float64 [n_mat, n_cols] sum of x^2
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64 [n_mat] tokens seen
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    ppl: float | None = None  # perplexity of the calibration text (second half of each chunk)

    def means(self) -> dict[str, np.ndarray]:
        """name -> float32 flat mean of x^2 per column (what llama_model_quantize consumes);
        matrices that saw no token get 1.0, as llama.cpp's loader does."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float64)[:, None]
            m = np.where(c > 0, s / np.maximum(c, 1), 1.0)
            out[name] = np.ascontiguousarray(m.reshape(-1), dtype=np.float32)
        return out


# ---------------------------------------------------------------------------------------------
# file format (llama.cpp tools/imatrix: save_imatrix / common/imatrix-loader.cpp)
# ---------------------------------------------------------------------------------------------

def save_imatrix(path: str | os.PathLike, im: Imatrix) -> Path:
    from gguf import GGUFValueType

    from hublabio_tools.common import gguf_output

    path = Path(path)
    with gguf_output(path, "imatrix") as writer:
        writer.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry none
        writer.add_string("general.type", "imatrix")
        writer.add_key_value("imatrix.datasets", list(im.datasets) or [""], GGUFValueType.ARRAY,
                             GGUFValueType.STRING)
        writer.add_uint32("imatrix.chunk_count", im.chunk_count)
        writer.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            s = im.sums[name]
            writer.add_tensor(f"{name}.in_sum2", s.astype(np.float32))
            writer.add_tensor(f"{name}.counts", im.counts[name].astype(np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix in llama.cpp's GGUF format or its legacy .dat format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ImatrixError(f"{path}: cannot read importance matrix ({err.strerror})") from err
    im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    if not im.sums:
        raise ImatrixError(f"{path}: importance matrix has no entries")
    for name, s in im.sums.items():
        if not np.all(np.isfinite(s)):
            raise ImatrixError(f"{path}: entry {name} contains non-finite values")
    return im


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        r = GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise ImatrixError(f"{path}: not a readable imatrix GGUF ({err})") from err
    im = Imatrix()
    f = r.fields
    if "imatrix.datasets" in f:
        im.datasets = list(f["imatrix.datasets"].contents())
    if "imatrix.chunk_count" not in f or "imatrix.chunk_size" not in f:
        raise ImatrixError(f"{path}: missing imatrix metadata (imatrix.chunk_count / chunk_size)")
    im.chunk_count = int(f["imatrix.chunk_count"].contents())
    im.chunk_size = int(f["imatrix.chunk_size"].contents())
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {t.name} must be F32, is {t.tensor_type.name}")
        data = np.asarray(t.data, dtype=np.float64)
        if t.name.endswith(".in_sum2"):
            n_cols = int(t.shape[0])
            sums[t.name[:-8]] = data.reshape(-1, n_cols)
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = np.rint(data.reshape(-1)).astype(np.int64)
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise ImatrixError(f"{path}: mismatched sums and counts for {name}")
        if sums[name].shape[0] != counts[name].shape[0]:
            raise ImatrixError(f"{path}: {name} has {sums[name].shape[0]} matrices but "
                               f"{counts[name].shape[0]} counts")
        im.sums[name] = sums[name]
        im.counts[name] = counts[name]
    return im


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix at byte {pos}")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{path}: not an imatrix file (neither GGUF nor legacy .dat)")
    im = Imatrix()
    for i in range(n_entries):
        (n,) = take("<i")
        if not 0 < n < 4096:
            raise ImatrixError(f"{path}: entry {i + 1}: bad name length {n}")
        name = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name}: no values")
        vals = np.array(take(f"<{nval}f"), dtype=np.float64)
        # legacy stores (sum/count)*ncall: keep it as sums with counts = ncall
        im.sums[name] = vals.reshape(1, -1)
        im.counts[name] = np.array([max(ncall, 1)], dtype=np.int64)
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0:
                im.datasets = [data[pos:pos + n].decode("utf-8", "replace")]
    return im


# ---------------------------------------------------------------------------------------------
# collection through llama.cpp's eval callback
# ---------------------------------------------------------------------------------------------

class _GGMLTensor(ctypes.Structure):
    pass


# ggml.h, struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
# GGML_MAX_NAME 64); checked against ggml_nbytes() and ggml_op_name() at run time.
_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

GGML_TYPE_F32 = 0


def _ggml():
    from hublabio.llama.backend import ggml

    return ggml()


def _weight_name(raw: bytes) -> str:
    """'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight' (llama.cpp's filter_tensor_name)."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class ActivationCollector:
    """The cb_eval callback: for each MUL_MAT whose weight is a blk.* tensor (and output.weight
    when asked), accumulate x^2 per input column of the F32 activations and the token count."""

    MIN_TOKENS = 16  # like llama-imatrix: single-token decode steps are not representative

    def __init__(self, process_output: bool = False):
        self.lib = _ggml()
        self.mul_mat = next(i for i in range(128)
                            if (self.lib.ggml_op_name(i) or b"") == b"MUL_MAT")
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: Exception | None = None

    def __call__(self, t_ptr: int, ask: bool) -> bool:
        try:
            return self._handle(t_ptr, ask)
        except Exception as err:  # never let an exception cross the C boundary
            self.error = self.error or err
            return False

    def _handle(self, t_ptr: int, ask: bool) -> bool:
        t = _GGMLTensor.from_address(t_ptr)
        if t.op != self.mul_mat:
            return False if ask else True
        src0, src1 = t.src[0].contents, t.src[1].contents
        wname = _weight_name(src0.name)
        wanted = (wname.startswith("blk.") or (self.process_output and wname == "output.weight"))
        if ask:
            return wanted and src1.type == GGML_TYPE_F32 and src1.ne[1] >= self.MIN_TOKENS
        if not wanted:
            return True
        ne = [int(v) for v in src1.ne]
        nb = [int(v) for v in src1.nb]
        nbytes = self.lib.ggml_nbytes(ctypes.addressof(src1))
        expect = 4 + sum((n - 1) * s for n, s in zip(ne, nb))
        if nb[0] != 4 or nbytes != expect:
            raise ImatrixError("ggml_tensor layout does not match this llama.cpp build "
                               f"(nbytes {nbytes} vs {expect} for {wname})")
        if self.lib.ggml_backend_buffer_is_host(src1.buffer):
            buf = (ctypes.c_char * nbytes).from_address(src1.data)
        else:
            buf = (ctypes.c_char * nbytes)()
            self.lib.ggml_backend_tensor_get(ctypes.addressof(src1), buf, 0, nbytes)
        base = np.frombuffer(buf, dtype=np.float32)
        x = np.lib.stride_tricks.as_strided(base, shape=(ne[3], ne[2], ne[1], ne[0]),
                                            strides=(nb[3], nb[2], nb[1], nb[0]),
                                            writeable=False).astype(np.float64)
        n_mat2, n_mat3 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = n_mat2 * n_mat3
        s = self.sums.get(wname)
        if s is None:
            s = self.sums[wname] = np.zeros((n_mat, ne[0]), np.float64)
            self.counts[wname] = np.zeros(n_mat, np.int64)
        elif s.shape != (n_mat, ne[0]):
            raise ImatrixError(f"inconsistent activation size for {wname}: {s.shape} vs "
                               f"{(n_mat, ne[0])}")
        sq = x * x
        for i3 in range(ne[3]):
            for i2 in range(ne[2]):
                mat = (i3 % n_mat3) * n_mat2 + (i2 % n_mat2)
                s[mat] += sq[i3, i2].sum(axis=0)
        self.counts[wname] += (ne[1] * ne[2] * ne[3]) // n_mat
        return True


def compute_imatrix(model: str | os.PathLike, text: str, *, n_ctx: int = 512,
                    n_chunks: int | None = None, threads: int = 2, dataset: str = "",
                    progress=None) -> Imatrix:
    """Run llama.cpp over `text` in chunks of n_ctx tokens, collecting activations."""
    from hublabio_tools.llama_context import LlamaModel

    collector = ActivationCollector()
    with LlamaModel(model, n_ctx=n_ctx, threads=threads, eval_callback=collector) as m:
        tokens = m.tokenize(text, add_special=True)
        available = len(tokens) // n_ctx
        if available < 1:
            raise ImatrixError(f"calibration text has {len(tokens)} tokens; --ctx {n_ctx} needs at "
                               f"least {n_ctx} (give more text or a smaller --ctx)")
        n = available if not n_chunks else min(n_chunks, available)
        nll, count = 0.0, 0
        first = n_ctx // 2
        for i in range(n):
            chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
            if m.add_bos:
                chunk[0] = m.bos
            logits = m.logits(chunk, first=0)
            if collector.error:
                raise ImatrixError(f"activation collection failed: {collector.error}")
            lp = _log_softmax_rows(logits[first:n_ctx - 1])
            target = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
            nll -= float(lp[np.arange(len(target)), target].sum())
            count += len(target)
            if progress:
                progress(i + 1, n, math.exp(nll / count))
    if not collector.sums:
        raise ImatrixError(f"{model}: no matrix multiplications were seen (is it a GGUF model?)")
    return Imatrix(sums=collector.sums, counts=collector.counts, chunk_count=n, chunk_size=n_ctx,
                   datasets=[dataset] if dataset else [], ppl=math.exp(nll / max(count, 1)))


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools imatrix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF model (F16/F32 or quantized)")
    ap.add_argument("calibration", type=Path, help="plain-text calibration file")
    ap.add_argument("--out", type=Path, help="output file (default: <model stem>.imatrix.gguf)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=0, help="at most this many chunks (default all)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args(argv)
    try:
        text = args.calibration.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"hublab-tools imatrix: {args.calibration}: cannot read text ({err})", file=sys.stderr)
        return 1
    if not args.model.is_file():
        print(f"hublab-tools imatrix: {args.model}: no such file", file=sys.stderr)
        return 1
    out = args.out or args.model.with_name(args.model.stem + ".imatrix.gguf")
    t0 = time.perf_counter()

    def progress(i, n, ppl):
        print(f"\rchunk {i}/{n}  calibration ppl {ppl:.3f}", end="", file=sys.stderr, flush=True)

    try:
        im = compute_imatrix(args.model, text, n_ctx=args.ctx, n_chunks=args.chunks or None,
                             threads=args.threads, dataset=args.calibration.name,
                             progress=progress)
    except (HublabError, RuntimeError) as err:
        print(f"\nhublab-tools imatrix: {err}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    save_imatrix(out, im)
    print(f"wrote {out}: {len(im.sums)} matrices, {im.chunk_count} chunks x {im.chunk_size} tokens, "
          f"calibration ppl {im.ppl:.3f}, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
