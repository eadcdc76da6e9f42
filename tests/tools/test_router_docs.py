"""prepare-data --docs --router-domain (documentation -> router rows) and train-router --extra
(rows that join the training split only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from hublabio.router import OnnxRouter
from hublabio_tools import router_docs, router_train
from hublabio_tools.cli import main as cli_main
from hublabio_tools.common import ToolError
from hublabio_tools.docs_data import read_page

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "router_queries.jsonl"
FAST = ["--epochs", "4", "--hidden", "0", "--dim", "8192", "--seed", "3",
        "--calibrate-folds", "0"]

MAN = r""".TH ZQUUXTOP 1 "2024"
.SH NAME
zquuxtop \- display the zquux scheduler's queues
.SH SYNOPSIS
.B zquuxtop
[\fB\-d\fR \fIdelay\fR]
.SH DESCRIPTION
Zquuxtop shows every queue of the zquux scheduler. It refreshes every few seconds.
.SH SEE ALSO
ps(1), top(1)
"""

HTML = """<html><head><title>csv — CSV File Reading and Writing</title></head><body>
<div role="main"><h1>csv — CSV File Reading and Writing</h1>
<p>The csv module implements classes to read and write tabular data. More follows here.</p>
<h2>Module Contents</h2><p>The csv module defines the following functions: reader and writer.</p>
<h2>x = f(a, b=1) -> {0: [1, 2]}</h2><p>ok</p>
</div></body></html>"""


def _fortunes(folder: Path, name: str, entries: list[str]) -> Path:
    path = folder / name
    path.write_text("\n%\n".join(entries) + "\n%\n")
    (folder / f"{name}.dat").write_bytes(b"\0" * 24)       # strfile's index marks the format
    return path


def test_man_page_gives_its_name_line_and_first_sentences(tmp_path):
    path = tmp_path / "zquuxtop.1.gz"
    path.write_bytes(gzip.compress(MAN.encode()))
    texts = router_docs.page_texts(read_page(path)[0])
    assert texts[0] == "zquuxtop - display the zquux scheduler's queues"
    assert "Zquuxtop shows every queue of the zquux scheduler." in texts
    assert not any("ps(1)" in t or "delay" in t for t in texts)   # SEE ALSO, SYNOPSIS dropped


def test_html_page_gives_title_headings_and_first_sentences_not_code(tmp_path):
    path = tmp_path / "csv.html"
    path.write_text(HTML)
    texts = router_docs.page_texts(read_page(path)[0])
    assert "csv — CSV File Reading and Writing" in texts and "Module Contents" in texts
    assert "The csv module implements classes to read and write tabular data." in texts
    assert not any("->" in t for t in texts)        # mostly not letters: dropped


def test_fortune_file_is_recognised_by_its_index_and_keeps_every_entry(tmp_path):
    entries = [f"Entry number {n} is about gardens. It has a second sentence." for n in range(9)]
    path = _fortunes(tmp_path, "gardens", entries)
    assert router_docs.page_texts(read_page(path)[0]) == [
        f"Entry number {n} is about gardens." for n in range(9)]
    (tmp_path / "gardens.dat").unlink()      # without strfile's index it is not a page
    with pytest.raises(ToolError, match="no HTML, man pages or fortune files"):
        router_docs.prepare_router_rows([str(tmp_path)], "general", tmp_path / "out")


def test_prepare_data_router_rows_cli_writes_rows_and_meta(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "man1").mkdir(parents=True)
    (docs / "man1" / "zquuxtop.1").write_text(MAN)
    for n in range(3):     # one family of generated pages counts once
        (docs / "man1" / f"gcloud_topic_{n}.1").write_text(
            MAN.replace("zquuxtop \\- display", f"gcloud topic {n} \\- show"))
    out = tmp_path / "out"
    assert cli_main(["prepare-data", "--docs", str(docs), "--router-domain", "system",
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "router_system.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in rows} == {"system"}
    assert sum("gcloud topic" in r["text"] for r in rows) == 1
    assert any(r["text"].startswith("zquuxtop - display") for r in rows)
    meta = json.loads((out / "router_system_meta.json").read_text())
    assert meta["pages_found"] == 4 and meta["pages_read"] == 2 and meta["rows"] == len(rows)
    assert meta["argv"][:2] == ["--docs", str(docs)]
    assert "rows labelled system" in capsys.readouterr().out


def test_max_rows_is_a_seeded_sample(tmp_path):
    _fortunes(tmp_path, "words", [f"Sentence {n} talks about the weather today." for n in range(50)])

    def sample(seed, name):
        router_docs.prepare_router_rows([str(tmp_path)], "general", tmp_path / name,
                                        max_rows=10, seed=seed)
        return (tmp_path / name / "router_general.jsonl").read_text()

    assert sample(0, "a") == sample(0, "b") != sample(1, "c")
    assert len(sample(0, "a").splitlines()) == 10


@pytest.mark.parametrize("argv, message", [
    (["--router-domain", "Sys tem"], "expected a lower-case name"),
    (["--router-domain", "system", "--max-rows", "-1"], "expected 0"),
])
def test_bad_router_rows_options_are_named(tmp_path, capsys, argv, message):
    (tmp_path / "zquuxtop.1").write_text(MAN)
    assert cli_main(["prepare-data", "--docs", str(tmp_path), *argv,
                     "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_router_domain_needs_docs(tmp_path, capsys):
    assert cli_main(["prepare-data", str(DATA), "--router-domain", "system",
                     "--out", str(tmp_path / "o")]) == 1
    assert "apply to --docs only" in capsys.readouterr().err


def _train(out: Path, *extra: str) -> dict:
    args = router_train.build_parser().parse_args(["--data", str(DATA), "--out", str(out),
                                                   *FAST, *extra])
    return router_train.train_router(args)


def test_extra_rows_join_training_only_and_teach_new_words(tmp_path):
    words = ["zquuxtop", "frobnictl", "blarghd"]
    rows = tmp_path / "router_system.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{w} - manage the {w} service queues",
                                        "domain": "system", "source": f"{w}.1"}) + "\n"
                            for w in words for _ in range(15)))
    (tmp_path / "router_system_meta.json").write_text(json.dumps({"argv": ["--docs", "x"]}))
    plain = _train(tmp_path / "plain")
    more = _train(tmp_path / "more", "--extra", str(rows))
    # the held-out split comes from --data alone: same size, same questions
    assert more["trained"]["n_holdout"] == plain["trained"]["n_holdout"]
    assert more["keyword_router"] == plain["keyword_router"]     # scored on the same questions
    assert more["trained"]["n_train_extra"] == 45
    record = more["trained"]["extra"][0]
    assert record["file"] == "router_system.jsonl" and record["rows"] == 45
    assert record["domains"] == {"system": 45} and len(record["sha256"]) == 64
    assert record["prepare_data_argv"] == ["--docs", "x"]
    # what the rows teach: questions naming those tools now go to system
    queries = [f"how do I use {w}" for w in words]

    def routed(folder):
        router = OnnxRouter.load(folder)
        return [max(s, key=s.get) for s in router.score_many(queries)]
    assert routed(tmp_path / "more") == ["system"] * 3
    assert routed(tmp_path / "plain") != ["system"] * 3


def test_extra_rows_with_an_unknown_domain_are_refused(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a b c", "domain": "python"}) + "\n"
                    + json.dumps({"text": "d e f", "domain": "cooking"}) + "\n")
    assert cli_main(["train-router", "--data", str(DATA), "--out", str(tmp_path / "o"),
                     *FAST, "--extra", str(rows)]) == 1
    err = capsys.readouterr().err
    assert f"{rows}:2: domain 'cooking' is not a domain of --data" in err
    assert not (tmp_path / "o").exists()


def test_a_broken_record_beside_the_extra_rows_is_an_error(tmp_path, capsys):
    rows = tmp_path / "router_system.jsonl"
    rows.write_text(json.dumps({"text": "zquuxtop - show queues", "domain": "system"}) + "\n")
    (tmp_path / "router_system_meta.json").write_text("{not json")
    assert cli_main(["train-router", "--data", str(DATA), "--out", str(tmp_path / "o"),
                     *FAST, "--extra", str(rows)]) == 1
    assert "router_system_meta.json: not a prepare-data --router-domain record" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()
