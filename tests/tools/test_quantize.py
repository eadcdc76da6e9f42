"""hublab-tools quantize: every seed file type through llama.cpp's own quantizer on a tiny Llama,
loaded and run by llama.cpp afterwards; honest refusals (Q8_K, missing imatrix); nothing
half-written on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

from hublabio_tools import quantize as q
from hublabio_tools.llama_context import LlamaModel
from quant_fixtures import tiny_imatrix, tiny_model

MAIN_TENSOR_TYPE = q.MAIN_TENSOR_TYPE  # the ggml type that must appear in each file type
SLOW = {"IQ1_S", "IQ2_XS", "IQ2_S", "IQ3_XXS"}  # llama.cpp's lattice search is slow on 2 cores


def test_seed_list_is_complete():
    assert set(q.SEED_TYPES) <= set(MAIN_TENSOR_TYPE) == set(q.FILE_TYPES)
    assert all(t in q.FILE_TYPES for t in q.SEED_TYPES)


@pytest.mark.parametrize("ftype", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t
                                   for t in q.SEED_TYPES])
def test_every_type_quantizes_loads_and_generates(ftype, tmp_path, tmp_path_factory):
    src = tiny_model(tmp_path_factory)
    imatrix = tiny_imatrix(tmp_path_factory) if ftype in q.REQUIRES_IMATRIX else None
    res = q.quantize(src, ftype, tmp_path / f"m-{ftype}.gguf", imatrix=imatrix, threads=2)
    assert res.out.stat().st_size == res.out_bytes > 0
    assert [p.name for p in tmp_path.iterdir()] == [res.out.name]  # no temp file left behind
    r = GGUFReader(res.out)
    assert int(r.fields["general.file_type"].contents()) == q.FILE_TYPES[ftype]
    types = {t.tensor_type.name for t in r.tensors}
    assert MAIN_TENSOR_TYPE[ftype] in types, types
    if imatrix is not None:
        assert int(r.fields["quantize.imatrix.entries_count"].contents()) == 14
    with LlamaModel(res.out, n_ctx=32, threads=2) as m:
        tokens, rows = m.greedy(m.tokenize("The quick brown fox"), 3)
    assert len(tokens) == 3 and all(0 <= t < m.n_vocab for t in tokens)
    assert np.isfinite(rows).all() and rows.std() > 0


def test_q8_k_is_refused_with_an_explanation(tmp_path, tmp_path_factory, capsys):
    src = tiny_model(tmp_path_factory)
    with pytest.raises(q.QuantizeError) as err:
        q.quantize(src, "q8_k", tmp_path / "x.gguf")
    msg = str(err.value)
    assert "not a file type" in msg and "Q8_0" in msg and "Q6_K" in msg
    assert q.main([str(src), "Q8_K", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "Q8_K is not a file type" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ1_S", "IQ2_XS", "IQ2_S", "IQ3_XXS"])
def test_imatrix_types_without_imatrix_get_a_clear_message_before_llama_cpp(
        ftype, tmp_path, tmp_path_factory, monkeypatch):
    src = tiny_model(tmp_path_factory)
    monkeypatch.setattr(q.subprocess, "run", lambda *a, **k: pytest.fail("C code was called"))
    with pytest.raises(q.QuantizeError) as err:
        q.quantize(src, ftype, tmp_path / "x.gguf")
    assert "needs an importance matrix" in str(err.value)
    assert "hublab-tools imatrix" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ftype", sorted(q.REQUIRES_IMATRIX))
def test_requires_imatrix_list_matches_llama_cpp(ftype, tmp_path, tmp_path_factory):
    """Bypass our check: llama.cpp itself must refuse each of these without an imatrix."""
    src = tiny_model(tmp_path_factory)
    job = {"src": str(src), "tmp": str(tmp_path / "x.gguf"), "ftype": ftype, "threads": 2,
           "imatrix": None}
    proc = subprocess.run([sys.executable, "-m", "hublabio_tools.quantize", "--child",
                           json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "requires an imatrix" in proc.stderr


def test_imatrix_for_another_model_fails_cleanly(tmp_path, tmp_path_factory):
    from hublabio_tools.gguf_float import write_tiny_llama
    from hublabio.paths import embedded_model_path

    other = write_tiny_llama(tmp_path / "wide.gguf", embedded_model_path(), n_layer=2, n_embd=512,
                             n_ff=512, n_head=4, n_head_kv=2)
    out_dir = tmp_path / "out"
    with pytest.raises(q.QuantizeError) as err:
        q.quantize(other, "IQ2_XXS", out_dir / "x.gguf", imatrix=tiny_imatrix(tmp_path_factory),
                   threads=2)
    assert "imatrix size" in str(err.value) and "blk." in str(err.value)
    assert list(out_dir.iterdir()) == []


def test_truncated_input_is_reported_and_nothing_written(tmp_path, tmp_path_factory):
    data = tiny_model(tmp_path_factory).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(q.QuantizeError) as err:
        q.quantize(bad, "Q4_0", out, threads=2)
    assert "bad.gguf" in str(err.value) and "Q4_0" in str(err.value)
    assert list(out.parent.iterdir()) == []
    not_gguf = tmp_path / "a.txt"
    not_gguf.write_text("hello")
    with pytest.raises(q.QuantizeError, match="not a GGUF"):
        q.quantize(not_gguf, "Q4_0", out)


def test_cli_prints_sizes_and_time(tmp_path, tmp_path_factory, capsys):
    src = tiny_model(tmp_path_factory)
    out = tmp_path / "tiny-q8.gguf"
    assert q.main([str(src), "q8_0", "--out", str(out), "--threads", "2"]) == 0
    line = capsys.readouterr().out
    in_mb, out_mb = src.stat().st_size / 2**20, out.stat().st_size / 2**20
    assert f"({in_mb:.1f} MiB)" in line and f"({out_mb:.1f} MiB," in line
    assert "as Q8_0 in" in line and line.rstrip().endswith("s")


def test_default_output_name(tmp_path):
    assert q.default_output(tmp_path / "model-f16.gguf", "Q4_K_M").name == "model-Q4_K_M.gguf"
    assert q.default_output(tmp_path / "SmolLM2.Q4_1.gguf", "Q8_0").name == "SmolLM2-Q8_0.gguf"
    assert q.normalize_type("q4_k") == "Q4_K_M"
    with pytest.raises(q.QuantizeError, match="unknown quantization type 'Q9'"):
        q.normalize_type("Q9")


def test_quantized_input_needs_allow_requantize(smollm2_path, tmp_path):
    out = tmp_path / "smol-q8.gguf"
    with pytest.raises(q.QuantizeError) as err:
        q.quantize(smollm2_path, "Q8_0", out, threads=2)
    assert "requantizing from type q4_1 is disabled" in str(err.value)
    assert "--allow-requantize" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    res = q.quantize(smollm2_path, "Q8_0", out, threads=2, allow_requantize=True)
    assert GGUFReader(res.out).fields["general.file_type"].contents() == q.FILE_TYPES["Q8_0"]


def test_a_quantization_that_fell_back_says_so(tmp_path, smollm2_path):
    """Issue 14: SmolLM2's 576-wide rows are not a multiple of K-quants' 256-wide block, so a
    Q4_K_M file is mostly Q5_0/Q8_0, and quantize said nothing."""
    from hublabio_tools.gguf_float import write_tiny_llama

    src = write_tiny_llama(tmp_path / "narrow-f16.gguf", smollm2_path, n_layer=2, n_embd=96,
                           n_ff=160, n_head=2, n_head_kv=1)
    res = q.quantize(src, "Q4_K_M", tmp_path / "narrow-q4km.gguf")
    assert res.main_type_share < 0.5 and "only" in res.fallback
    assert "rows of 96, 160 are not a multiple of the 256-wide Q4_K block" in res.fallback
    assert "Q4_0" in res.fallback
    ok = q.quantize(src, "Q4_0", tmp_path / "narrow-q40.gguf")
    assert ok.fallback is None and ok.main_type_share > 0.5
