"""Models and text shared by the quantize / imatrix / eval / card tests, built once per session:
a tiny random Llama (SmolLM2 tokenizer, dims multiples of 256), its importance matrix from real
text, and an F16 GGUF dequantized from the real SmolLM2 Q4_1."""

from __future__ import annotations

from pathlib import Path

from hublabio.paths import embedded_model_path

_cache: dict[str, Path] = {}


def _dir(factory) -> Path:
    if "dir" not in _cache:
        _cache["dir"] = factory.mktemp("quant")
    return _cache["dir"]


def text_file(factory, part: str, max_chars: int = 30000) -> Path:
    from hublabio_tools.sample_text import python_docs_text

    key = f"text-{part}-{max_chars}"
    if key not in _cache:
        p = _dir(factory) / f"{part}-{max_chars}.txt"
        p.write_text(python_docs_text(part, max_chars), encoding="utf-8")
        _cache[key] = p
    return _cache[key]


def tiny_model(factory) -> Path:
    from hublabio_tools.gguf_float import write_tiny_llama

    if "tiny" not in _cache:
        _cache["tiny"] = write_tiny_llama(_dir(factory) / "tiny-f16.gguf", embedded_model_path(),
                                          n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2)
    return _cache["tiny"]


def tiny_imatrix(factory) -> Path:
    from hublabio_tools.imatrix import compute_imatrix, save_imatrix

    if "tiny-imatrix" not in _cache:
        text = text_file(factory, "calibration").read_text(encoding="utf-8")
        im = compute_imatrix(tiny_model(factory), text, n_ctx=128, n_chunks=2, threads=2,
                             dataset="python-docs")
        _cache["tiny-imatrix"] = save_imatrix(_dir(factory) / "tiny.imatrix.gguf", im)
    return _cache["tiny-imatrix"]


def smollm2_f16(factory) -> Path:
    from hublabio_tools.gguf_float import requantize_to_float

    if "smol-f16" not in _cache:
        _cache["smol-f16"] = requantize_to_float(embedded_model_path(),
                                                 _dir(factory) / "smollm2-f16.gguf", "F16")
    return _cache["smol-f16"]
