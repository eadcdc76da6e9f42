"""Real English text available offline: the Python documentation's topic pages that ship with the
standard library (pydoc_data.topics), split into two disjoint parts so an importance matrix can be
computed on one and perplexity measured on the other. Used by tests and benchmarks; users pass
their own text files to `imatrix` and `eval`."""

from __future__ import annotations


def python_docs_text(part: str = "calibration", max_chars: int | None = None) -> str:
    """part: "calibration" (even-numbered topics) or "evaluation" (odd-numbered topics)."""
    from pydoc_data.topics import topics

    if part not in ("calibration", "evaluation"):
        raise ValueError("part must be 'calibration' or 'evaluation'")
    names = sorted(topics)[0 if part == "calibration" else 1::2]
    text = "\n\n".join(topics[n].strip() for n in names)
    return text if max_chars is None else text[:max_chars]
