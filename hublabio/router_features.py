"""Text -> fixed-size float32 vector for the domain router, in numpy only.

The same code runs on the device (hublabio.router) and in `hublab-tools train-router`, so the
router sees exactly the features it was trained on. Nothing here depends on the locale, on
Python's salted hash() or on a tokenizer file.

Features of one text (version 1):
- words: runs of letters/digits of the lowercased text (`DataFrame.groupby` -> `dataframe`,
  `groupby`), plus the camelCase / PascalCase parts of each run (`DataFrame` -> `data`, `frame`),
  plus word bigrams (trigrams) of the runs when word_ngrams >= 2 (3);
- compounds: whitespace-separated chunks that keep inner punctuation (`dataframe.groupby`,
  `tokio::spawn`, `box<dyn`), edge punctuation stripped;
- character n-grams (2..4 by default) of the lowercased text with whitespace collapsed and a
  space at each end, over its UTF-8 bytes.
Tokens are hashed with zlib.crc32 of "<kind>:<token>"; byte n-grams with 32-bit FNV-1a
(vectorised) followed by a 32-bit avalanche mix. Each hash picks one of `dim` buckets
(dim is a power of two). Each group's counts are log1p-scaled and L2-normalised, weighted, summed,
and the sum is L2-normalised again.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from hublabio.errors import RouterError

FEATURE_KIND = "hublab-hashed-ngrams"
FEATURE_VERSION = 1

_RUN = re.compile(r"[^\W_]+")  # letters/digits, split on punctuation and underscores
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+|[^\W\d_A-Za-z]+")
_EDGE = "\"'`.,;:!?()[]{}<>"
_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)
_MIX = np.uint32(0x45D9F3B)
_U16 = np.uint32(16)


@dataclass(frozen=True)
class FeatureSpec:
    """Hashing parameters; written to domains.json["features"] and checked on load."""

    dim: int = 1 << 15
    word_ngrams: int = 1          # 1 = unigrams only, 2 = + bigrams, 3 = + trigrams
    char_min: int = 2
    char_max: int = 4
    word_weight: float = 1.0
    char_weight: float = 1.0
    kind: str = FEATURE_KIND
    version: int = FEATURE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> "FeatureSpec":
        """Validate the "features" object of a domains.json; raises RouterError naming the key."""
        if not isinstance(data, dict):
            raise RouterError("features: expected an object with the hashing parameters")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RouterError(f"features: unknown parameter(s) {unknown}; this runtime "
                              f"understands {sorted(known)}")
        if data.get("kind") != FEATURE_KIND:
            raise RouterError(f"features.kind: {data.get('kind')!r} is not understood "
                              f"(this runtime reads {FEATURE_KIND!r})")
        if data.get("version") != FEATURE_VERSION:
            raise RouterError(f"features.version: {data.get('version')!r} is not understood "
                              f"(this runtime reads version {FEATURE_VERSION})")
        missing = sorted(known - set(data))
        if missing:
            raise RouterError(f"features: missing parameter(s) {missing}")
        ints = {k: data[k] for k in ("dim", "word_ngrams", "char_min", "char_max")}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise RouterError(f"features.{key}: expected an integer, got {value!r}")
        dim = ints["dim"]
        if dim < 16 or dim > (1 << 22) or dim & (dim - 1):
            raise RouterError(f"features.dim: {dim} must be a power of two in [16, 4194304]")
        if not 1 <= ints["word_ngrams"] <= 3:
            raise RouterError(f"features.word_ngrams: {ints['word_ngrams']} must be 1, 2 or 3")
        if not 0 <= ints["char_min"] <= ints["char_max"] <= 8:
            raise RouterError("features.char_min/char_max: need 0 <= char_min <= char_max <= 8 "
                              f"(got {ints['char_min']}, {ints['char_max']}; 0 disables)")
        for key in ("word_weight", "char_weight"):
            value = data[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise RouterError(f"features.{key}: expected a number >= 0, got {value!r}")
        return cls(**{**data, "word_weight": float(data["word_weight"]),
                      "char_weight": float(data["char_weight"])})


DEFAULT_SPEC = FeatureSpec()


def tokens(text: str, word_ngrams: int = 1) -> list[str]:
    """The word-level tokens of `text`, each prefixed by its kind (w: word, b: bigram,
    t: trigram, c: compound). Deterministic; exposed for tests and debugging."""
    lowered = text.lower()
    runs = _RUN.findall(lowered)
    out = ["w:" + w for w in runs]
    for run in _RUN.findall(text):
        if not run.islower() and not run.isupper():
            parts = _CAMEL.findall(run)
            if len(parts) > 1:
                out.extend("w:" + p.lower() for p in parts)
    for n, tag in ((2, "b:"), (3, "t:")):
        if word_ngrams >= n:
            out.extend(tag + " ".join(runs[i:i + n]) for i in range(len(runs) - n + 1))
    for chunk in lowered.split():
        chunk = chunk.strip(_EDGE)
        if chunk and not chunk.isalnum() and _RUN.search(chunk):
            out.append("c:" + chunk)
    return out


def _mix32(h: np.ndarray) -> np.ndarray:
    """32-bit avalanche (uint32 arithmetic wraps modulo 2**32)."""
    h = h ^ (h >> _U16)
    h = h * _MIX
    h = h ^ (h >> _U16)
    h = h * _MIX
    return h ^ (h >> _U16)


def char_ngram_hashes(text: str, nmin: int, nmax: int) -> np.ndarray:
    """32-bit hashes (uint32) of every byte n-gram, nmin <= n <= nmax, of the normalised text
    (lowercased, whitespace collapsed, one space at each end): FNV-1a then _mix32."""
    words = text.lower().split()
    if nmax <= 0 or not words:
        return np.zeros(0, dtype=np.uint32)  # blank text has no features at all
    norm = " " + " ".join(words) + " "
    b = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8).astype(np.uint32)
    size = b.size
    nmin = max(nmin, 1)
    if size < nmin:
        return np.zeros(0, dtype=np.uint32)
    # h[i] after step j is FNV-1a of b[i:i+j+1]; positions whose gram would run past the end
    # are computed but never used.
    h = np.full(size, _FNV_OFFSET, dtype=np.uint32)
    parts = []
    for j in range(min(nmax, size)):
        h[: size - j] ^= b[j:]
        h *= _FNV_PRIME
        if j + 1 >= nmin:
            parts.append(h[: size - j].copy())
    return _mix32(np.concatenate(parts))


def featurize_into(row: np.ndarray, text: str, spec: FeatureSpec = DEFAULT_SPEC) -> np.ndarray:
    """Write the features of `text` into `row` (float32 [spec.dim], all zero on entry) and
    return the indices that may be non-zero (to clear them cheaply before the next text)."""
    mask = np.uint32(spec.dim - 1)
    parts = []
    if spec.word_weight > 0:
        words = np.fromiter((zlib.crc32(t.encode("utf-8"))
                             for t in tokens(text, spec.word_ngrams)), dtype=np.uint32)
        parts.append((_mix32(words) & mask).astype(np.int64) << 1)       # even keys: words
    if spec.char_weight > 0:
        chars = char_ngram_hashes(text, spec.char_min, spec.char_max)
        parts.append(((chars & mask).astype(np.int64) << 1) | 1)          # odd keys: chars
    keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if keys.size == 0:
        return np.zeros(0, dtype=np.intp)
    keys, counts = np.unique(keys, return_counts=True)
    vals = np.log1p(counts.astype(np.float32))
    is_char = (keys & 1).astype(bool)
    squares = vals * vals
    norm_c = np.sqrt(squares[is_char].sum())
    norm_w = np.sqrt(squares[~is_char].sum())
    # each group L2-normalised and weighted
    vals *= np.where(is_char, np.float32(spec.char_weight / norm_c) if norm_c else 0,
                     np.float32(spec.word_weight / norm_w) if norm_w else 0).astype(np.float32)
    buckets = (keys >> 1).astype(np.intp)
    np.add.at(row, buckets, vals)  # a word and a char n-gram may share a bucket
    norm = np.sqrt(np.dot(row, row))
    if norm > 0:
        # a repeated index is divided once: fancy-index assignment reads all, then writes
        row[buckets] /= norm
    return buckets


def featurize_sparse(text: str, spec: FeatureSpec = DEFAULT_SPEC) -> tuple[np.ndarray, np.ndarray]:
    """(ascending bucket indices, float32 values) of the non-zero features of `text`."""
    row = np.zeros(spec.dim, dtype=np.float32)
    featurize_into(row, text, spec)
    idx = np.flatnonzero(row)
    return idx, row[idx]


def featurize(texts: str | Sequence[str] | Iterable[str],
              spec: FeatureSpec = DEFAULT_SPEC) -> np.ndarray:
    """Dense float32 matrix [n_texts, spec.dim] (a single str gives one row)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    out = np.zeros((len(texts), spec.dim), dtype=np.float32)
    for row, text in enumerate(texts):
        featurize_into(out[row], text, spec)
    return out
