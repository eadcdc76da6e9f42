"""The device router: featurization, the shipped ONNX router on real text, the keyword
fallback, strategies, and clear errors for a broken router directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hublabio.config import load_experts
from hublabio.errors import RouterError
from hublabio.router import (
    All,
    KeywordRouter,
    OnnxRouter,
    Route,
    Single,
    Threshold,
    TopK,
    load_router,
    parse_strategy,
    select_with_fallback,
)
from hublabio.router_features import (
    DEFAULT_SPEC,
    FeatureSpec,
    featurize,
    featurize_into,
    featurize_sparse,
    tokens,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "router"
DATA = REPO / "data" / "router_queries.jsonl"
# Held-out accuracy of the shipped router, measured by train-router (models/router/README.md);
# the bound leaves a small margin below it.
HELD_OUT_BOUND = 0.83


@pytest.fixture(scope="module")
def onnx_router() -> OnnxRouter:
    return OnnxRouter.load(SHIPPED)


@pytest.fixture(scope="module")
def shipped_experts():
    experts, errors = load_experts(REPO / "models")
    assert not errors
    return experts


# ------------------------------------------------------------------------------ features

def test_identifiers_give_sub_tokens_and_compounds():
    toks = tokens("Why does DataFrame.groupby drop NaN keys?", word_ngrams=2)
    for t in ("w:dataframe", "w:groupby", "w:data", "w:frame", "c:dataframe.groupby",
              "b:dataframe groupby"):
        assert t in toks
    toks = tokens("Box<dyn Error> vs tokio::spawn and read_csv")
    for t in ("w:box", "w:dyn", "w:error", "c:box<dyn", "c:tokio::spawn", "w:tokio",
              "w:spawn", "w:read", "w:csv", "c:read_csv"):
        assert t in toks
    assert "w:cuda" in tokens("CUDA out of memory")
    assert "b:out of" in tokens("CUDA out of memory", word_ngrams=2)
    assert not any(t.startswith("b:") for t in tokens("CUDA out of memory"))


def test_features_are_deterministic_normalised_and_hash_seed_independent():
    text = "systemctl status says the unit failed: exit code 203/EXEC"
    idx1, val1 = featurize_sparse(text)
    idx2, val2 = featurize_sparse(text)
    assert np.array_equal(idx1, idx2) and np.array_equal(val1, val2)
    assert abs(float(np.dot(val1, val1)) - 1.0) < 1e-5
    assert np.all(np.diff(idx1) > 0) and idx1.max() < DEFAULT_SPEC.dim
    # another interpreter with a different str hash seed computes the same vector
    code = ("import sys, numpy as np; from hublabio.router_features import featurize_sparse; "
            "i, v = featurize_sparse(sys.argv[1]); "
            "print(','.join(map(str, i.tolist()))); print(v.tobytes().hex())")
    for seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        lines = out.split()
        assert lines[0] == ",".join(map(str, idx1.tolist()))
        assert lines[1] == val1.tobytes().hex()


def test_case_and_whitespace_do_not_matter_but_words_do():
    a = featurize("How do I fix   CUDA out of memory")[0]
    b = featurize("how do i fix cuda out of memory")[0]
    c = featurize("how do i fix cargo build errors")[0]
    assert np.array_equal(a, b)
    assert float(a @ c) < 0.6


def test_device_row_reuse_equals_fresh_matrix():
    texts = ["TypeError: 'NoneType' object is not subscriptable", "", "ÄÖÜ naïve café ☕",
             "x", "borrowed value does not live long enough"]
    fresh = featurize(texts)
    row = np.zeros(DEFAULT_SPEC.dim, dtype=np.float32)
    for i, text in enumerate(texts):
        touched = featurize_into(row, text)
        assert np.array_equal(row, fresh[i])
        row[touched] = 0.0
        assert not row.any()
    assert not fresh[1].any()  # empty text -> zero vector, no error


def test_tools_use_the_device_featurizer():
    from hublabio_tools import router_train

    assert router_train.featurize is featurize
    assert router_train.FeatureSpec is FeatureSpec


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "features.version"),
    ({"kind": "bert-tokenizer"}, "features.kind"),
    ({"dim": 1000}, "features.dim"),
    ({"char_max": 12}, "char_max"),
    ({"ngram_hash": "murmur"}, "unknown parameter"),
    ({"word_weight": "high"}, "features.word_weight"),
])
def test_feature_spec_refuses_what_it_does_not_understand(change, message):
    with pytest.raises(RouterError, match=message):
        FeatureSpec.from_dict({**DEFAULT_SPEC.to_dict(), **change})
    assert FeatureSpec.from_dict(DEFAULT_SPEC.to_dict()) == DEFAULT_SPEC


# ---------------------------------------------------------------------- shipped ONNX router

@pytest.mark.parametrize("text, domain", [
    ("TypeError: list indices must be integers or slices, not str", "python"),
    ("pandas read_excel skips the first row of my sheet", "python"),
    ("cannot borrow `self.items` as mutable because it is also borrowed as immutable", "rust"),
    ("how do I share a HashMap between tokio tasks", "rust"),
    ("journalctl shows my unit failed to start after a reboot", "system"),
    ("the fan on my Pi never turns on even at 80 degrees", "system"),
    ("CUDA out of memory when fine-tuning with a bigger LoRA rank", "ai"),
    ("how many attention heads should a small transformer have", "ai"),
    ("What's a good recipe for banana bread?", "general"),
    ("Who was the first emperor of Rome?", "general"),
])
def test_onnx_router_routes_clear_questions(onnx_router, text, domain):
    scores = onnx_router.score(text)
    assert set(scores) == {"ai", "general", "python", "rust", "system"}
    assert abs(sum(scores.values()) - 1.0) < 1e-5
    assert max(scores, key=scores.get) == domain, scores


def test_onnx_router_held_out_accuracy_beats_keywords(onnx_router, shipped_experts):
    from hublabio_tools.router_train import read_examples, stratified_split

    trained = onnx_router.meta["trained"]
    examples = read_examples(DATA)
    domains = onnx_router.domains
    labels = np.array([domains.index(e.domain) for e in examples])
    _, held = stratified_split(labels, len(domains), trained["holdout"], trained["seed"])
    texts = [examples[i].text for i in held]
    scored = onnx_router.score_many(texts)
    predicted = np.array([domains.index(max(s, key=s.get)) for s in scored])
    accuracy = float(np.mean(predicted == labels[held]))
    assert accuracy == pytest.approx(trained["accuracy"], abs=1e-4)
    assert accuracy >= HELD_OUT_BOUND
    keyword = KeywordRouter(shipped_experts)
    kw_correct = 0
    for text, label in zip(texts, labels[held]):
        s = keyword.score(text)
        pick = max(sorted(s), key=s.get) if any(s.values()) else "general"
        kw_correct += pick == domains[label]
    assert accuracy > kw_correct / len(texts) + 0.1


def test_score_and_score_many_agree(onnx_router):
    texts = ["asyncio.gather swallows my exception", "serde rename a field",
             "how do I plant tulips"]
    many = onnx_router.score_many(texts)
    for text, batch in zip(texts, many):
        single = onnx_router.score(text)
        assert all(abs(single[d] - batch[d]) < 1e-6 for d in single)


# ------------------------------------------------------------------------- keyword router

def test_keyword_router_counts_whole_words():
    router = KeywordRouter({"python": ["python", "pip", "pandas"], "cpp": ["c++"],
                            "general": []})
    assert router.domains == ["python", "cpp", "general"]
    assert router.score("my pipeline of pipes") == {"python": 0.0, "cpp": 0.0, "general": 0.0}
    s = router.score("Pip can't install pandas for Python, but C++ builds fine")
    assert s == {"python": 0.75, "cpp": 0.25, "general": 0.0}
    assert select_with_fallback(TopK(2), router.score("hello")) == [Route("general", 0.0)]


def test_keyword_router_from_expert_configs(shipped_experts):
    router = KeywordRouter(shipped_experts)
    assert set(router.domains) == {"ai", "general", "python", "rust", "system"}
    scores = router.score("pandas DataFrame groupby in a jupyter notebook")
    assert max(scores, key=scores.get) == "python"
    assert abs(sum(scores.values()) - 1.0) < 1e-9


# ------------------------------------------------------------------------------ strategies

SCORES = {"python": 0.55, "ai": 0.30, "rust": 0.10, "system": 0.05, "general": 0.0}


def test_topk_single_all():
    assert TopK(2).select(SCORES) == [Route("python", 0.55), Route("ai", 0.30)]
    assert [r.domain for r in TopK(9).select(SCORES)] == ["python", "ai", "rust", "system"]
    assert Single().select(SCORES) == [Route("python", 0.55)]
    assert [r.domain for r in All().select(SCORES)] == ["python", "ai", "rust", "system",
                                                         "general"]
    assert TopK(2).select({"b": 0.5, "a": 0.5}) == [Route("a", 0.5), Route("b", 0.5)]
    with pytest.raises(RouterError, match="k must be"):
        TopK(0)


def test_threshold_with_per_domain_overrides():
    assert Threshold(0.25).select(SCORES) == [Route("python", 0.55), Route("ai", 0.30)]
    assert Threshold(0.25, {"python": 0.6}).select(SCORES) == [Route("ai", 0.30)]
    assert Threshold(0.5, {"rust": 0.1, "system": 0.2}).select(SCORES) == [
        Route("python", 0.55), Route("rust", 0.10)]
    with pytest.raises(RouterError, match="threshold of 'ai'"):
        Threshold(0.5, {"ai": 1.5})


def test_fallback_to_general_when_nothing_passes():
    assert select_with_fallback(Threshold(0.9), SCORES) == [Route("general", 0.0)]
    assert select_with_fallback(Threshold(0.9), {**SCORES, "general": 0.01}) == [
        Route("general", 0.01)]
    assert select_with_fallback(Threshold(0.9), SCORES, fallback="ai") == [Route("ai", 0.30)]
    assert select_with_fallback(TopK(1), SCORES) == [Route("python", 0.55)]


def test_parse_strategy():
    assert parse_strategy("topk", k="3") == TopK(3)
    assert parse_strategy("Top-K") == TopK(2)
    assert parse_strategy("threshold", t="0.4", per_domain={"ai": 0.2}) == Threshold(0.4,
                                                                                    {"ai": 0.2})
    assert parse_strategy("single") == Single() and parse_strategy("all") == All()
    with pytest.raises(RouterError, match="unknown routing strategy 'best'"):
        parse_strategy("best")
    with pytest.raises(RouterError, match="takes no parameter"):
        parse_strategy("single", k=2)
    with pytest.raises(RouterError, match="not a number"):
        parse_strategy("topk", k="two")


# ------------------------------------------------------------------- broken router dirs

def _copy_router(tmp_path: Path) -> Path:
    target = tmp_path / "router"
    shutil.copytree(SHIPPED, target)
    return target


def test_corrupt_onnx_file_gives_clear_error_and_keyword_fallback(tmp_path, shipped_experts):
    router_dir = _copy_router(tmp_path)
    data = (router_dir / "router.onnx").read_bytes()
    (router_dir / "router.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(RouterError) as err:
        OnnxRouter.load(router_dir)
    assert str(router_dir / "router.onnx") in str(err.value)
    assert "not a loadable ONNX model" in str(err.value)
    router, warning = load_router(router_dir, shipped_experts)
    assert isinstance(router, KeywordRouter)
    assert "router.onnx" in warning and "keywords" in warning
    scores = router.score("pip install fails in my venv")
    assert max(scores, key=scores.get) == "python"


@pytest.mark.parametrize("edit, message", [
    (lambda doc: "{not json", "not valid JSON (line 1"),
    (lambda doc: json.dumps({**doc, "domains": []}), "domains: expected a non-empty list"),
    (lambda doc: json.dumps({**doc, "domains": ["ai", "ai", "python", "rust", "system"]}),
     "duplicate"),
    (lambda doc: json.dumps({k: v for k, v in doc.items() if k != "features"}),
     "features: missing"),
    (lambda doc: json.dumps({**doc, "features": {**doc["features"], "version": 99}}),
     "features.version"),
    (lambda doc: json.dumps({**doc, "features": {**doc["features"], "dim": 1024}}),
     "does not match"),
    (lambda doc: json.dumps({**doc, "domains": doc["domains"][:4]}), "expected (1, 4)"),
])
def test_bad_domains_json_is_refused(tmp_path, edit, message, shipped_experts):
    router_dir = _copy_router(tmp_path)
    path = router_dir / "domains.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(RouterError, match=re.escape(message)) as err:
        OnnxRouter.load(router_dir)
    assert str(router_dir) in str(err.value)
    router, warning = load_router(router_dir, shipped_experts)
    assert isinstance(router, KeywordRouter) and "keywords" in warning


def test_missing_files(tmp_path, shipped_experts):
    router_dir = _copy_router(tmp_path)
    (router_dir / "router.onnx").unlink()
    with pytest.raises(RouterError, match="router.onnx: missing"):
        OnnxRouter.load(router_dir)
    router_dir = _copy_router(tmp_path / "b")
    (router_dir / "domains.json").unlink()
    with pytest.raises(RouterError, match="domains.json: missing"):
        OnnxRouter.load(router_dir)
    router, warning = load_router(tmp_path / "nothing-here", {"python": ["pip"]})
    assert isinstance(router, KeywordRouter) and "no ONNX router" in warning
    router, warning = load_router(SHIPPED, shipped_experts)
    assert isinstance(router, OnnxRouter) and warning is None


def test_score_is_safe_from_several_threads(onnx_router):
    from concurrent.futures import ThreadPoolExecutor

    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()[::15]]
    serial = [onnx_router.score(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(onnx_router.score, texts))
    assert threaded == serial


def test_topk_skips_domains_the_router_all_but_rules_out():
    from hublabio.router import TopK

    scores = {"python": 0.93, "rust": 0.04, "general": 0.03}
    assert [r.domain for r in TopK(2).select(scores)] == ["python"]
    assert [r.domain for r in TopK(2, min_probability=0.0).select(scores)] == ["python", "rust"]
    with pytest.raises(RouterError):
        TopK(2, min_probability=1.5)
