"""Synthesis: turn the answers of the selected experts into one answer.

Five strategies (docs/MOE.md explains each with an example):

- ``best``: the answer with the highest posterior (see below).
- ``weighted``: the highest-posterior answer is kept verbatim; then every sentence (or fenced
  code block) of the other answers whose *support* reaches ``bar`` (0.5) and that does not
  repeat what is already there is appended. Support of a segment s = sum_i post_i *
  sim(s, answer_i), with sim(s, its own answer) = 1. A segment counts as a repeat when its
  similarity to an already kept segment is >= ``duplicate`` (0.8).
- ``voting``: each answer collects the votes of all answers, each vote weighted by the voter's
  posterior and by how similar the two answers are: support_i = sum_j post_j * sim(i, j)
  (sim(i, i) = 1). The answer with the most support wins; ties go to the posterior.
- ``concatenate``: one ``### <domain> (confidence 0.61)`` section per expert, in router order.
- ``summarize``: the ``general`` expert writes a new answer from all of them with a
  Mixture-of-Agents aggregate-and-synthesize prompt (Wang et al., 2024, arXiv:2406.04692).

Text similarity everywhere is the cosine of term-frequency vectors over lowercase word tokens
(``[a-z0-9_]+``, English stop words removed), computed with numpy.

Posterior: the probability that answer i comes from the right expert, given the router and the
answers' own confidences. The router's probability p_i is the prior; the answer's mean token
log-probability l_i is evidence with weight beta (``[moe] confidence_weight``):

    post_i = softmax_i(log p_i + beta * l_i)

so an off-domain answer j beats the router's choice i only when
exp(beta * (l_j - l_i)) > p_i / p_j: with beta <= 1 its per-token confidence ratio must exceed
the router's odds. beta is fitted by maximum likelihood on labelled questions the router never
saw (bench/calibrate_synthesis.py; docs/BENCHMARKS.md has the fit). Log-probabilities only
compare between answers produced with the same vocabulary (same tokenizer): when an answer has
no confidence or the answers' ``tokenizer_key`` differ, the evidence term is dropped and the
posterior is the router probability renormalised over the answers.

Each strategy is a generator: it yields the answer text in chunks (``summarize`` streams the
general expert's tokens as they come) and returns a :class:`Synthesis`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Iterator, Sequence

import numpy as np

from hublabio.params import MOE, SYNTHESES, by_name

STRATEGIES = SYNTHESES  # declared with the [moe] settings in hublabio.params
DEFAULT_CONFIDENCE_WEIGHT: float = by_name(MOE)["confidence_weight"].default


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

ROUTER_FLOOR = 1e-6                 # a router probability of 0 still leaves log p finite


def comparable(answers: Sequence[ExpertAnswer]) -> bool:
    """True when every answer has a mean log-probability over one shared vocabulary."""
    keys = {a.tokenizer_key for a in answers}
    return bool(answers) and len(keys) == 1 and all(
        a.mean_logprob is not None and math.isfinite(a.mean_logprob) for a in answers)


def posterior(answers: Sequence[ExpertAnswer],
              confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT) -> tuple[list[float], str]:
    """(softmax_i(log p_i + beta * l_i), basis): "confidence" when the answers' log-probs were
    used, "router" when they are not comparable and only the router's probabilities count."""
    basis = "confidence" if comparable(answers) and confidence_weight > 0 else "router"
    logits = np.array([math.log(max(a.router_probability, ROUTER_FLOOR)) for a in answers])
    if basis == "confidence":
        logits = logits + confidence_weight * np.array([a.mean_logprob for a in answers])
    z = np.exp(logits - logits.max())
    return [float(v) for v in z / z.sum()], basis


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


def _evidence(a: ExpertAnswer, post: float) -> str:
    return (f"posterior {post:.2f}: router {a.router_probability:.2f}, "
            f"confidence {fmt_confidence(a.confidence)}")


SynthGen = Generator[str, None, Synthesis]


def best(query: str, answers: Sequence[ExpertAnswer], *,
         confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT) -> SynthGen:
    _require(answers)
    post, basis = posterior(answers, confidence_weight)
    i = _argmax(post, [a.router_probability for a in answers])
    a = answers[i]
    yield a.text
    return Synthesis("best", a.text, [a.domain], f"best: {a.domain} ({_evidence(a, post[i])})",
                     {x.domain: s for x, s in zip(answers, post)}, basis)


@dataclass(frozen=True)
class WeightedSegment:
    domain: str
    text: str
    support: float
    included: bool
    reason: str                     # "primary", "supported", "below bar", "repeat", "no terms"


def weighted_plan(answers: Sequence[ExpertAnswer], *, bar: float = 0.5, duplicate: float = 0.8,
                  confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT,
                  ) -> tuple[list[float], str, list[WeightedSegment]]:
    """The weighted strategy's decisions (posteriors, basis, every segment with its support and
    reason), exposed so that tests and docs can check the rule."""
    _require(answers)
    share, basis = posterior(answers, confidence_weight)
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
    return share, basis, plan


def weighted(query: str, answers: Sequence[ExpertAnswer], *, bar: float = 0.5,
             duplicate: float = 0.8,
             confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT) -> SynthGen:
    weights, basis, plan = weighted_plan(answers, bar=bar, duplicate=duplicate,
                                         confidence_weight=confidence_weight)
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
        f"(posterior {', '.join(f'{a.domain} {w:.2f}' for a, w in zip(answers, weights))})",
        {a.domain: w for a, w in zip(answers, weights)}, basis)


def support(answers: Sequence[ExpertAnswer], post: Sequence[float]) -> list[float]:
    """Votes each answer gets: sum_j post_j * sim(answer_i, answer_j), with sim(i, i) = 1."""
    sim = similarity_matrix([a.text for a in answers])
    np.fill_diagonal(sim, 1.0)
    return [float(v) for v in sim @ np.asarray(post, dtype=np.float64)]


def voting(query: str, answers: Sequence[ExpertAnswer], *,
           confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT) -> SynthGen:
    _require(answers)
    post, basis = posterior(answers, confidence_weight)
    votes = support(answers, post)
    i = _argmax(votes, post, [a.router_probability for a in answers])
    a = answers[i]
    yield a.text
    return Synthesis("voting", a.text, [a.domain],
                     f"voting: {a.domain} (support {votes[i]:.2f}; {_evidence(a, post[i])})",
                     {x.domain: s for x, s in zip(answers, votes)}, basis)


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
        fuse: Fuser | None = None,
        confidence_weight: float = DEFAULT_CONFIDENCE_WEIGHT) -> SynthGen:
    """Dispatch by name; ``fuse`` is required for ``summarize``."""
    if strategy == "best":
        return best(query, answers, confidence_weight=confidence_weight)
    if strategy == "weighted":
        return weighted(query, answers, confidence_weight=confidence_weight)
    if strategy == "voting":
        return voting(query, answers, confidence_weight=confidence_weight)
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
