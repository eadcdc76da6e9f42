"""`hublab-tools train-router` end to end on the shipped query set: seeded reproducibility,
ONNX == PyTorch check, metrics, bad input, and the device loading what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hublabio.router import OnnxRouter
from hublabio_tools import router_train
from hublabio_tools.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "router_queries.jsonl"
# Small and quick, but the full shipped data set.
FAST = ["--epochs", "4", "--hidden", "16", "--dim", "8192", "--seed", "3"]


def _train(out: Path, *extra: str) -> dict:
    args = router_train.build_parser().parse_args(["--data", str(DATA), "--out", str(out),
                                                   *FAST, *extra])
    return router_train.train_router(args)


def test_train_router_end_to_end_is_reproducible(tmp_path, capsys):
    first = _train(tmp_path / "a")
    out = capsys.readouterr().out
    assert "router (ONNX) on the held-out split: accuracy" in out
    assert "keyword router on the same split" in out and "confusion" in out
    second = _train(tmp_path / "b")
    assert first == second
    assert ((tmp_path / "a" / "router.onnx").read_bytes()
            == (tmp_path / "b" / "router.onnx").read_bytes())

    trained = first["trained"]
    assert trained["onnx_max_abs_diff"] <= 1e-5
    assert trained["parameters"] == 8192 * 16 + 16 + 16 * 5 + 5
    assert trained["n_holdout"] + trained["n_train"] == sum(
        1 for line in DATA.read_text().splitlines() if line.strip())
    rep = first["holdout"]
    assert rep["accuracy"] > 0.6
    assert set(rep["per_domain"]) == {"ai", "general", "python", "rust", "system"}
    cm = np.array(rep["confusion"])
    assert cm.sum() == trained["n_holdout"]
    assert np.trace(cm) / cm.sum() == pytest.approx(rep["accuracy"], abs=1e-4)
    assert first["keyword_router"]["accuracy"] < rep["accuracy"]
    assert len(first["misrouted"]) == cm.sum() - np.trace(cm)

    # the device loads what was written and reproduces the held-out accuracy
    router = OnnxRouter.load(tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "domains.json").read_text())
    assert doc["features"]["dim"] == 8192 and router.domains == doc["domains"]
    examples = router_train.read_examples(DATA)
    labels = np.array([router.domains.index(e.domain) for e in examples])
    _, held = router_train.stratified_split(labels, 5, 0.2, 3)
    scored = router.score_many([examples[i].text for i in held])
    predicted = np.array([router.domains.index(max(s, key=s.get)) for s in scored])
    assert float(np.mean(predicted == labels[held])) == pytest.approx(rep["accuracy"], abs=1e-4)


def test_stratified_split_is_seeded_and_per_domain():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3)
    train, held = router_train.stratified_split(labels, 3, 0.2, seed=7)
    again = router_train.stratified_split(labels, 3, 0.2, seed=7)
    assert np.array_equal(held, again[1])
    assert not set(train) & set(held) and len(train) + len(held) == len(labels)
    assert [int(np.sum(labels[held] == c)) for c in range(3)] == [10, 2, 1]
    other = router_train.stratified_split(labels, 3, 0.2, seed=8)[1]
    assert not np.array_equal(held, other)


def test_bad_lines_are_reported_with_line_numbers_and_nothing_written(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"text": "how do I boil an egg", "domain": "general"}\n'
                    '{"text": "broken\n'
                    '\n'
                    '{"text": "pip fails", "label": "python"}\n'
                    '["not", "an", "object"]\n'
                    '{"text": "", "domain": "rust"}\n')
    out = tmp_path / "out"
    code = cli_main(["train-router", "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "4 bad line(s)" in err
    for line in (2, 4, 5, 6):
        assert f"{data}:{line}:" in err
    assert f"{data}:1:" not in err
    assert not out.exists()


def test_too_few_examples_per_domain(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"text": f"q{i}", "domain": d}) + "\n"
                            for i, d in enumerate(["a", "a", "a", "b"])))
    assert cli_main(["train-router", "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "at least 2 examples" in capsys.readouterr().err


def test_onnx_mismatch_fails_loudly(tmp_path, monkeypatch, capsys):
    real = router_train.onnx_probs
    monkeypatch.setattr(router_train, "onnx_probs", lambda b, x: real(b, x) + 1e-3)
    out = tmp_path / "out"
    code = router_train.main(["--data", str(DATA), "--out", str(out), *FAST, "--epochs", "1"])
    assert code == 1
    assert "ONNX outputs differ from PyTorch" in capsys.readouterr().err
    assert not (out / "router.onnx").exists() and not (out / "domains.json").exists()


def test_help_is_the_docstring(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train-router", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Train the device's domain router" in out and "--holdout" in out


@pytest.mark.slow
def test_shipped_router_is_reproduced_by_its_recorded_command(tmp_path):
    doc = json.loads((REPO / "models" / "router" / "domains.json").read_text())
    shipped = doc["trained"]
    features = doc["features"]
    args = ["--data", str(DATA), "--out", str(tmp_path), "--dim", str(features["dim"]),
            "--word-ngrams", str(features["word_ngrams"]), "--char-min", str(features["char_min"]),
            "--char-max", str(features["char_max"])]
    for key in ("seed", "epochs", "holdout", "hidden", "lr", "weight_decay", "dropout",
                "label_smoothing", "batch_size"):
        args += [f"--{key.replace('_', '-')}", str(shipped[key])]
    metrics = router_train.train_router(router_train.build_parser().parse_args(args))
    assert metrics["trained"]["data_sha256"] == shipped["data_sha256"]
    assert metrics["holdout"]["accuracy"] == shipped["accuracy"]
    assert metrics["trained"]["keyword_accuracy"] == shipped["keyword_accuracy"]
