"""Tokens → text, with no model: incremental UTF-8, stop strings, and log-probabilities that stay
with the tokens they belong to.

`TextStream.push(token)` takes one sampled token (its bytes and log-probabilities) and returns
the `Piece`s that are now safe to show. Text that could still be the start of a stop string is
held back, at token granularity, so every emitted piece carries exactly the tokens whose text it
contains (a token whose bytes end mid-character contributes "" and travels with the next piece).
When a stop string appears, the text before it is emitted with the tokens that produced it (a
token that straddles the stop string's start is included, its text cut), and `stopped` is set.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class TokenInfo:
    id: int
    data: bytes                      # the token's raw bytes
    logprob: float                   # under the model's raw logits
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob), best first
    text: str = ""                   # what the token added to the decoded text


@dataclass
class Piece:
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)

    @property
    def logprob(self) -> float | None:
        """The log-probability of the whole piece (sum over its tokens); None when it has no
        tokens or their log-probabilities were not computed."""
        total = float(sum(t.logprob for t in self.tokens))
        return total if self.tokens and not math.isnan(total) else None


class TextStream:
    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held: list[TokenInfo] = []
        self.stopped = False

    def _held_text(self) -> str:
        return "".join(t.text for t in self._held)

    def _partial_stop_start(self, text: str) -> int:
        """Smallest index from which `text` is a proper prefix of some stop string."""
        for i in range(max(0, len(text) - max(map(len, self.stop)) + 1), len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in self.stop):
                return i
        return len(text)

    def push(self, token: TokenInfo) -> list[Piece]:
        if self.stopped:
            return []
        token = TokenInfo(token.id, token.data, token.logprob, token.top,
                          self._decoder.decode(token.data))
        self._held.append(token)
        if not self.stop:
            return self._release(len(self._held))
        text = self._held_text()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._stop_at(min(hits))
        keep_from = self._partial_stop_start(text)
        # emit every whole token that ends at or before keep_from
        n, end = 0, 0
        for t in self._held:
            if end + len(t.text) > keep_from:
                break
            end += len(t.text)
            n += 1
        return self._release(n)

    def finish(self) -> list[Piece]:
        """The end of generation: flush what was held (and any incomplete character)."""
        if self.stopped:
            return []
        tail = self._decoder.decode(b"", final=True)
        if tail and self._held:
            last = self._held[-1]
            self._held[-1] = TokenInfo(last.id, last.data, last.logprob, last.top,
                                       last.text + tail)
        pieces = self._release(len(self._held))
        if tail and not pieces:
            pieces = [Piece(tail, [])]
        return pieces

    def _release(self, n: int) -> list[Piece]:
        if self._decoder.getstate()[0]:  # mid-character: its tokens wait for the rest
            while n > 0 and not self._held[n - 1].text:
                n -= 1
        if n == 0:
            return []
        out, self._held = self._held[:n], self._held[n:]
        return [Piece("".join(t.text for t in out), out)]

    def _stop_at(self, index: int) -> list[Piece]:
        self.stopped = True
        tokens, end = [], 0
        for t in self._held:
            if end >= index:
                break
            cut = t.text[:index - end]
            tokens.append(TokenInfo(t.id, t.data, t.logprob, t.top, cut))
            end += len(t.text)
        self._held = []
        text = "".join(t.text for t in tokens)
        return [Piece(text, tokens)] if text else []
