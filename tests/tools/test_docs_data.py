"""prepare-data --docs: HTML and man pages -> chunks and question-answer pairs, split by page."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from hublabio_tools import data as data_cli
from hublabio_tools import docs_data
from hublabio_tools.common import ToolError

FAQ = """<html><head><title>Programming FAQ - Docs</title><script>var x = 1;</script></head>
<body><div class="sphinxsidebar"><h3>Navigation</h3><p>Previous topic</p></div>
<div class="body" role="main"><section id="faq">
<h1><a class="toc-backref" href="#x">Programming FAQ</a><a class="headerlink" href="#faq">¶</a></h1>
<nav class="contents"><ul><li><a href="#q1">How do I copy an object in Python?</a></li></ul></nav>
<section id="general"><h2>General Questions</h2>
<p>This part of the FAQ is about the language in general, and it has a long enough
introduction to make a chunk of its own when it is packed with the next sections of the page,
which talk about lists, dictionaries and the standard library in some detail.</p>
<section id="q1"><h3>How do I copy an object in Python?</h3>
<p>In general, try <code>copy.copy()</code> or <code>copy.deepcopy()</code> for the general case.</p>
<pre>import copy
new = copy.deepcopy(old)</pre>
<h4>Sequences</h4><p>Sequences can be copied by slicing: <code>new_l = l[:]</code>.</p>
</section>
<section id="q2"><h3>Why?</h3><p>Too short a question to count as one.</p></section>
<section id="q3"><h3>How do I find the methods of an object?</h3><p>Short.</p></section>
</section></section></div>
<div class="footer">Copyright 2001 Python Software Foundation. All rights reserved.</div>
</body></html>"""

MAN = r""".\" a comment that must not appear
.TH LS 1 "2023" "GNU coreutils"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.SH DESCRIPTION
List information about the FILEs (the current directory by default).
Sort entries alphabetically if none of \fB\-cftuvSUX\fR nor \fB\-\-sort\fR is specified.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
.SH EXAMPLES
.nf
ls \-la /tmp
ls \-\-sort=size
.fi
The options above are the most common ones used on a Debian system every day.
"""


def test_html_page_keeps_main_content_and_drops_navigation():
    page = docs_data.html_page(Path("faq.html"), FAQ)
    texts = [b.text for b in page.blocks]
    assert page.title == "Programming FAQ"
    assert "Navigation" not in texts and "Previous topic" not in texts
    assert not any("Copyright" in t or "var x" in t or "¶" in t for t in texts)
    headings = [(b.level, b.text, b.anchor) for b in page.blocks if b.kind == "heading"]
    assert headings[:3] == [(1, "Programming FAQ", "faq"), (2, "General Questions", "general"),
                            (3, "How do I copy an object in Python?", "q1")]
    code = [b.text for b in page.blocks if b.kind == "code"]
    assert code == ["import copy\nnew = copy.deepcopy(old)"]


def test_question_headings_become_pairs_with_their_subsections():
    rows = docs_data.page_rows(docs_data.html_page(Path("faq.html"), FAQ), "faq.html")
    qa = [r for r in rows if r["kind"] == "qa"]
    assert [r["prompt"] for r in qa] == ["How do I copy an object in Python?"]
    answer = qa[0]["response"]
    assert answer.startswith("In general, try copy.copy() or copy.deepcopy()")
    assert "```\nimport copy\nnew = copy.deepcopy(old)\n```" in answer
    assert "Sequences can be copied by slicing" in answer   # the h4 under the question
    assert qa[0]["source"] == "faq.html#q1"
    chunks = [r for r in rows if r["kind"] == "chunk"]
    assert all("deepcopy" not in r["text"] for r in chunks)  # pairs are not chunks as well
    assert chunks and chunks[0]["text"].startswith("# Programming FAQ\n\n## General Questions")
    assert all(len(r["text"]) >= docs_data.MIN_CHUNK_CHARS for r in chunks)


def test_man_page_text_without_troff():
    page = docs_data.man_page(Path("ls.1"), MAN)
    assert page.title == "ls(1)"
    text = "\n".join(b.text for b in page.blocks)
    assert "comment" not in text and "\\f" not in text and "\\-" not in text
    assert "ls - list directory contents" in text
    assert "[OPTION]... [FILE]..." in text
    assert "-a, --all do not ignore entries starting with ." in text
    assert [b.text for b in page.blocks if b.kind == "code"] == ["ls -la /tmp\nls --sort=size"]
    assert [b.text for b in page.blocks if b.kind == "heading"] == [
        "Name", "Synopsis", "Description", "Examples"]


def test_long_sections_are_split_under_the_limit():
    body = "".join(f"<p>Sentence number {i} says something about pointers and borrowing.</p>"
                   for i in range(200))
    page = docs_data.html_page(Path("b.html"), f"<main><h1>Book</h1><h2>Ch</h2>{body}</main>")
    rows = docs_data.page_rows(page, "b.html", chunk_chars=600)
    assert len(rows) > 10 and all(len(r["text"]) <= 600 for r in rows)
    joined = " ".join(r["text"] for r in rows)
    assert all(f"Sentence number {i} " in joined for i in range(200))  # nothing lost


def _tree(tmp_path: Path, pages: int = 10) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i in range(pages):
        para = " ".join(f"Page {i} explains topic {j} of the library in plain words."
                        for j in range(12))
        (root / "sub" / f"p{i}.html").write_text(f"<main><h1>Page {i}</h1><p>{para}</p></main>")
    (root / "faq.html").write_text(FAQ)
    man = root / "man1"
    man.mkdir()
    (man / "ls.1.gz").write_bytes(gzip.compress(MAN.encode()))
    (root / "style.css").write_text("body {}")
    return root


def test_prepare_docs_splits_by_page_and_records_sha256(tmp_path):
    root = _tree(tmp_path)
    out = tmp_path / "out"
    assert data_cli.main(["--docs", str(root), "--out", str(out), "--heldout-pages", "0.25",
                          "--seed", "3"]) == 0
    meta = json.loads((out / "docs_meta.json").read_text())
    train = [json.loads(l) for l in (out / "docs_train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (out / "docs_heldout.jsonl").read_text().splitlines()]
    assert meta["pages"] == 12 and meta["heldout_page_count"] == 3  # css is not a page
    by_split = {s["source"]: s["split"] for s in meta["sources"]}
    page_of = lambda r: r["source"].split("#")[0]  # noqa: E731
    assert {page_of(r) for r in train}.isdisjoint({page_of(r) for r in held})
    assert all(by_split[page_of(r)] == "train" for r in train)
    assert all(by_split[page_of(r)] == "heldout" for r in held)
    for s in meta["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
    assert meta["train_sha256"] == hashlib.sha256((out / "docs_train.jsonl").read_bytes()
                                                  ).hexdigest()
    # reproducible with the seed, another seed splits otherwise
    again = tmp_path / "again"
    data_cli.main(["--docs", str(root), "--out", str(again), "--heldout-pages", "0.25",
                   "--seed", "3"])
    assert (again / "docs_train.jsonl").read_bytes() == (out / "docs_train.jsonl").read_bytes()
    other = docs_data.prepare_docs([str(root)], tmp_path / "other", heldout_pages=0.25, seed=4)
    assert {s["source"] for s in other["sources"] if s["split"] == "heldout"} != \
        {s for s, v in by_split.items() if v == "heldout"}


def test_train_rows_are_a_valid_prepare_data_input(tmp_path):
    root = _tree(tmp_path)
    out = tmp_path / "out"
    docs_data.prepare_docs([str(root)], out, heldout_pages=0.0)
    prepared = data_cli.prepare([str(out / "docs_train.jsonl")], data_cli.SEED_FORMAT,
                                default_system="You are a Python expert.", quiet=True,
                                near_dup=0)
    assert not prepared.problems
    rows = prepared.train + prepared.valid
    chats = [r for r in rows if "messages" in r]
    assert len(chats) == 1 and chats[0]["messages"][0]["content"] == "You are a Python expert."
    assert len(rows) - 1 == sum(s["chunks"] for s in
                                json.loads((out / "docs_meta.json").read_text())["sources"])


def test_max_rows_keeps_pairs_first_and_is_seeded(tmp_path):
    root = _tree(tmp_path)
    a = docs_data.prepare_docs([str(root)], tmp_path / "a", heldout_pages=0, max_rows=4, seed=1)
    rows = [json.loads(l) for l in (tmp_path / "a" / "docs_train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and a["counts"]["train_available"] > 4
    assert sum(r["kind"] == "qa" for r in rows) == 1
    docs_data.prepare_docs([str(root)], tmp_path / "b", heldout_pages=0, max_rows=4, seed=1)
    assert (tmp_path / "b" / "docs_train.jsonl").read_bytes() == \
        (tmp_path / "a" / "docs_train.jsonl").read_bytes()


def test_glob_selects_pages_and_errors_name_the_problem(tmp_path):
    root = _tree(tmp_path)
    meta = docs_data.prepare_docs([str(root)], tmp_path / "g", globs=["sub/p1*.html"],
                                  heldout_pages=0)
    assert [s["source"] for s in meta["sources"]] == ["docs/sub/p1.html"]
    meta = docs_data.prepare_docs([str(root)], tmp_path / "e", excludes=["sub/*", "man1/*"],
                                  heldout_pages=0)
    assert [s["source"] for s in meta["sources"]] == ["docs/faq.html"]
    with pytest.raises(ToolError, match="no HTML, man pages or fortune files matching nothing/"):
        docs_data.prepare_docs([str(root)], tmp_path / "x", globs=["nothing/*"])
    with pytest.raises(ToolError, match="missing: no such file or folder"):
        docs_data.prepare_docs([str(tmp_path / "missing")], tmp_path / "x")
    with pytest.raises(ToolError, match="--heldout-pages 1.5"):
        docs_data.prepare_docs([str(root)], tmp_path / "x", heldout_pages=1.5)
    bad = root / "broken.1.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ToolError, match="broken.1.gz: cannot read"):
        docs_data.prepare_docs([str(root)], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_cli_errors_exit_nonzero_with_a_message(tmp_path, capsys):
    root = _tree(tmp_path)
    assert data_cli.main(["--docs", str(root), "--out", str(tmp_path / "y"),
                          "--max-rows", "-1"]) != 0
    assert "--max-rows -1" in capsys.readouterr().err
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "hello"}\n')
    assert data_cli.main([str(jsonl), "--out", str(tmp_path / "z"), "--max-rows", "3"]) != 0
    assert "apply to --docs only" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
