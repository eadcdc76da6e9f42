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


def expected_posterior(answers, beta):
    logits = [math.log(a.router_probability) + beta * a.mean_logprob for a in answers]
    z = [math.exp(v - max(logits)) for v in logits]
    return [v / sum(z) for v in z]


def test_posterior_is_router_prior_times_confidence_evidence():
    post, basis = synth.posterior([PY, AI, GEN], 0.5)
    assert basis == "confidence"
    assert post == pytest.approx(expected_posterior([PY, AI, GEN], 0.5))
    assert sum(post) == pytest.approx(1.0)
    # weight 0: the router alone, renormalised over the answers
    post0, basis0 = synth.posterior([PY, AI, GEN], 0.0)
    assert basis0 == "router" and post0 == pytest.approx([0.7, 0.2, 0.1])


# The two real cases (issue 13): a confident off-domain answer beat the router's choice.
REVERSE = "How do I iterate over a list in reverse?"
PY_REVERSE = ans("python", "Use reversed(): for item in reversed(my_list): print(item)", 0.52, 0.68)
RUST_REVERSE = ans("rust", "Call .iter().rev() on the vector: for x in v.iter().rev() {}", 0.61,
                   0.26)
EMPTY = "How do I check if a list is empty?"
PY_EMPTY = ans("python", "An empty list is falsy: if not my_list: print('empty')", 0.41, 0.65)
SYS_EMPTY = ans("system", "#!/bin/bash\nif [ -z \"$LIST\" ]; then echo empty; fi", 0.58, 0.25)


@pytest.mark.parametrize("strategy", ["best", "weighted", "voting"])
@pytest.mark.parametrize("query,right,wrong", [(REVERSE, PY_REVERSE, RUST_REVERSE),
                                               (EMPTY, PY_EMPTY, SYS_EMPTY)])
def test_a_confident_off_domain_answer_does_not_beat_the_router(strategy, query, right, wrong):
    assert wrong.confidence > right.confidence  # what made the old `best` show it
    for answers in ([right, wrong], [wrong, right]):
        s = synth.collect(synth.run(strategy, query, answers))
        assert s.chosen[0] == right.domain
        assert s.text.startswith(right.text)
        assert wrong.text not in s.text


def test_strong_enough_evidence_still_wins_against_the_router():
    """Off-domain j wins exactly when exp(beta * (l_j - l_i)) > p_i / p_j."""
    beta = synth.DEFAULT_CONFIDENCE_WEIGHT
    right = ans("python", "x", 0.20, 0.55)
    odds = 0.55 / 0.40
    # the confidence ratio that just balances the router's odds at this beta
    balance = 0.20 * odds ** (1 / beta)
    for conf, winner in ((balance * 1.05, "rust"), (balance * 0.95, "python")):
        wrong = ans("rust", "y", min(conf, 1.0), 0.40)
        assert synth.collect(synth.best("q", [right, wrong])).chosen == [winner]


def test_best_picks_highest_posterior_when_tokenizer_shared():
    s = synth.collect(synth.best("q", [PY, AI, GEN]))
    post = expected_posterior([PY, AI, GEN], synth.DEFAULT_CONFIDENCE_WEIGHT)
    assert s.basis == "confidence"
    assert s.chosen == [["python", "ai", "general"][post.index(max(post))]]
    assert s.scores == pytest.approx(dict(zip(["python", "ai", "general"], post)))
    assert "posterior" in s.detail and "router 0.70" in s.detail


def test_best_falls_back_to_router_probability_across_tokenizers():
    other = ans("ai", AI.text, 0.99, 0.2, key="gemma")
    s = synth.collect(synth.best("q", [PY, other]))
    assert s.basis == "router" and s.chosen == ["python"]


def test_best_treats_missing_confidence_as_incomparable():
    remote = ans("ai", AI.text, None, 0.9)
    s = synth.collect(synth.best("q", [PY, remote]))
    assert s.basis == "router" and s.chosen == ["ai"]


def test_voting_sums_posterior_weighted_similarity():
    a = ans("python", "Sort the list with sorted(), it returns a new sorted list.", 0.2, 0.36)
    b = ans("general", "Use sorted() to get a new sorted list from the list.", 0.3, 0.30)
    c = ans("ai", "Transformers apply attention over tokens.", 0.6, 0.34)
    assert synth.similarity(a.text, c.text) == synth.similarity(b.text, c.text) == 0
    post, _ = synth.posterior([a, b, c], 0.5)
    votes = synth.support([a, b, c], post)
    sim = synth.similarity(a.text, b.text)
    assert votes == pytest.approx([post[0] + post[1] * sim, post[1] + post[0] * sim, post[2]])
    # c has the highest router probability and confidence, but a and b back each other
    assert post[2] == max(post) and max(votes[0], votes[1]) > votes[2]
    s = synth.collect(synth.voting("q", [a, b, c], confidence_weight=0.5))
    assert s.chosen == [["python", "general"][int(votes[1] > votes[0])]]


def test_voting_with_two_unrelated_answers_follows_the_posterior():
    s = synth.collect(synth.voting("q", [PY, AI]))
    post, _ = synth.posterior([PY, AI])
    assert s.chosen == [["python", "ai"][int(post[1] > post[0])]]


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
    share = expected_posterior([PY, AI, GEN], synth.DEFAULT_CONFIDENCE_WEIGHT)
    assert weights == pytest.approx(share)
    assert plan[0].domain == "python" and plan[0].reason == "primary"
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
