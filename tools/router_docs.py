"""prepare-data --docs --router-domain DOMAIN: documentation -> short labelled router rows.

usage: hublab-tools prepare-data --docs PATH [PATH ...] --router-domain DOMAIN --out DIR
           [--glob PATTERN ...] [--exclude PATTERN ...] [--max-rows N] [--seed 0]

The router's hand-written questions (data/router_queries.jsonl) never name most of the tools,
modules and APIs users ask about. Documentation does, in its headings and first sentences.
Each page (HTML, man page or fortune file, as for --docs) gives rows {"text", "domain",
"source"} of at most 30 words, at most 6 per page (a fortune file: all of its entries):
- a man page: its NAME line ("lsof - list open files"), the first sentence of each section;
- an HTML page: its title and section headings of two or more words, and the first sentence of
  each section's first paragraph;
- a fortune file: the first sentence of each entry (everyday English for `general`).
Rows that are mostly not letters (signatures, code, tables) and rows of fewer than 2 words are
dropped, and rows are deduplicated (case-folded). Man pages count once per family (the name
up to its first `_`, `-` or `.`), since a few tools ship thousands of pages (gcloud, git).
--max-rows keeps a sample of that many rows drawn with --seed (0: all), in page order.

Writes DIR/router_DOMAIN.jsonl and DIR/router_DOMAIN_meta.json (the arguments, pages read,
rows, the output's sha256). These rows are training-only: `hublab-tools train-router --extra
DIR/router_DOMAIN.jsonl` adds them to the training split, never to the held-out one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from hublabio.fsutil import file_sha256
from hublabio_tools.common import ToolError, write_json_atomic, write_jsonl_atomic
from hublabio_tools.docs_data import (
    Page, clean_heading, find_pages, is_fortune_file, page_sections, read_page,
)

ROWS_PER_PAGE = 6
MAX_WORDS = 30
MIN_LETTER_SHARE = 0.85
_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)")
_SKIPPED_HEADINGS = {"see also", "author", "authors", "copyright", "bugs", "reporting bugs",
                     "colophon", "footnotes", "table of contents", "navigation", "synopsis",
                     "index", "contents"}
_DOMAIN = re.compile(r"^[a-z][a-z0-9_-]*$")


def first_sentence(text: str) -> str:
    m = _SENTENCE.match(text)
    return " ".join((m.group(1) if m else text).split()[:MAX_WORDS])


def _usable(text: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(text.split()) >= 2 and letters >= MIN_LETTER_SHARE * len(text)


def page_texts(page: Page) -> list[str]:
    """Every candidate row of one page, in page order (see the module docstring)."""
    if is_fortune_file(page.path):
        return [first_sentence(b.text) for b in page.blocks]
    out = [] if page.path.suffix not in (".html", ".htm") else [page.title]
    for sec in page_sections(page):
        heading = clean_heading(sec.heading.text) if sec.heading else ""
        body = next((b.text for b in sec.body if b.kind == "text" and len(b.text.split()) >= 3),
                    "")
        if heading.lower() == "name":
            out.append(" ".join(body.split()[:MAX_WORDS]))
            continue
        if heading.lower() in _SKIPPED_HEADINGS:
            continue
        out += [heading, first_sentence(body)]
    return [t for t in out if t and _usable(t)]


def man_family(path: Path) -> str | None:
    """gcloud_compute_ssh.1.gz -> "gcloud"; None for a page that is not a man page."""
    if path.suffix in (".html", ".htm") or is_fortune_file(path):
        return None
    return re.split(r"[_.-]", path.name)[0]


def prepare_router_rows(paths: list[str], domain: str, out: Path, *, globs=(), excludes=(),
                        max_rows: int = 0, seed: int = 0, argv: list[str] | None = None) -> dict:
    """Read pages, write DIR/router_DOMAIN.jsonl and its meta; returns the meta."""
    if not _DOMAIN.match(domain):
        raise ToolError(f"--router-domain {domain!r}: expected a lower-case name like "
                        "'python' or 'system'")
    if max_rows < 0:
        raise ToolError(f"--max-rows {max_rows}: expected 0 (all) or more")
    pages = [p for p, _ in find_pages(paths, list(globs), list(excludes))]
    rng = random.Random(seed)
    rows, seen, families, read = [], set(), set(), 0
    for path in pages:
        family = man_family(path)
        if family is not None and family in families:
            continue
        page, _ = read_page(path)
        texts = page_texts(page)
        if not texts:
            continue
        read += 1
        if family is not None:
            families.add(family)
        rng.shuffle(texts)
        limit = len(texts) if is_fortune_file(path) else ROWS_PER_PAGE
        fresh = [t for t in dict.fromkeys(texts) if t.casefold() not in seen][:limit]
        seen.update(t.casefold() for t in fresh)
        rows += [{"text": t, "domain": domain, "source": str(path)} for t in fresh]
    available = len(rows)
    if max_rows and len(rows) > max_rows:
        keep = set(rng.sample(range(len(rows)), max_rows))
        rows = [r for i, r in enumerate(rows) if i in keep]      # page order, reproducibly
    if not rows:
        raise ToolError(f"{', '.join(paths)}: no router rows (no heading, NAME line or "
                        "sentence of at least 2 words)")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"router_{domain}.jsonl"
    write_jsonl_atomic(target, rows)
    meta = {"by": "hublab-tools prepare-data --docs --router-domain", "argv": argv,
            "domain": domain, "seed": seed, "max_rows": max_rows, "globs": list(globs),
            "excludes": list(excludes), "pages_found": len(pages), "pages_read": read,
            "rows": len(rows), "rows_available": available, "sha256": file_sha256(target)}
    write_json_atomic(out / f"router_{domain}_meta.json", meta)
    return meta
