"""The seed's transformer router (hublabio.router_transformer) against the torch model it was
exported from: same probabilities, the seed's folder layout, clear errors and the keyword
fallback for what cannot run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hublabio.router import KeywordRouter, load_router
from hublabio.router_transformer import TransformerRouter

from .seed_router_fixture import QUESTIONS, SEED_DOMAINS, SEQ_LEN, hf_tokenizer

KEYWORDS = {"python": ["python"], "general": []}


def test_scores_equal_the_torch_model_it_was_exported_from(seed_router):
    import torch

    out, model = seed_router
    router, warning = load_router(out, KEYWORDS)
    assert warning is None and isinstance(router, TransformerRouter)
    assert router.domains == SEED_DOMAINS and router.seq_len == SEQ_LEN
    tok = hf_tokenizer(out / "final" / "tokenizer.json")
    texts = ["How do I use pandas?", "cargo and the borrow checker",
             "a question with words it never saw: zyzzyva " * 60]  # > 256 tokens: truncated
    with torch.no_grad():
        batch = tok(texts, truncation=True, max_length=SEQ_LEN, padding="max_length",
                    return_tensors="pt")
        want = torch.softmax(model(**batch).logits, dim=-1).numpy()
    got = np.array([[s[d] for d in SEED_DOMAINS] for s in router.score_many(texts)])
    assert np.abs(got - want).max() < 1e-4, (got, want)
    enc = router.encode(texts)
    assert np.array_equal(enc["input_ids"], batch["input_ids"].numpy())
    assert np.array_equal(enc["attention_mask"], batch["attention_mask"].numpy())


def test_the_trained_router_routes_its_domains(seed_router):
    router, _ = load_router(seed_router[0], KEYWORDS)
    for domain, questions in QUESTIONS.items():
        for q in questions:
            scores = router.score(q)
            assert max(scores, key=scores.get) == domain, (q, scores)
            assert abs(sum(scores.values()) - 1.0) < 1e-6


def test_tokenizer_beside_the_onnx_file_works_too(seed_router, tmp_path):
    out = tmp_path / "router"
    out.mkdir()
    shutil.copy(seed_router[0] / "router.onnx", out)
    for name in ("tokenizer.json", "domains.json"):
        shutil.copy(seed_router[0] / "final" / name, out)
    router, warning = load_router(out, KEYWORDS)
    assert warning is None and router.score("How do I use pandas?")["python"] > 0.5


@pytest.mark.parametrize("remove, message", [
    ("tokenizer.json", r"tokenizer\.json: missing; the seed's transformer router needs its "
                       r"tokenizer\.json beside router\.onnx"),
    ("domains.json", r"domains\.json: missing"),
])
def test_a_missing_companion_file_is_named_and_keywords_route(seed_router, tmp_path, remove,
                                                               message):
    out = tmp_path / "router"
    shutil.copytree(seed_router[0], out)
    (out / "final" / remove).unlink()
    router, warning = load_router(out, KEYWORDS)
    assert isinstance(router, KeywordRouter)
    assert warning and __import__("re").search(message, warning), warning
    assert warning.endswith("routing by keywords instead")


def test_a_broken_tokenizer_and_an_onnx_of_neither_format(seed_router, tmp_path):
    out = tmp_path / "router"
    shutil.copytree(seed_router[0], out)
    (out / "final" / "tokenizer.json").write_text("{not json")
    router, warning = load_router(out, KEYWORDS)
    assert isinstance(router, KeywordRouter) and "not a tokenizers tokenizer.json" in warning

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["scores"])], "other",
                              [helper.make_tensor_value_info("text", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]),
              str(out / "router.onnx"))
    router, warning = load_router(out, KEYWORDS)
    assert isinstance(router, KeywordRouter)
    assert "expected one input named 'features'" in warning and "input_ids" in warning
