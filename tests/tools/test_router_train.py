"""`hublab-tools train-router` end to end on the shipped query set: seeded reproducibility,
ONNX == PyTorch check, metrics, bad input, and the device loading what it wrote."""

from __future__ import annotations

import json
import os
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


def test_calibration_error_counts_confidence_against_accuracy():
    labels = np.array([0, 0, 1, 1])
    right = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert router_train.expected_calibration_error(right, labels) == pytest.approx(0.1)
    # 0.9 confident and half wrong: the gap is 0.4
    half = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    assert router_train.expected_calibration_error(half, labels) == pytest.approx(0.4)


def test_reliability_bands_count_right_answers_per_band_of_the_top_probability():
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([[1.0, 0.0], [0.95, 0.05], [0.4, 0.6], [0.6, 0.4], [0.45, 0.55]])
    bands = router_train.reliability(probs, labels)
    by = {tuple(b["band"]): b for b in bands}
    assert by[(0.9, 1.0)] == {"band": [0.9, 1.0], "n": 2, "accuracy": 1.0,
                              "mean_probability": 0.975}            # 1.0 counts in the top band
    assert by[(0.5, 0.7)]["n"] == 3 and by[(0.5, 0.7)]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert by[(0.0, 0.5)]["n"] == 0 and by[(0.0, 0.5)]["accuracy"] is None


def test_temperature_recovers_the_scale_logits_were_sharpened_by():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2
    p = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    # an over-confident model: its logits are the calibrated ones times 3
    t = router_train.fit_temperature(true_logits * 3, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert router_train.fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_calibration_scales_the_exported_router_and_is_recorded(tmp_path):
    metrics = _train(tmp_path / "c", "--calibrate-folds", "3")
    trained, rep = metrics["trained"], metrics["holdout"]
    assert trained["calibrate_folds"] == 3 and trained["temperature"] != 1.0
    assert 0 <= rep["ece"] <= 1 and 0 <= rep["ece_uncalibrated"] <= 1
    assert sum(b["n"] for b in rep["reliability"]) == trained["n_holdout"]
    assert sum(b["n"] for b in rep["reliability_uncalibrated"]) == trained["n_holdout"]
    off = _train(tmp_path / "d", "--calibrate-folds", "0")["trained"]
    assert off["temperature"] == 1.0 and off["ece"] == off["ece_uncalibrated"]
    # the temperature does not change which domain wins, only how sure the router is
    assert off["accuracy"] == trained["accuracy"]


@pytest.mark.parametrize("folds", ["1", "-2"])
def test_calibrate_folds_must_be_off_or_two_or_more(tmp_path, capsys, folds):
    code = cli_main(["train-router", "--data", str(DATA), "--out", str(tmp_path / "o"),
                     "--calibrate-folds", folds])
    assert code == 1
    assert "--calibrate-folds must be 0 (off) or at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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


def _remade_extra_rows(extra: list[dict], out: Path) -> list[str]:
    """--extra arguments: each training-only rows file made again by its recorded prepare-data
    arguments and checked against its recorded sha256. They read Debian documentation that
    the test environment may lack, or hold in other versions: then the test is skipped and
    says why."""
    args = []
    for entry in extra:
        argv = list(entry["prepare_data_argv"])
        first = argv.index("--docs") + 1
        last = next((i for i in range(first, len(argv)) if argv[i].startswith("--")), len(argv))
        inputs = argv[first:last]
        missing = [p for p in inputs if not Path(p).exists()]
        if missing:
            pytest.skip(f"the shipped router's --extra rows read {', '.join(missing)}: apt-get "
                        "install python3.11-doc python-pandas-doc python-sklearn-doc rust-doc "
                        "debian-reference-en "
                        "manpages manpages-dev fortunes (models/router/README.md)")
        argv[argv.index("--out") + 1] = str(out)
        assert cli_main(["prepare-data", *argv]) == 0
        made = out / entry["file"]
        if router_train.file_sha256(made) != entry["sha256"]:
            pytest.skip(f"{entry['file']} made here differs from the shipped router's: this "
                        "machine's documentation (installed man pages, package versions) is not "
                        "the one it was made from")
        args += ["--extra", str(made)]
    return args


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HUBLAB_REPRODUCE") != "1",
                    reason="remaking the shipped router's rows and retraining it takes ~9 "
                           "minutes on 2 cores: HUBLAB_REPRODUCE=1 runs it (after retraining "
                           "the router, models/router/README.md)")
def test_shipped_router_is_reproduced_by_its_recorded_command(tmp_path):
    doc = json.loads((REPO / "models" / "router" / "domains.json").read_text())
    shipped = doc["trained"]
    features = doc["features"]
    args = ["--data", str(DATA), "--out", str(tmp_path), "--dim", str(features["dim"]),
            "--word-ngrams", str(features["word_ngrams"]), "--char-min", str(features["char_min"]),
            "--char-max", str(features["char_max"])]
    for key in ("seed", "epochs", "holdout", "hidden", "lr", "weight_decay", "dropout",
                "label_smoothing", "batch_size", "calibrate_folds"):
        args += [f"--{key.replace('_', '-')}", str(shipped[key])]
    args += _remade_extra_rows(shipped.get("extra", []), tmp_path / "extra")
    metrics = router_train.train_router(router_train.build_parser().parse_args(args))
    assert metrics["trained"]["data_sha256"] == shipped["data_sha256"]
    assert metrics["holdout"]["accuracy"] == shipped["accuracy"]
    assert metrics["trained"]["keyword_accuracy"] == shipped["keyword_accuracy"]
    assert metrics["trained"]["temperature"] == shipped["temperature"]
    assert metrics["holdout"]["ece"] == shipped["ece"]
