"""The shipped router on questions it was never trained on: the FAQ questions of documentation
that installs offline from Debian, each labelled with the domain of the documentation it comes
from (issue 13 part 4).

usage: .venv/bin/python bench/bench_router_faq.py [--router models/router] [--json OUT]
       (apt-get install python3.11-doc python-sklearn-doc rust-doc procps man-db lsof xz-utils
        sed valgrind fortunes first; a source that is not installed is skipped and said so)

The questions are read from the installed files at run time, never copied into this repository:
- python: the Python 3.11 FAQ (/usr/share/doc/python3.11/html/faq/*.html);
- ai: scikit-learn's FAQ (python-sklearn-doc faq.html);
- system: the FAQs of procps, man-db, lsof, xz-utils, sed (sedfaq), base-files and valgrind;
- rust: rust-doc has no FAQ: the question headings of the Rust book, reference, rustc,
  rustdoc, nomicon, edition guide and embedded book, which phrase what their readers ask;
- general: the "Q:" lines of the fortunes package's `riddles` file (joke questions people
  wrote: "What was the greatest achievement in taxidermy?"), for general -> domain leakage.
The router's --extra training rows (models/router/README.md) never read these files: the
Python FAQ, scikit-learn's faq.html, the Rust books above and fortune's riddles are excluded
by its recipe, and the text FAQs are not pages prepare-data reads.
HTML headings that end in "?" come from hublab-tools' own docs reader (prepare-data --docs);
text FAQs give the lines that end in "?" after a "Q:" / "Q." / section-number prefix. A
question must have at least 4 words; duplicates (case-folded) and questions that are also in
data/router_queries.jsonl are dropped. Nothing is curated by hand, so some questions carry no
domain cue on their own ("What systems are supported?" from procps's FAQ): they count as
errors, and the report lists every misrouted question.

Reported per source and per domain: first-choice accuracy, the share sent to `general`, and
the router's expected calibration error (15 bins, tools/router_train.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import sys
from pathlib import Path

import numpy as np

from hublabio.router import OnnxRouter
from hublabio_tools.docs_data import page_rows, read_page
from hublabio_tools.router_train import expected_calibration_error, read_examples

REPO = Path(__file__).resolve().parent.parent
DOC = Path("/usr/share/doc")
MIN_WORDS = 4

HTML_SOURCES = {
    "python FAQ": ("python", [DOC / "python3.11/html/faq"]),
    "scikit-learn FAQ": ("ai", [DOC / "python-sklearn-doc/html/faq.html"]),
    "valgrind FAQ": ("system", [DOC / "valgrind/html/faq.html"]),
    "Rust docs' question headings": ("rust", [DOC / "rust-doc/html" / d for d in (
        "book", "reference", "rustc", "rustdoc", "nomicon", "edition-guide", "embedded-book")]),
}
TEXT_SOURCES = {
    "procps, man-db, lsof, xz, sed, base-files FAQs": ("system", [
        DOC / "procps/FAQ.gz", DOC / "man-db/FAQ", DOC / "lsof/00FAQ.gz",
        DOC / "xz-utils/faq.txt.gz", DOC / "sed/sedfaq.txt.gz", DOC / "base-files/FAQ"]),
    "fortune's riddles (Q: lines)": ("general", [Path("/usr/share/games/fortunes/riddles")]),
}
_PREFIX = re.compile(r"^\s*(?:Q[:.]\s*|\d+(?:\.\d+)*\.?\s+)")


def html_questions(paths: list[Path]) -> list[str]:
    out = []
    for root in paths:
        files = sorted(root.rglob("*.html")) if root.is_dir() else [root] if root.exists() else []
        for f in files:
            if f.name == "print.html":  # mdBook's whole book again
                continue
            page, _ = read_page(f)
            out += [r["prompt"] for r in page_rows(page, str(f)) if r["kind"] == "qa"]
    return out


def text_questions(paths: list[Path]) -> list[str]:
    out = []
    for f in paths:
        if not f.exists():
            continue
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        for line in raw.decode("utf-8", errors="replace").splitlines():
            m = _PREFIX.match(line)
            if not line.rstrip().endswith("?") or not (m or not line[:1].isspace()):
                continue           # an indented line without a prefix continues a sentence
            q = line[m.end():] if m else line
            q = " ".join(q.split())
            if q[:1].isupper():
                out.append(q)
    return out


def collect(known: set[str]) -> list[tuple[str, str, str]]:
    """(source, domain, question) for every installed source."""
    seen, rows = set(known), []
    sources = [(n, d, html_questions(p)) for n, (d, p) in HTML_SOURCES.items()]
    sources += [(n, d, text_questions(p)) for n, (d, p) in TEXT_SOURCES.items()]
    for name, domain, questions in sources:
        if not questions:
            print(f"skipped {name}: not installed", file=sys.stderr)
        for q in questions:
            key = q.casefold()
            if len(q.split()) >= MIN_WORDS and key not in seen:
                seen.add(key)
                rows.append((name, domain, q))
    return rows


def summary(probs: np.ndarray, labels: np.ndarray, domains: list[str]) -> dict:
    pred = probs.argmax(axis=1)
    general = domains.index("general") if "general" in domains else -1
    return {"n": int(len(labels)), "accuracy": round(float((pred == labels).mean()), 3),
            "to_general": round(float((pred == general).mean()), 3),
            "ece": round(expected_calibration_error(probs, labels), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", default=str(REPO / "models" / "router"))
    ap.add_argument("--data", default=str(REPO / "data" / "router_queries.jsonl"),
                    help="the router's training questions (dropped from the FAQ set)")
    ap.add_argument("--json", help="write every question with its scores here")
    args = ap.parse_args(argv)

    router = OnnxRouter.load(args.router)
    domains = list(router.domains)
    rows = collect({e.text.casefold() for e in read_examples(args.data)})
    if not rows:
        raise SystemExit("no FAQ source is installed (see the usage line)")
    scores = router.score_many([q for _, _, q in rows])
    probs = np.array([[s[d] for d in domains] for s in scores])
    labels = np.array([domains.index(d) for _, d, _ in rows])
    print(f"router {args.router} (temperature {router.meta.get('trained', {}).get('temperature')}"
          f"); {platform.machine()} python {platform.python_version()}")
    print(f"{'source':48s} {'domain':8s} {'n':>4s} {'acc':>6s} {'general':>8s} {'ECE':>6s}")
    report = {"all": summary(probs, labels, domains), "sources": {}, "domains": {}}
    for name in dict.fromkeys(n for n, _, _ in rows):
        m = np.array([n == name for n, _, _ in rows])
        s = report["sources"][name] = summary(probs[m], labels[m], domains)
        dom = rows[int(np.flatnonzero(m)[0])][1]
        print(f"{name:48s} {dom:8s} {s['n']:4d} {s['accuracy']:6.3f} {s['to_general']:8.3f} "
              f"{s['ece']:6.3f}")
    for d in dict.fromkeys(d for _, d, _ in rows):
        m = labels == domains.index(d)
        report["domains"][d] = summary(probs[m], labels[m], domains)
    a = report["all"]
    print(f"{'all':48s} {'':8s} {a['n']:4d} {a['accuracy']:6.3f} {a['to_general']:8.3f} "
          f"{a['ece']:6.3f}")
    wrong = [(n, d, q, domains[int(p.argmax())], round(float(p.max()), 3))
             for (n, d, q), p in zip(rows, probs) if domains[int(p.argmax())] != d]
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**report, "questions": [{"source": n, "domain": d, "text": q,
                                      "scores": {k: round(float(v), 4) for k, v in zip(domains, p)}}
                                     for (n, d, q), p in zip(rows, probs)]}, indent=1))
    print(f"\n{len(wrong)} misrouted (source domain -> routed, probability):")
    for n, d, q, got, p in wrong:
        print(f"  {d} -> {got} {p:.2f}  {q}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
