"""Synthesis rules on hand-written answers (pure logic; real expert answers are exercised in
tests/integration/test_moe.py)."""

from __future__ import annotations

import math

import pytest

from hublabio import synth
from hublabio.synth import ExpertAnswer


def ans(domain, text, conf, router_p, key="smol"):
    mean = None if conf is None else math.log(conf)
    return ExpertAnswer(domain, text, conf, mean, router_p, len(text.split()), key)


PY = ans("python", "Use a list comprehension to square numbers. It is fast and readable.", 0.40, 0.7)
AI = ans("ai", "Neural networks learn weights by gradient descent on a loss.", 0.65, 0.2)
GEN = ans("general", "A list comprehension squares numbers quickly. Loops work too.", 0.30, 0.1)


def test_confidence_from_logprobs_is_exp_of_mean():
    mean, conf = synth.confidence_from_logprobs([-0.5, -1.5, None, float("-inf")])
    assert mean == pytest.approx(-1.0)
    assert conf == pytest.approx(math.exp(-1.0))
    assert synth.confidence_from_logprobs([]) == (None, None)


def test_similarity_is_tf_cosine_without_stopwords():
    assert synth.similarity("the cat sat", "a cat sat") == pytest.approx(1.0)
    assert synth.similarity("cat", "dog") == 0.0
    # "cat cat dog" vs "cat": cos = 2 / (sqrt(5) * 1)
    assert synth.similarity("cat cat dog", "cat") == pytest.approx(2 / math.sqrt(5))
    assert synth.similarity("", "cat") == 0.0


def test_segments_keep_code_blocks_whole():
    text = "First do this. Then run:\n```python\nx = 1\nprint(x)\n```\nDone!"
    assert synth.segments(text) == ["First do this.", "Then run:",
                                    "```python\nx = 1\nprint(x)\n```", "Done!"]


def test_best_picks_highest_confidence_when_tokenizer_shared():
    s = synth.collect(synth.best("q", [PY, AI, GEN]))
    assert s.chosen == ["ai"] and s.text == AI.text and s.basis == "confidence"


def test_best_falls_back_to_router_probability_across_tokenizers():
    other = ans("ai", AI.text, 0.99, 0.2, key="gemma")
    s = synth.collect(synth.best("q", [PY, other]))
    assert s.basis == "router" and s.chosen == ["python"]


def test_best_treats_missing_confidence_as_incomparable():
    remote = ans("ai", AI.text, None, 0.9)
    s = synth.collect(synth.best("q", [PY, remote]))
    assert s.basis == "router" and s.chosen == ["ai"]


def test_voting_picks_the_answer_the_others_agree_with():
    a = ans("python", "Sort the list with sorted(), it returns a new sorted list.", 0.2, 0.4)
    b = ans("general", "Use sorted() to get a new sorted list from the list.", 0.3, 0.3)
    c = ans("ai", "Transformers use attention over tokens.", 0.9, 0.3)
    agree = synth.agreement([a, b, c])
    assert agree[2] < min(agree[0], agree[1])
    s = synth.collect(synth.voting("q", [a, b, c]))
    assert s.chosen[0] in ("python", "general")
    assert s.chosen[0] == ["python", "general"][int(agree[1] > agree[0])]


def test_voting_with_two_answers_ties_and_uses_confidence():
    s = synth.collect(synth.voting("q", [PY, AI]))
    assert s.chosen == ["ai"]


def test_concatenate_has_a_section_per_expert_in_router_order():
    s = synth.collect(synth.concatenate("q", [AI, PY, ans("rust", "Use cargo.", None, 0.05)]))
    lines = [l for l in s.text.splitlines() if l.startswith("### ")]
    assert lines == ["### python (confidence 0.40)", "### ai (confidence 0.65)",
                     "### rust (confidence n/a)"]
    for a in (AI, PY):
        assert a.text in s.text


def test_weighted_rule():
    weights, basis, plan = synth.weighted_plan([PY, AI, GEN])
    assert basis == "confidence"
    assert weights == pytest.approx([0.7 * 0.40, 0.2 * 0.65, 0.1 * 0.30])
    assert plan[0].domain == "python" and plan[0].reason == "primary"
    share = [w / sum(weights) for w in weights]
    for seg in plan[1:]:
        if seg.reason in ("supported", "below bar", "repeat"):
            # support = sum_i share_i * sim(seg, answer_i), with sim to its own answer = 1
            own = [PY, AI, GEN].index(next(a for a in (PY, AI, GEN) if a.domain == seg.domain))
            sims = [1.0 if i == own else synth.similarity(seg.text, a.text)
                    for i, a in enumerate([PY, AI, GEN])]
            assert seg.support == pytest.approx(sum(s * x for s, x in zip(share, sims)))
            assert (seg.support >= 0.5) == (seg.reason != "below bar")
    # the ai answer shares nothing with python's: its sentences lack support
    assert all(not s.included for s in plan if s.domain == "ai")
    s = synth.collect(synth.weighted("q", [PY, AI, GEN]))
    assert s.text.startswith(PY.text)
    for seg in plan[1:]:
        assert (seg.text in s.text) == seg.included


def test_weighted_appends_supported_new_sentences_and_skips_repeats():
    a = ans("python", "Use sorted() on the list. sorted() returns a new list.", 0.5, 0.5)
    b = ans("general", "Use sorted() on the list. The original list stays unchanged by sorted().",
            0.5, 0.5)
    weights, _, plan = synth.weighted_plan([a, b])
    reasons = {p.text: p.reason for p in plan[1:]}
    assert reasons["Use sorted() on the list."] == "repeat"
    assert reasons["The original list stays unchanged by sorted()."] == "supported"
    s = synth.collect(synth.weighted("q", [a, b]))
    assert s.text == a.text + "\n\nThe original list stays unchanged by sorted()."


def test_summarize_calls_the_fuser_with_all_answers_and_streams_its_text():
    seen = []

    def fuse(messages):
        seen.append(messages)
        yield "Fused "
        yield "answer."

    gen = synth.summarize("How do I square numbers?", [PY, AI], fuse)
    chunks = []
    try:
        while True:
            chunks.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert chunks == ["Fused ", "answer."] and result.text == "Fused answer."
    system = seen[0][0]["content"]
    assert PY.text in system and AI.text in system
    assert seen[0][-1] == {"role": "user", "content": "How do I square numbers?"}


def test_run_rejects_unknown_strategy_and_summarize_without_fuser():
    with pytest.raises(ValueError, match="unknown synthesis 'mean'"):
        synth.run("mean", "q", [PY])
    with pytest.raises(ValueError, match="general expert"):
        synth.run("summarize", "q", [PY])
    with pytest.raises(ValueError, match="nothing to synthesize"):
        synth.collect(synth.run("best", "q", []))
