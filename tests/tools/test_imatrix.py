"""hublab-tools imatrix: activations collected through llama.cpp's eval callback, checked against a
numpy computation, written in llama.cpp's format and consumed by quantize --imatrix."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFReader

from hublabio_tools import imatrix as imx
from hublabio_tools import quantize as q
from quant_fixtures import text_file, tiny_imatrix, tiny_model


def _weights(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def test_real_model_imatrix_has_every_matrix_with_positive_values(smollm2_path, tmp_path,
                                                                   tmp_path_factory, capsys):
    """SmolLM2 on real text: one entry per blk.* weight matrix, the right width, all positive."""
    calib = text_file(tmp_path_factory, "calibration")
    out = tmp_path / "smol.imatrix.gguf"
    assert imx.main([str(smollm2_path), str(calib), "--out", str(out), "--ctx", "128",
                     "--chunks", "2", "--threads", "2"]) == 0
    assert "210 matrices" in capsys.readouterr().out
    im = imx.load_imatrix(out)
    matrices = {n: t for n, t in _weights(smollm2_path).items()
                if n.startswith("blk.") and len(t.shape) == 2}
    assert set(im.sums) == set(matrices) and len(matrices) == 210
    for name, means in im.means().items():
        assert means.shape == (int(matrices[name].shape[0]),)  # one value per input column
        assert np.all(means > 0) and np.all(np.isfinite(means))
        assert im.counts[name].tolist() == [256]  # 2 chunks x 128 tokens
    assert im.chunk_count == 2 and im.chunk_size == 128 and im.datasets == [calib.name]
    fields = GGUFReader(out).fields
    assert fields["general.type"].contents() == "imatrix"


def test_collected_values_match_a_numpy_forward(tmp_path_factory):
    """Layer 0's attn_q input is RMSNorm(token embeddings) (norm weights are 1 in the tiny model):
    the imatrix entry must equal the mean of its squares per column over the same tokens."""
    from hublabio_tools.llama_context import LlamaModel

    model = tiny_model(tmp_path_factory)
    text = text_file(tmp_path_factory, "calibration").read_text(encoding="utf-8")
    im = imx.compute_imatrix(model, text, n_ctx=64, n_chunks=2, threads=2)
    with LlamaModel(model, n_ctx=64) as m:
        tokens = m.tokenize(text)[:128]
    emb = _weights(model)["token_embd.weight"]
    table = np.asarray(emb.data, dtype=np.float32).reshape(-1, int(emb.shape[0]))
    x = table[tokens].astype(np.float64)
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-5)
    expected = (x * x).mean(axis=0)
    got = im.means()["blk.0.attn_q.weight"]
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    # q, k and v read the same input
    np.testing.assert_allclose(im.means()["blk.0.attn_k.weight"], got, rtol=1e-6)
    assert im.counts["blk.0.ffn_down.weight"].tolist() == [128]
    assert im.sums["blk.0.ffn_down.weight"].shape == (1, 256)


def test_round_trip_and_legacy_format(tmp_path):
    im = imx.Imatrix(sums={"blk.0.attn_q.weight": np.array([[2.0, 4.0, 6.0]])},
                     counts={"blk.0.attn_q.weight": np.array([2])}, chunk_count=1, chunk_size=2,
                     datasets=["d.txt"])
    p = imx.save_imatrix(tmp_path / "a.imatrix.gguf", im)
    back = imx.load_imatrix(p)
    np.testing.assert_allclose(back.means()["blk.0.attn_q.weight"], [1.0, 2.0, 3.0])
    assert back.datasets == ["d.txt"] and back.chunk_size == 2
    # llama.cpp's legacy .dat: n_entries, then (len, name, ncall, nval, values*ncall), chunks, dataset
    name = b"blk.0.ffn_up.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 2)
    raw += struct.pack("<2f", 8.0, 12.0) + struct.pack("<i", 4) + struct.pack("<i", 3) + b"cal"
    legacy = tmp_path / "old.dat"
    legacy.write_bytes(raw)
    old = imx.load_imatrix(legacy)
    np.testing.assert_allclose(old.means()["blk.0.ffn_up.weight"], [2.0, 3.0])
    assert old.datasets == ["cal"] and old.chunk_count == 4


def test_bad_imatrix_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00\x00\x00\x00garbage")
    with pytest.raises(imx.ImatrixError, match="junk.dat"):
        imx.load_imatrix(junk)
    with pytest.raises(imx.ImatrixError, match="missing.gguf"):
        imx.load_imatrix(tmp_path / "missing.gguf")
    nan = imx.Imatrix(sums={"blk.0.x.weight": np.array([[np.nan, 1.0]])},
                      counts={"blk.0.x.weight": np.array([1])}, chunk_count=1, chunk_size=1)
    p = imx.save_imatrix(tmp_path / "nan.gguf", nan)
    with pytest.raises(imx.ImatrixError, match="non-finite"):
        imx.load_imatrix(p)


def test_too_little_text_is_a_clear_error(tmp_path_factory):
    with pytest.raises(imx.ImatrixError, match="needs at least 128"):
        imx.compute_imatrix(tiny_model(tmp_path_factory), "too short", n_ctx=128)


def test_imatrix_reaches_the_quantizer(tmp_path, tmp_path_factory):
    """Q4_0 with and without the imatrix differ (llama.cpp used it), and the file records it."""
    src, im = tiny_model(tmp_path_factory), tiny_imatrix(tmp_path_factory)
    plain = q.quantize(src, "Q4_0", tmp_path / "plain.gguf", threads=2)
    guided = q.quantize(src, "Q4_0", tmp_path / "guided.gguf", imatrix=im, threads=2)
    a, b = _weights(plain.out), _weights(guided.out)
    assert a["blk.1.attn_q.weight"].data.tobytes() != b["blk.1.attn_q.weight"].data.tobytes()
    fields = GGUFReader(guided.out).fields
    assert fields["quantize.imatrix.file"].contents() == im.name
    assert int(fields["quantize.imatrix.entries_count"].contents()) == 14
    assert "quantize.imatrix.file" not in GGUFReader(plain.out).fields


def test_gemma_imatrix_covers_every_matrix(gemma_path, tmp_path_factory):
    """A second architecture (Gemma 3: GELU gate, extra norms, SWA layers) through the callback."""
    text = text_file(tmp_path_factory, "calibration").read_text(encoding="utf-8")
    im = imx.compute_imatrix(gemma_path, text, n_ctx=64, n_chunks=1, threads=2)
    matrices = {n for n, t in _weights(gemma_path).items()
                if n.startswith("blk.") and len(t.shape) == 2}
    assert set(im.sums) == matrices
    weights = _weights(gemma_path)
    for name, m in im.means().items():
        assert np.isfinite(m).all() and (m >= 0).all()
        zero = set(np.flatnonzero(m == 0).tolist())
        if name.endswith(("ffn_gate.weight", "ffn_up.weight")):
            # Gemma's ffn_norm has exact zeros: those input columns are truly always 0
            norm = np.asarray(weights[name.rsplit(".", 2)[0] + ".ffn_norm.weight"].data)
            assert zero == set(np.flatnonzero(norm == 0).tolist()), name
        else:
            assert not zero, name
    assert 1.0 < im.ppl < 100.0
