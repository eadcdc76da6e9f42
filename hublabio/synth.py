"""Synthesis: turn the answers of the selected experts into one answer.

Five strategies (docs/MOE.md explains each with an example):

- ``best``: the answer with the highest comparable score (see below).
- ``weighted``: weight = router probability x comparable confidence. The highest-weight answer
  is kept verbatim; then every sentence (or fenced code block) of the other answers whose
  *weighted support* reaches ``bar`` (0.5) and that does not repeat what is already there is
  appended. Weighted support of a segment s = sum_i (w_i / sum w) * sim(s, answer_i), with
  sim(s, its own answer) = 1. A segment counts as a repeat when its similarity to an already
  kept segment is >= ``duplicate`` (0.8).
- ``voting``: the answer the others agree with most: argmax over i of the mean similarity
  sim(answer_i, answer_j) over j != i. Ties (always the case with two answers, similarity is
  symmetric) fall back to the comparable score, then router probability.
- ``concatenate``: one ``### <domain> (confidence 0.61)`` section per expert, in router order.
- ``summarize``: the ``general`` expert writes a new answer from all of them with a
  Mixture-of-Agents aggregate-and-synthesize prompt (Wang et al., 2024, arXiv:2406.04692).

Text similarity everywhere is the cosine of term-frequency vectors over lowercase word tokens
(``[a-z0-9_]+``, English stop words removed), computed with numpy.

Comparable score: log-probabilities only compare between answers produced with the same
vocabulary (same tokenizer). When every answer has a confidence and all share one
``tokenizer_key`` the score is the confidence exp(mean log-prob); otherwise it is the router
probability, the one number that is on the same scale for every expert.

Each strategy is a generator: it yields the answer text in chunks (``summarize`` streams the
general expert's tokens as they come) and returns a :class:`Synthesis`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Iterator, Sequence

import numpy as np

from hublabio.params import SYNTHESES

STRATEGIES = SYNTHESES  # declared with the [moe] settings in hublabio.params


@dataclass(frozen=True)
class ExpertAnswer:
    domain: str
    text: str
    confidence: float | None        # exp(mean_logprob) in (0, 1]; None: the expert gave no log-probs
    mean_logprob: float | None
    router_probability: float
    tokens: int
    tokenizer_key: str              # same key = same vocabulary = comparable log-probabilities
    model: str = ""
    elapsed_s: float = 0.0


@dataclass
class Synthesis:
    strategy: str
    text: str
    chosen: list[str]               # domains whose text made it into the answer
    detail: str                     # one line for the shell's "[Synthesizer]" line
    scores: dict[str, float] = field(default_factory=dict)
    basis: str = "confidence"       # "confidence" or "router" (what the scores compare)


def confidence_from_logprobs(logprobs: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(mean log-probability, exp(mean)) of the finite values; (None, None) when there are none."""
    vals = [float(lp) for lp in logprobs if lp is not None and math.isfinite(lp)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    return mean, math.exp(mean)


def fmt_confidence(c: float | None) -> str:
    return "n/a" if c is None else f"{c:.2f}"


# ---------------------------------------------------------------- text similarity

_WORD = re.compile(r"[a-z0-9_]+")
STOPWORDS = frozenset(
    "a an the and or but if then else of to in on at by for with from as is are was were be "
    "been being it its this that these those there here i you he she we they me my your our "
    "their them his her do does did done can could should would will shall may might must "
    "not no so than too very just also only into out up down over under about which who whom "
    "what when where why how all any both each few more most other some such own same s t "
    "don't".split()
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def similarity_matrix(texts: Sequence[str]) -> np.ndarray:
    """Pairwise cosine similarity of term-frequency vectors; a text without terms scores 0."""
    bags = [terms(t) for t in texts]
    vocab: dict[str, int] = {}
    for bag in bags:
        for w in bag:
            vocab.setdefault(w, len(vocab))
    m = np.zeros((len(texts), max(1, len(vocab))), dtype=np.float64)
    for i, bag in enumerate(bags):
        for w in bag:
            m[i, vocab[w]] += 1.0
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    m = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    return m @ m.T


def similarity(a: str, b: str) -> float:
    return float(similarity_matrix([a, b])[0, 1])


_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def segments(text: str) -> list[str]:
    """Sentences, with each fenced code block kept whole as one segment."""
    out: list[str] = []
    pos = 0
    for m in _FENCE.finditer(text):
        out += _sentences(text[pos:m.start()])
        out.append(m.group(0).strip())
        pos = m.end()
    out += _sentences(text[pos:])
    return [s for s in out if s]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


# ---------------------------------------------------------------- scores

def comparable_scores(answers: Sequence[ExpertAnswer]) -> tuple[list[float], str]:
    """Scores that may be compared across ``answers`` and what they are ("confidence"/"router")."""
    keys = {a.tokenizer_key for a in answers}
    if answers and len(keys) == 1 and all(a.confidence is not None for a in answers):
        return [float(a.confidence) for a in answers], "confidence"
    return [float(a.router_probability) for a in answers], "router"


def _argmax(values: Sequence[float], *tiebreaks: Sequence[float], eps: float = 1e-9) -> int:
    best = 0
    for i in range(1, len(values)):
        key_i = (values[i], *(t[i] for t in tiebreaks))
        key_b = (values[best], *(t[best] for t in tiebreaks))
        for x, y in zip(key_i, key_b):
            if x > y + eps:
                best = i
                break
            if x < y - eps:
                break
    return best


def _require(answers: Sequence[ExpertAnswer]) -> None:
    if not answers:
        raise ValueError("no expert answered: nothing to synthesize")


SynthGen = Generator[str, None, Synthesis]


def best(query: str, answers: Sequence[ExpertAnswer]) -> SynthGen:
    _require(answers)
    scores, basis = comparable_scores(answers)
    i = _argmax(scores, [a.router_probability for a in answers])
    a = answers[i]
    yield a.text
    return Synthesis("best", a.text, [a.domain],
                     f"best: {a.domain} ({basis} {scores[i]:.2f})",
                     {x.domain: s for x, s in zip(answers, scores)}, basis)


@dataclass(frozen=True)
class WeightedSegment:
    domain: str
    text: str
    support: float
    included: bool
    reason: str                     # "primary", "supported", "below bar", "repeat", "no terms"


def weighted_plan(answers: Sequence[ExpertAnswer], *, bar: float = 0.5,
                  duplicate: float = 0.8) -> tuple[list[float], str, list[WeightedSegment]]:
    """The weighted strategy's decisions, exposed so that tests and docs can check the rule."""
    _require(answers)
    conf, basis = comparable_scores(answers)
    if basis == "confidence":
        weights = [a.router_probability * c for a, c in zip(answers, conf)]
    else:
        weights = [a.router_probability for a in answers]
    total = sum(weights)
    share = [w / total for w in weights] if total > 0 else [1.0 / len(answers)] * len(answers)
    order = sorted(range(len(answers)), key=lambda i: (-share[i], i))
    primary = order[0]
    plan = [WeightedSegment(answers[primary].domain, answers[primary].text, 1.0, True, "primary")]
    kept = segments(answers[primary].text)
    for j in order[1:]:
        for seg in segments(answers[j].text):
            if not terms(seg):
                plan.append(WeightedSegment(answers[j].domain, seg, 0.0, False, "no terms"))
                continue
            sims = similarity_matrix([seg] + [a.text for a in answers])[0, 1:]
            sims[j] = 1.0
            support = float(np.dot(share, sims))
            if support < bar:
                plan.append(WeightedSegment(answers[j].domain, seg, support, False, "below bar"))
                continue
            if kept and float(similarity_matrix([seg] + kept)[0, 1:].max()) >= duplicate:
                plan.append(WeightedSegment(answers[j].domain, seg, support, False, "repeat"))
                continue
            kept.append(seg)
            plan.append(WeightedSegment(answers[j].domain, seg, support, True, "supported"))
    return weights, basis, plan


def weighted(query: str, answers: Sequence[ExpertAnswer], *, bar: float = 0.5,
             duplicate: float = 0.8) -> SynthGen:
    weights, basis, plan = weighted_plan(answers, bar=bar, duplicate=duplicate)
    primary = plan[0]
    added = [p for p in plan[1:] if p.included]
    text = primary.text.rstrip()
    if added:
        text += "\n\n" + " ".join(p.text for p in added)
    chosen = [primary.domain] + sorted({p.domain for p in added} - {primary.domain})
    yield text
    return Synthesis(
        "weighted", text, chosen,
        f"weighted: {primary.domain} + {len(added)} supported sentence(s) from others "
        f"(weights {', '.join(f'{a.domain} {w:.2f}' for a, w in zip(answers, weights))})",
        {a.domain: w for a, w in zip(answers, weights)}, basis)


def agreement(answers: Sequence[ExpertAnswer]) -> list[float]:
    """Mean similarity of each answer to every other answer (1.0 for a lone answer)."""
    if len(answers) == 1:
        return [1.0]
    sim = similarity_matrix([a.text for a in answers])
    n = len(answers)
    return [float((sim[i].sum() - sim[i, i]) / (n - 1)) for i in range(n)]


def voting(query: str, answers: Sequence[ExpertAnswer]) -> SynthGen:
    _require(answers)
    agree = agreement(answers)
    scores, basis = comparable_scores(answers)
    i = _argmax(agree, scores, [a.router_probability for a in answers])
    a = answers[i]
    yield a.text
    return Synthesis("voting", a.text, [a.domain],
                     f"voting: {a.domain} (agreement {agree[i]:.2f})",
                     {x.domain: s for x, s in zip(answers, agree)}, basis)


def concatenate(query: str, answers: Sequence[ExpertAnswer]) -> SynthGen:
    _require(answers)
    ordered = sorted(answers, key=lambda a: -a.router_probability)
    text = "\n\n".join(f"### {a.domain} (confidence {fmt_confidence(a.confidence)})\n{a.text.strip()}"
                       for a in ordered)
    yield text
    return Synthesis("concatenate", text, [a.domain for a in ordered],
                     f"concatenate: {len(ordered)} section(s)",
                     {a.domain: a.router_probability for a in ordered}, "router")


MOA_INSTRUCTION = (
    "You have been given answers from several expert assistants to the user's latest question. "
    "Combine them into one answer that is better than each of them. Some answers may be wrong "
    "or off-topic: judge them critically, keep what is correct, drop what is not, and do not "
    "just copy one answer. Reply with the combined answer only, clear and concise.\n\n"
    "Answers from the experts:"
)


def moa_messages(query: str, answers: Sequence[ExpertAnswer], *,
                 max_chars_each: int = 700) -> list[dict]:
    """The Mixture-of-Agents aggregate-and-synthesize prompt as chat messages."""
    parts = [MOA_INSTRUCTION]
    for n, a in enumerate(answers, 1):
        body = a.text.strip()
        if len(body) > max_chars_each:
            body = body[:max_chars_each].rsplit(" ", 1)[0] + " ..."
        parts.append(f"{n}. [{a.domain}] {body}")
    return [{"role": "system", "content": "\n\n".join(parts)},
            {"role": "user", "content": query}]


Fuser = Callable[[list[dict]], Iterator[str]]


def summarize(query: str, answers: Sequence[ExpertAnswer], fuse: Fuser) -> SynthGen:
    """``fuse(messages)`` runs the general expert and yields its text as it is generated."""
    _require(answers)
    if len(answers) == 1:
        a = answers[0]
        yield a.text
        return Synthesis("summarize", a.text, [a.domain],
                         f"summarize: only {a.domain} answered, nothing to fuse",
                         {a.domain: a.router_probability}, "router")
    chunks: list[str] = []
    for piece in fuse(moa_messages(query, answers)):
        chunks.append(piece)
        yield piece
    text = "".join(chunks).strip()
    return Synthesis("summarize", text, [a.domain for a in answers],
                     f"summarize: general fused {len(answers)} answers",
                     {a.domain: a.router_probability for a in answers}, "router")


def run(strategy: str, query: str, answers: Sequence[ExpertAnswer], *,
        fuse: Fuser | None = None) -> SynthGen:
    """Dispatch by name; ``fuse`` is required for ``summarize``."""
    if strategy == "best":
        return best(query, answers)
    if strategy == "weighted":
        return weighted(query, answers)
    if strategy == "voting":
        return voting(query, answers)
    if strategy == "concatenate":
        return concatenate(query, answers)
    if strategy == "summarize":
        if fuse is None:
            raise ValueError("synthesis 'summarize' needs the general expert to fuse answers")
        return summarize(query, answers, fuse)
    raise ValueError(f"unknown synthesis {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def collect(gen: SynthGen) -> Synthesis:
    """Drain a strategy generator and return its Synthesis."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
