"""hublab-tools eval (perplexity through llama.cpp) and card (sizes, perplexity, board advice)."""

from __future__ import annotations

import math

import pytest

from hublabio.gguf_info import read_gguf_info
from hublabio_tools import card
from hublabio_tools import evaluate as ev
from hublabio_tools.quantize import quantize
from quant_fixtures import smollm2_f16, text_file, tiny_imatrix, tiny_model


def test_smollm2_perplexity_on_real_text_is_sane(smollm2_path, tmp_path_factory, capsys):
    text = text_file(tmp_path_factory, "evaluation")
    assert ev.main([str(smollm2_path), str(text), "--ctx", "128", "--chunks", "2",
                    "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "PPL = " in out and "2 chunks x 128 tokens, 126 scored" in out
    r = ev.perplexity(smollm2_path, text.read_text(), n_ctx=128, n_chunks=2)
    assert math.isfinite(r.ppl) and 2.0 < r.ppl < 60.0, r  # a 135M model on English docs
    assert 0 < r.stderr < r.ppl
    assert r.tokens_scored == 2 * (128 - 64 - 1)


def test_random_model_is_near_uniform(tmp_path_factory):
    """A random tiny model can't predict text: its perplexity is of the order of the vocabulary."""
    r = ev.perplexity(tiny_model(tmp_path_factory), text_file(tmp_path_factory, "evaluation").read_text(),
                      n_ctx=64, n_chunks=2)
    assert 5_000 < r.ppl < 500_000


def test_too_short_text_is_a_clear_error(smollm2_path):
    with pytest.raises(ev.EvalError, match="needs at least 512"):
        ev.perplexity(smollm2_path, "Just a sentence.", n_ctx=512)


@pytest.mark.slow
def test_q2_k_scores_worse_than_q8_0_of_the_same_source(tmp_path, tmp_path_factory):
    src = smollm2_f16(tmp_path_factory)
    text = text_file(tmp_path_factory, "evaluation").read_text()
    scores = {}
    for t in ("Q8_0", "Q2_K"):
        out = quantize(src, t, tmp_path / f"smol-{t}.gguf", threads=2).out
        scores[t] = ev.perplexity(out, text, n_ctx=128, n_chunks=2).ppl
    f16 = ev.perplexity(src, text, n_ctx=128, n_chunks=2).ppl
    assert scores["Q2_K"] > scores["Q8_0"] * 1.05, scores
    assert abs(scores["Q8_0"] - f16) / f16 < 0.02, (scores, f16)  # Q8_0 is near lossless


def test_card_has_real_sizes_perplexity_and_board_advice(tmp_path, tmp_path_factory):
    src = tiny_model(tmp_path_factory)
    folder = tmp_path / "release"
    folder.mkdir()
    for t in ("Q8_0", "Q4_0"):
        quantize(src, t, folder / f"tiny-{t}.gguf", threads=2)
    (folder / "tiny.imatrix.gguf").write_bytes(b"GGUF")  # skipped by name
    (folder / "importance.gguf").write_bytes(tiny_imatrix(tmp_path_factory).read_bytes())  # by type
    evaltext = text_file(tmp_path_factory, "evaluation")
    out = tmp_path / "README.md"
    assert card.main([str(folder), "--eval-text", str(evaltext), "--ctx", "64", "--chunks", "1",
                      "--threads", "2", "--license", "apache-2.0", "--base-model",
                      "HuggingFaceTB/SmolLM2-135M-Instruct", "--out", str(out)]) == 0
    text = out.read_text()
    assert "license: apache-2.0" in text and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text
    for t in ("Q8_0", "Q4_0"):
        p = folder / f"tiny-{t}.gguf"
        row = next(line for line in text.splitlines() if line.startswith(f"| {p.name} |"))
        assert f"({p.stat().st_size} bytes)" in row and f"| {t} |" in row
        assert " ± " in row  # measured perplexity
    files_section = text.split("## Files")[1].split("## Which")[0]
    assert "imatrix" not in files_section and "importance" not in files_section
    for label, _, _ in card.BOARDS:
        assert f"| {label} |" in text
    assert "Raspberry Pi Zero 2 W (512 MB) | 384 MiB |" in text  # 512 MB minus its OS reserve


def test_recommendation_logic(tmp_path, smollm2_path, tmp_path_factory):
    """Pure choice: quantized over float, smallest within 1% of the best perplexity, budgets."""
    small = card.Entry(smollm2_path, read_gguf_info(smollm2_path), ppl=10.0)
    f16 = card.Entry(tmp_path / "f16.gguf", read_gguf_info(smollm2_f16(tmp_path_factory)), ppl=9.0)
    advice = card.recommend([small, f16], 2048)
    assert all(a.entry is small for a in advice)  # F16 is never preferred over a quantized file
    better = card.Entry(tmp_path / "a.gguf", small.info, ppl=9.0)
    advice = card.recommend([small, better], 2048)
    assert all(a.entry is better for a in advice)  # clearly lower perplexity wins
    toy = [("toy (256 MB)", "", 256)]  # generic profile keeps 96 MiB back: 160 MiB budget
    [a] = card.recommend([f16], 2048, boards=toy)
    assert a.entry is None and a.note == "no file fits" and a.budget_mb == 160
    [a] = card.recommend([small, f16], 2048, boards=toy)
    assert a.entry is small and a.note.startswith("only with a context of")
    assert a.needs_mb <= 160 and a.max_context < 2048
    [a] = card.recommend([small], 2048, boards=[("huge", "", 65536)])
    assert a.entry is small and a.max_context == small.info.context_length


def test_eval_scores_a_base_with_an_adapter(smollm2_path, tmp_path, tmp_path_factory, capsys):
    """Issue 14: eval could not score a base together with an adapter (an expert)."""
    from integration.lora_fixture import make_lora_adapter

    adapter = make_lora_adapter(smollm2_path, tmp_path / "x.lora.gguf", seed=3, std_b=0.5)
    text = text_file(tmp_path_factory, "evaluation")
    plain = ev.perplexity(smollm2_path, text.read_text(), n_ctx=128, n_chunks=2)
    assert ev.main([str(smollm2_path), str(text), "--ctx", "128", "--chunks", "2",
                    "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"{smollm2_path.name} + x.lora.gguf: PPL = " in out
    with_adapter = float(out.split("PPL = ")[1].split()[0])
    assert with_adapter != pytest.approx(plain.ppl, rel=1e-3)  # the adapter was applied
    assert ev.main([str(smollm2_path), str(text), "--adapter", str(tmp_path / "none")]) == 1
