"""The engine on the real SmolLM2 and Gemma 3 GGUFs through llama.cpp."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from hublabio.engine import Engine, SamplingOptions, collect
from hublabio.errors import Cancelled, ContextOverflow, GGUFError, HublabError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingOptions(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def engine(smollm2_path, test_threads):
    with Engine(smollm2_path, n_ctx=512, threads=test_threads) as e:
        yield e


def test_streams_a_real_answer_with_logprobs(engine):
    text, pieces, stats = collect(engine.generate(QUESTION, GREEDY))  # stats: the return value
    tokens = [t for p in pieces for t in p.tokens]
    assert text.strip()
    assert stats.completion_tokens == len(tokens) > 1
    assert all(t.logprob <= 0 and math.isfinite(t.logprob) for t in tokens)
    assert stats.logprobs == [t.logprob for t in tokens]
    assert stats.mean_logprob == pytest.approx(sum(t.logprob for t in tokens) / len(tokens))
    assert stats.finish_reason in ("stop", "length")
    assert stats.prompt_tokens > 10


def test_top_logprobs_rank_the_alternatives_and_include_greedy_choice(engine):
    _, pieces, _ = engine.complete(QUESTION, SamplingOptions(max_tokens=6, temperature=0,
                                                             top_logprobs=3))
    for tok in (t for p in pieces for t in p.tokens):
        assert len(tok.top) == 3
        lps = [lp for _, _, lp in tok.top]
        assert lps == sorted(lps, reverse=True) and sum(math.exp(lp) for lp in lps) <= 1.0001
        assert tok.top[0][0] == tok.id and tok.top[0][2] == pytest.approx(tok.logprob)


def test_chat_template_comes_from_the_gguf(engine):
    prompt = engine.format_chat(QUESTION)
    # SmolLM2's own template adds its default system turn when none is given
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_is_deterministic_and_reuses_the_prompt_cache(engine):
    first, _, s1 = engine.complete(QUESTION, GREEDY)
    second, _, s2 = engine.complete(QUESTION, GREEDY)
    assert first == second
    assert s2.cached_tokens == s2.prompt_tokens - 1


def test_max_tokens_sets_length_finish(engine):
    _, tokens, stats = engine.complete("Once upon a time", SamplingOptions(max_tokens=5, temperature=0))
    assert stats.finish_reason == "length"
    assert stats.completion_tokens == 5


def test_stop_string_truncates_and_logprobs_stay_with_their_tokens(engine):
    prompt = "The capital of France is Paris. The capital of Italy is"
    full, full_pieces, _ = engine.complete(prompt, SamplingOptions(max_tokens=12, temperature=0))
    words = full.split()
    assert len(words) >= 3
    stop = words[2]  # a stop string somewhere inside the greedy answer
    text, pieces, stats = engine.complete(prompt, SamplingOptions(max_tokens=12, temperature=0,
                                                                  stop=(stop,)))
    assert stop not in text and full.startswith(text)
    assert stats.finish_reason == "stop"
    # every emitted piece carries exactly the tokens it came from, with the same log-probs
    # as the run without a stop string (no shift, no 0.0 filler)
    stopped = [t for p in pieces for t in p.tokens]
    plain = [t for p in full_pieces for t in p.tokens]
    assert [t.id for t in stopped] == [t.id for t in plain[:len(stopped)]]
    assert [t.logprob for t in stopped] == [t.logprob for t in plain[:len(stopped)]]
    assert all(p.text == "".join(t.text for t in p.tokens) for p in pieces)


def test_cancel_mid_generation(engine):
    cancel = threading.Event()
    seen = []
    gen = engine.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                          SamplingOptions(max_tokens=200, temperature=0), cancel=cancel)
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as done:
            stats = done.value
            break
        if len(seen) == 3:
            cancel.set()
    assert stats.finish_reason == "cancelled"
    assert len(seen) == 3


def test_seeded_sampling_repeats(engine):
    opts = SamplingOptions(max_tokens=12, temperature=0.9, seed=42)
    assert engine.complete("Tell me a fact:", opts)[0] == engine.complete("Tell me a fact:", opts)[0]


def test_prompt_longer_than_context_is_a_clear_error(smollm2_path, test_threads):
    with Engine(smollm2_path, n_ctx=64, threads=test_threads) as e:
        with pytest.raises(ContextOverflow, match="does not fit the context of"):
            e.complete("word " * 400, GREEDY)


def test_bench_measures_both_phases_and_cancels(engine):
    result = engine.bench(pp=32, tg=8)
    assert result["pp_tps"] > 0 and result["tg_tps"] > 0
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        engine.bench(pp=32, tg=8, cancel=cancel)


def test_close_is_idempotent_and_final(smollm2_path, test_threads):
    e = Engine(smollm2_path, n_ctx=256, threads=test_threads)
    e.close()
    e.close()
    with pytest.raises(HublabError, match="closed"):
        list(e.generate("hi", GREEDY))


def test_corrupt_and_missing_files_are_gguf_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(GGUFError, match="bad.gguf"):
        Engine(bad)
    with pytest.raises(GGUFError, match="no such model file"):
        Engine(tmp_path / "missing.gguf")


def test_another_architecture_gemma3(gemma_path, test_threads):
    with Engine(gemma_path, n_ctx=256, threads=test_threads) as e:
        assert e.architecture == "gemma3"
        text, tokens, stats = e.complete("The capital of France is", SamplingOptions(max_tokens=8, temperature=0))
        assert stats.completion_tokens >= 1 and text.strip()


def test_plain_greedy_fast_path_picks_what_llama_cpps_greedy_sampler_picks(engine):
    """Greedy without a grammar is argmax in numpy (after hublabio.penalties' edits); the
    penalty test below checks the edits against llama.cpp's samplers, this one the argmax
    against llama.cpp's greedy sampler."""
    from hublabio.llama import SamplerChain

    assert SamplingOptions(temperature=0, repeat_penalty=1.3, logit_bias={5: 1.0}).plain_greedy
    assert not SamplingOptions(temperature=0, grammar='root ::= "a"').plain_greedy
    fast = SamplingOptions(max_tokens=16, temperature=0, repeat_penalty=1.0)
    ids = [t.id for p in engine.complete(QUESTION, fast)[1] for t in p.tokens]
    tokens = engine.prompt_tokens(QUESTION)
    with engine._kv(engine._slots[0]):
        engine.ctx.keep_prefix(0, seq=0)
        engine._slots[0].cached = []
        engine.ctx.decode(tokens, 0)
        chain = SamplerChain(engine.model, temperature=0)
        try:
            theirs = []
            for i in range(len(ids)):
                theirs.append(chain.sample(engine.ctx, -1))
                engine.ctx.decode([theirs[-1]], len(tokens) + i)
        finally:
            chain.close()
            engine.ctx.keep_prefix(0, seq=0)
    assert ids == theirs and len(ids) > 3


def test_logprobs_can_be_skipped(engine):
    _, pieces, stats = engine.complete(QUESTION, SamplingOptions(max_tokens=4, temperature=0,
                                                                 logprobs=False))
    assert stats.completion_tokens == 4 and stats.logprobs == []
    assert all(math.isnan(t.logprob) for p in pieces for t in p.tokens)
    assert stats.as_dict()["mean_logprob"] is None


def test_an_empty_prompt_starts_from_bos_not_from_the_previous_context(smollm2_path, test_threads):
    with Engine(smollm2_path, n_ctx=256, threads=test_threads) as fresh:
        first = fresh.complete("", SamplingOptions(max_tokens=6, temperature=0))
    with Engine(smollm2_path, n_ctx=256, threads=test_threads) as used:
        used.complete("The capital of France is", GREEDY)
        again = used.complete("", SamplingOptions(max_tokens=6, temperature=0))
    assert first[2].prompt_tokens == 1 and first[2].cached_tokens == 0
    assert again[0] == first[0] and again[2].cached_tokens == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_penalties_and_bias_edited_here_draw_what_llama_cpps_samplers_draw(engine, temperature):
    """hublabio.penalties edits the few logits the penalties and the bias touch; llama.cpp's own
    samplers run over the whole vocabulary. Same logits, same seed: the same token every step
    (the penalties bite: they change the answer against a chain without them)."""
    from hublabio.llama import SamplerChain
    from hublabio.penalties import LogitEdits

    knobs = dict(repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=1.5)
    bias = {engine.model.tokenize(" the", add_special=False)[0]: -3.0, 1000: 4.5}
    tokens = engine.prompt_tokens(QUESTION)
    ctx = engine.ctx
    with engine._kv(engine._slots[0]):
        engine.ctx.keep_prefix(0, seq=0)
        ctx.decode(tokens, 0)
        theirs = SamplerChain(engine.model, temperature=temperature, top_k=40, top_p=0.9, seed=7,
                              logit_bias=bias, **knobs)
        ours = SamplerChain(engine.model, temperature=temperature, top_k=40, top_p=0.9, seed=7)
        plain = SamplerChain(engine.model, temperature=temperature, top_k=40, top_p=0.9, seed=7)
        edits = LogitEdits(logit_bias=bias, n_vocab=engine.n_vocab, **knobs)
        drawn, unpenalized = [], []
        try:
            pos = len(tokens)
            for _ in range(120):
                row = ctx.logits(-1)
                before = row.copy()
                want = theirs.sample(ctx, -1)
                edit = edits.apply(row)
                got = ours.sample(ctx, -1)
                edits.restore(row, edit)
                edits.accept(got)
                assert np.array_equal(row, before)  # restored: log-probs stay the model's
                unpenalized.append(plain.sample(ctx, -1))
                assert got == want, (len(drawn), got, want)
                drawn.append(got)
                ctx.decode([got], pos)
                pos += 1
        finally:
            for chain in (theirs, ours, plain):
                chain.close()
            engine.ctx.keep_prefix(0, seq=0)
            engine._slots[0].cached = []
    assert drawn != unpenalized
