"""Which experts should answer a question: routers (ONNX, keyword fallback) and strategies.

A router gives a score per domain (`score(text) -> {domain: probability}`); a strategy turns
the scores into the selected experts (`select(scores) -> [Route]`, highest first). When nothing
is selected, `select_with_fallback` answers with the `general` expert.

- `OnnxRouter`: the model written by `hublab-tools train-router` (router/router.onnx +
  router/domains.json), run with onnxruntime on numpy features (hublabio.router_features).
  Probabilities sum to 1.
- `KeywordRouter`: counts whole-word matches of each expert's `keywords`; scores are the counts
  normalised to sum to 1, all zero when nothing matches.
- `TransformerRouter` (hublabio.router_transformer): the seed's format, a transformer
  classifier exported to ONNX (inputs input_ids + attention_mask, output logits) with its
  tokenizer.json and domains.json; tokenized with the `tokenizers` package.
- `load_router(dir, experts)`: whichever ONNX router the file is, when it loads; else the
  keyword router and a warning saying why.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from hublabio.errors import RouterError
from hublabio.router_features import FeatureSpec, featurize, featurize_into

ONNX_FILE = "router.onnx"
DOMAINS_FILE = "domains.json"
INPUT_NAME = "features"
OUTPUT_NAME = "probs"


@dataclass(frozen=True)
class Route:
    domain: str
    probability: float


class Router(Protocol):
    domains: list[str]

    def score(self, text: str) -> dict[str, float]: ...


# ----------------------------------------------------------------------------- ONNX router

def check_first_run(onnx_path: Path, run, output: str, n_domains: int) -> None:
    """Run a freshly loaded router once: an error or an output that is not one row of
    `n_domains` scores is a RouterError naming the file (so the keyword router takes over)."""
    try:
        out = run()
    except Exception as err:  # onnxruntime raises its own exception types
        raise RouterError(f"{onnx_path}: inference failed ({type(err).__name__}: "
                          f"{str(err).strip()[:300]})") from None
    if out.shape != (1, n_domains):
        raise RouterError(f"{onnx_path}: output {output!r} has shape {out.shape}, expected "
                          f"(1, {n_domains}) for the {n_domains} domains in {DOMAINS_FILE}")


def open_session(onnx_path: Path):
    """An onnxruntime session on one thread (routing runs beside llama.cpp's threads)."""
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise RouterError(f"{onnx_path}: missing")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise RouterError(f"{onnx_path}: not a loadable ONNX model ({type(err).__name__}: "
                          f"{str(err).strip()[:300]})") from None


def read_domains_json(path: Path) -> tuple[list[str], FeatureSpec, dict]:
    """Parse and validate a domains.json: (domains, feature spec, the whole document)."""
    domains, doc = read_domain_list(path)
    if "features" not in doc:
        raise RouterError(f"{path}: features: missing (the hashing parameters the router was "
                          "trained with)")
    try:
        spec = FeatureSpec.from_dict(doc["features"])
    except RouterError as err:
        raise RouterError(f"{path}: {err}") from None
    return domains, spec, doc


def read_domain_list(path: Path) -> tuple[list[str], dict]:
    """A domains.json's `domains` list (validated) and the whole document."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RouterError(f"{path}: missing (train-router writes it next to {ONNX_FILE})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RouterError(f"{path}: cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise RouterError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                          f"{err.msg})") from None
    if not isinstance(doc, dict):
        raise RouterError(f"{path}: expected a JSON object with 'domains' and 'features'")
    domains = doc.get("domains")
    if (not isinstance(domains, list) or not domains
            or not all(isinstance(d, str) and d.strip() for d in domains)):
        raise RouterError(f"{path}: domains: expected a non-empty list of domain names, "
                          f"got {domains!r}")
    if len(set(domains)) != len(domains):
        raise RouterError(f"{path}: domains: duplicate names in {domains}")
    return list(domains), doc


class OnnxRouter:
    """The trained router. Use `OnnxRouter.load(router_dir)`."""

    def __init__(self, session, domains: list[str], spec: FeatureSpec, meta: dict,
                 source: Path):
        self._session = session
        self.domains = domains
        self.spec = spec
        self.meta = meta
        self.source = source
        self._row = np.zeros((1, spec.dim), dtype=np.float32)
        self._last = np.zeros(0, dtype=np.intp)
        self._lock = threading.Lock()  # score() reuses one input row

    @classmethod
    def load(cls, router_dir: str | Path, session=None) -> "OnnxRouter":
        router_dir = Path(router_dir)
        onnx_path = router_dir / ONNX_FILE
        # given a session (load_router), the file's format is checked before domains.json
        parsed = None if session is not None else read_domains_json(router_dir / DOMAINS_FILE)
        session = session or open_session(onnx_path)
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if INPUT_NAME not in inputs or len(inputs) != 1:
            raise RouterError(f"{onnx_path}: expected one input named {INPUT_NAME!r} (a "
                              f"hublab-tools train-router model) or input_ids and "
                              f"attention_mask (the seed's transformer router), found "
                              f"{sorted(inputs)}")
        if OUTPUT_NAME not in outputs:
            raise RouterError(f"{onnx_path}: expected an output named {OUTPUT_NAME!r}, "
                              f"found {sorted(outputs)}")
        domains, spec, meta = parsed or read_domains_json(router_dir / DOMAINS_FILE)
        width = inputs[INPUT_NAME].shape[-1]
        if isinstance(width, int) and width != spec.dim:
            raise RouterError(f"{onnx_path}: input width {width} does not match "
                              f"{DOMAINS_FILE} features.dim {spec.dim}")
        router = cls(session, domains, spec, meta, router_dir)
        check_first_run(onnx_path, lambda: router._run(np.zeros((1, spec.dim), np.float32)),
                        OUTPUT_NAME, len(domains))
        return router

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def score(self, text: str) -> dict[str, float]:
        with self._lock:
            row = self._row
            row[0, self._last] = 0.0  # clear only what the previous text set
            self._last = featurize_into(row[0], text, self.spec)
            probs = self._run(row)[0]
        return {d: float(p) for d, p in zip(self.domains, probs)}

    def score_many(self, texts: Sequence[str]) -> list[dict[str, float]]:
        probs = self._run(featurize(texts, self.spec)) if texts else np.zeros((0, 0))
        return [{d: float(p) for d, p in zip(self.domains, row)} for row in probs]


# -------------------------------------------------------------------------- keyword router

def _keyword_pattern(keyword: str) -> re.Pattern:
    # word-boundary match that also works for keywords starting/ending with punctuation (c++)
    return re.compile(r"(?<!\w)" + re.escape(keyword.lower()) + r"(?!\w)")


def experts_keywords_of(experts) -> dict[str, list[str]]:
    """{domain: keywords} from a mapping or from expert ModelConfigs (objects with
    `.expert.domain` and `.expert.keywords`)."""
    if isinstance(experts, Mapping):
        return {str(d): [str(k) for k in kws] for d, kws in experts.items()}
    out: dict[str, list[str]] = {}
    for cfg in experts:
        expert = getattr(cfg, "expert", None)
        if expert is None:
            continue
        out.setdefault(expert.domain, []).extend(expert.keywords or [])
    return out


class KeywordRouter:
    """Fallback router: whole-word, case-insensitive keyword counts per expert."""

    def __init__(self, experts: Mapping[str, Iterable[str]] | Iterable):
        table = experts_keywords_of(experts)
        self.domains = list(table)
        self.keywords = {d: [k for k in kws if k.strip()] for d, kws in table.items()}
        self._patterns = {d: [_keyword_pattern(k.strip()) for k in kws]
                          for d, kws in self.keywords.items()}

    def counts(self, text: str) -> dict[str, int]:
        lowered = text.lower()
        return {d: sum(len(p.findall(lowered)) for p in pats)
                for d, pats in self._patterns.items()}

    def score(self, text: str) -> dict[str, float]:
        counts = self.counts(text)
        total = sum(counts.values())
        if total == 0:
            return {d: 0.0 for d in self.domains}
        return {d: c / total for d, c in counts.items()}


def load_router(router_dir: str | Path,
                experts_keywords) -> tuple[Router, str | None]:
    """The ONNX router in `router_dir` if it loads; else a KeywordRouter over the experts'
    keywords and a warning saying why."""
    router_dir = Path(router_dir)
    if not (router_dir / ONNX_FILE).exists() and not (router_dir / DOMAINS_FILE).exists():
        return (KeywordRouter(experts_keywords),
                f"no ONNX router in {router_dir}; routing by keywords")
    try:
        session = open_session(router_dir / ONNX_FILE)
        if "input_ids" in {i.name for i in session.get_inputs()}:
            from hublabio.router_transformer import TransformerRouter

            return TransformerRouter.load(router_dir, session), None
        return OnnxRouter.load(router_dir, session), None
    except RouterError as err:
        return KeywordRouter(experts_keywords), f"{err}; routing by keywords instead"


# ------------------------------------------------------------------------------ strategies

def _ranked(scores: Mapping[str, float]) -> list[Route]:
    return [Route(d, float(p)) for d, p in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass(frozen=True)
class TopK:
    """The k most probable domains, skipping any below `min_probability` (and any at 0): a whole
    generation for a domain the router gives 0.3% is wasted time on a Pi, and its confident but
    off-topic answer could win `best`."""

    k: int = 2
    min_probability: float = 0.05
    name = "topk"

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise RouterError(f"topk: k must be an integer >= 1, got {self.k!r}")
        if not 0.0 <= self.min_probability < 1.0:
            raise RouterError(f"topk: min_probability must be in [0, 1), got {self.min_probability!r}")

    def select(self, scores: Mapping[str, float]) -> list[Route]:
        return [r for r in _ranked(scores)
                if r.probability > 0 and r.probability >= self.min_probability][: self.k]

    def params(self) -> dict:
        return {"k": self.k}


@dataclass(frozen=True)
class Threshold:
    """Every domain whose probability reaches its threshold (per-domain override, else t)."""

    t: float = 0.5
    per_domain: Mapping[str, float] = field(default_factory=dict)
    name = "threshold"

    def __post_init__(self):
        for key, value in [("t", self.t), *self.per_domain.items()]:
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0.0 <= value <= 1.0):
                where = "t" if key == "t" else f"threshold of {key!r}"
                raise RouterError(f"threshold: {where} must be a number in [0, 1], got {value!r}")

    def select(self, scores: Mapping[str, float]) -> list[Route]:
        return [r for r in _ranked(scores)
                if r.probability > 0 and r.probability >= self.per_domain.get(r.domain, self.t)]

    def params(self) -> dict:
        return {"t": self.t, "per_domain": dict(self.per_domain)}


@dataclass(frozen=True)
class Single:
    """Only the most probable domain."""

    name = "single"

    def select(self, scores: Mapping[str, float]) -> list[Route]:
        return [r for r in _ranked(scores) if r.probability > 0][:1]

    def params(self) -> dict:
        return {}


@dataclass(frozen=True)
class All:
    """Every domain, most probable first."""

    name = "all"

    def select(self, scores: Mapping[str, float]) -> list[Route]:
        return _ranked(scores)

    def params(self) -> dict:
        return {}


Strategy = TopK | Threshold | Single | All
STRATEGIES = {"topk": TopK, "threshold": Threshold, "single": Single, "all": All}
_ALIASES = {"top_k": "topk", "top-k": "topk", "top": "topk"}


def parse_strategy(name: str, **params) -> Strategy:
    """Build a strategy by name: topk (k), threshold (t, per_domain), single, all.
    Numeric params may be strings (from the shell): parse_strategy("topk", k="2")."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in STRATEGIES:
        raise RouterError(f"unknown routing strategy {name!r}; choose one of "
                          f"{', '.join(STRATEGIES)}")
    params = {k: v for k, v in params.items() if v is not None}
    allowed = {"topk": {"k"}, "threshold": {"t", "per_domain"}, "single": set(), "all": set()}
    extra = sorted(set(params) - allowed[key])
    if extra:
        raise RouterError(f"routing strategy {key!r} takes no parameter(s) {extra}"
                          + (f"; it takes {sorted(allowed[key])}" if allowed[key] else ""))
    try:
        if "k" in params and isinstance(params["k"], str):
            params["k"] = int(params["k"])
        if "t" in params and isinstance(params["t"], str):
            params["t"] = float(params["t"])
    except ValueError:
        raise RouterError(f"routing strategy {key!r}: not a number in {params}") from None
    if "per_domain" in params:
        params["per_domain"] = {str(d): float(v) for d, v in dict(params["per_domain"]).items()}
    return STRATEGIES[key](**params)


def select_with_fallback(strategy: Strategy, scores: Mapping[str, float],
                         fallback: str = "general") -> list[Route]:
    """strategy.select(scores), or [Route(fallback, its score or 0)] when nothing passes."""
    routes = strategy.select(scores)
    if routes:
        return routes
    return [Route(fallback, float(scores.get(fallback, 0.0)))]
