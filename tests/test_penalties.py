"""hublabio.penalties on a synthetic row: llama.cpp's arithmetic (src/llama-sampler.cpp,
penalties and logit-bias apply) for positive and negative logits, the window of the last
`last_n` sampled tokens, and the row restored exactly."""

import numpy as np

from hublabio.penalties import LogitEdits


def test_penalties_follow_llama_cpps_formula_for_both_signs_and_the_window():
    row = np.array([2.0, -2.0, 1.0, 0.0, 5.0], dtype=np.float32)
    edits = LogitEdits(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logit_bias={4: -1.0, 99: 3.0}, n_vocab=5, last_n=3)
    for tok in (0, 1, 0):
        edits.accept(tok)
    original = row.copy()
    edit = edits.apply(row)
    # token 0: seen twice, logit 2 > 0: 2 / 2 - (2 * 0.5 + 0.25); token 1: once, -2 <= 0:
    # -2 * 2 - (0.5 + 0.25); token 4: bias only; 99 is outside the vocabulary: ignored
    assert row.tolist() == [1.0 - 1.25, -4.0 - 0.75, 1.0, 0.0, 4.0]
    edits.restore(row, edit)
    assert np.array_equal(row, original)
    edits.accept(3)  # the window holds 3: the first 0 leaves it
    edits.apply(row)
    assert row.tolist() == [1.0 - 0.75, -4.0 - 0.75, 1.0, -0.75, 4.0]


def test_off_by_default_and_bias_before_penalty():
    assert not LogitEdits(n_vocab=4).active
    row = np.array([1.0, 1.0], dtype=np.float32)
    edits = LogitEdits(repeat_penalty=2.0, logit_bias={0: -3.0}, n_vocab=2)
    edits.accept(0)
    edits.apply(row)
    assert row.tolist() == [-4.0, 1.0]  # (1 - 3) = -2 <= 0, so times 2
