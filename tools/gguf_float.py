"""Float GGUFs for the quantizer: dequantize any GGUF to F32/F16 (all metadata copied), and write a
tiny random Llama GGUF (dimensions multiples of 32; of 256 by default, so that every quantization applies; a real tokenizer copied in) for fast tests.

llama.cpp's quantizer wants a float source; the only real model shipped offline is a Q4_1 GGUF, so
`requantize_to_float` turns it back into F16/F32 with `gguf.quants.dequantize`. Tensors are
streamed: one tensor is dequantized, written and dropped before the next one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from hublabio.errors import GGUFError
from hublabio_tools.common import gguf_output

FLOAT_TYPES = {"F32": (GGMLQuantizationType.F32, np.float32, 0),
               "F16": (GGMLQuantizationType.F16, np.float16, 1)}  # name -> (ggml type, dtype, ftype)
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version"}


def _open(path: str | os.PathLike) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise GGUFError(path, f"not a readable GGUF file ({err})") from err


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, prefix: str = "",
                  skip: set[str] = frozenset()) -> int:
    """Copy every key/value field whose name starts with `prefix`; returns how many were copied."""
    n = 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS or key in skip or not key.startswith(prefix):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type)
        n += 1
    return n


def _as_float(tensor) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # numpy order (rows, cols)
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)


def requantize_to_float(src: str | os.PathLike, dst: str | os.PathLike, out_type: str = "F16") -> Path:
    """Dequantize every tensor of `src` and write `dst` with 2-D weights in `out_type` (F16 or F32)
    and 1-D tensors (norms) in F32, as llama.cpp's own converter does. Metadata is copied as is
    (general.file_type is set to the new type). Written to a temp file, renamed on success."""
    out_type = out_type.upper()
    if out_type not in FLOAT_TYPES:
        raise ValueError(f"out_type must be one of {sorted(FLOAT_TYPES)}, got {out_type!r}")
    ggml_type, dtype, ftype = FLOAT_TYPES[out_type]
    reader = _open(src)
    arch = reader.fields["general.architecture"].contents()
    dst = Path(dst)
    with gguf_output(dst, arch) as writer:
        copy_metadata(reader, writer)
        writer.add_file_type(ftype)
        plan = []
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            out_dtype = dtype if len(shape) >= 2 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(out_dtype).itemsize
            writer.add_tensor_info(t.name, shape, np.dtype(out_dtype), nbytes)
            plan.append((t, out_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, out_dtype in plan:
            writer.write_tensor_data(_as_float(t).astype(out_dtype, copy=False))
    return dst


def write_tiny_llama(dst: str | os.PathLike, vocab_from: str | os.PathLike, *, n_layer: int = 2,
                     n_embd: int = 256, n_ff: int = 512, n_head: int = 4, n_head_kv: int = 2,
                     out_type: str = "F16", seed: int = 0) -> Path:
    """A random Llama GGUF that llama.cpp loads. With widths that are multiples of 256 (the
    defaults) every quantization type applies as asked; other multiples of 32 make K- and IQ
    quants fall back to 32-block types, as SmolLM2's 576 does. The tokenizer (tokens, merges,
    pre-tokenizer, special tokens, chat template) is copied from `vocab_from`, so it tokenizes
    real text."""
    if n_embd % 32 or n_ff % 32 or n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd and n_ff must be multiples of 32; heads must divide evenly")
    ggml_type, dtype, ftype = FLOAT_TYPES[out_type.upper()]
    vocab = _open(vocab_from)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def w(rows, cols, scale=None):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (scale or cols ** -0.5)).astype(dtype)

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", w(n_vocab, n_embd, 0.02)),
                                             ("output_norm.weight", np.ones(n_embd, np.float32))]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", np.ones(n_embd, np.float32)),
            (p + "attn_q.weight", w(n_embd, n_embd)),
            (p + "attn_k.weight", w(n_head_kv * head_dim, n_embd)),
            (p + "attn_v.weight", w(n_head_kv * head_dim, n_embd)),
            (p + "attn_output.weight", w(n_embd, n_embd)),
            (p + "ffn_norm.weight", np.ones(n_embd, np.float32)),
            (p + "ffn_gate.weight", w(n_ff, n_embd)),
            (p + "ffn_up.weight", w(n_ff, n_embd)),
            (p + "ffn_down.weight", w(n_embd, n_ff)),
        ]
    dst = Path(dst)
    with gguf_output(dst, "llama") as writer:
        writer.add_name("hublab-tiny-llama")
        writer.add_file_type(ftype)
        writer.add_context_length(2048)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(n_vocab)
        copy_metadata(vocab, writer, prefix="tokenizer.")
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return dst
