"""Repetition penalties and logit bias, applied to the few logits they touch.

llama.cpp's penalties sampler looks every one of the n_vocab candidates up in its token-count map
for each generated token (49,152 hash lookups for SmolLM2), and its logit-bias sampler runs over
the candidate array too. Here the same edits are made in place on the logits row, to just the
tokens they change: the last `last_n` sampled tokens and the biased ones. The arithmetic is
llama.cpp's, in float32 and in its order (bias, then penalties):

    logit += bias
    if count > 0:  logit = logit * repeat if logit <= 0 else logit / repeat
                   logit -= count * frequency + presence

so the sampler chain that follows (grammar, top-k, top-p, temperature, seeded distribution)
draws the same token as the chain with llama.cpp's own penalties and bias samplers
(tests/integration/test_engine.py compares them token for token).
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np


class LogitEdits:
    """Per generation: `apply(row)` edits the logits row in place and returns what `restore`
    needs; `accept(token)` records a sampled token in the penalty window."""

    def __init__(self, *, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                 n_vocab: int, last_n: int = 64):
        self.penalize = bool(repeat_penalty != 1.0 or frequency_penalty or presence_penalty)
        self.repeat = np.float32(repeat_penalty)
        self.frequency = np.float32(frequency_penalty)
        self.presence = np.float32(presence_penalty)
        self.bias = {int(t): np.float32(b) for t, b in (logit_bias or {}).items()
                     if 0 <= int(t) < n_vocab}
        self.window: deque[int] = deque(maxlen=last_n if self.penalize else 0)
        self.counts: Counter[int] = Counter()

    @property
    def active(self) -> bool:
        return self.penalize or bool(self.bias)

    def accept(self, token: int) -> None:
        if not self.penalize or self.window.maxlen == 0:
            return
        if len(self.window) == self.window.maxlen:
            old = self.window[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.window.append(token)
        self.counts[token] += 1

    def apply(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Edit `row` (float32, n_vocab) in place; returns (ids, their original values)."""
        touched = set(self.bias) | set(self.counts)
        ids = np.fromiter(touched, dtype=np.int64, count=len(touched))
        saved = row[ids].copy()
        values = saved.copy()
        if self.bias:
            values += np.array([self.bias.get(int(i), 0.0) for i in ids], dtype=np.float32)
        if self.penalize and self.counts:
            counts = np.array([self.counts.get(int(i), 0) for i in ids], dtype=np.float32)
            hit = counts > 0
            scaled = np.where(values <= 0, values * self.repeat, values / self.repeat)
            scaled -= counts * self.frequency + hit.astype(np.float32) * self.presence
            values = np.where(hit, scaled, values).astype(np.float32)
        row[ids] = values
        return ids, saved

    @staticmethod
    def restore(row: np.ndarray, edit: tuple[np.ndarray, np.ndarray]) -> None:
        ids, saved = edit
        row[ids] = saved
