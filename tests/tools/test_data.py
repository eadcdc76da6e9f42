"""prepare-data: formats, chat templates, bad lines with file:line, dedup, filters, split."""

from __future__ import annotations

import json

import pytest

from hublabio_tools import cli
from hublabio_tools.common import ToolError
from hublabio_tools.data import (
    SEED_FORMAT, NearDuplicateIndex, load_chat_format, load_prepared, normalize_record, prepare,
    render_segments,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_input_format_renders_in_the_seed_format():
    fmt = SEED_FORMAT
    pr = render_segments(normalize_record({"prompt": "Hi?", "response": "Hello."}), fmt)
    assert pr == [["<|user|>\nHi?<|end|>\n<|assistant|>\n", False], ["Hello.<|end|>\n", True]]
    inst = normalize_record({"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert inst["messages"][0]["content"] == "Add\n\n1 and 2"
    text = render_segments(normalize_record({"text": "plain words"}), fmt)
    assert text == [["plain words", True]]
    chat = normalize_record({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"}]})
    segments = render_segments(chat, fmt)
    assert [s[1] for s in segments] == [False, True, False, True]
    assert "".join(s[0] for s in segments) == fmt.render(chat["messages"])
    assert segments[1][0] == "b<|end|>\n" and segments[3][0] == "d<|end|>\n"


def test_default_system_prompt_is_added_when_missing():
    record = normalize_record({"prompt": "q", "response": "r"}, default_system="Be brief.")
    assert record["messages"][0] == {"role": "system", "content": "Be brief."}


def test_hf_dir_chat_template_is_used(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": {"content": "</e>"}, "bos_token": "<b>"}))
    fmt = load_chat_format(str(tmp_path))
    segments = render_segments(normalize_record({"prompt": "x", "response": "y"}), fmt)
    assert segments == [["[user]x</e>[assistant]", False], ["y</e>", True]]


def test_gguf_chat_template_is_read_from_the_header(smollm2_path):
    fmt = load_chat_format(str(smollm2_path))
    assert fmt.name.startswith("gguf:")
    segments = render_segments(normalize_record({"prompt": "2+2?", "response": "4"}), fmt)
    assert "<|im_start|>user\n2+2?<|im_end|>" in segments[0][0]
    assert segments[0][0].endswith("<|im_start|>assistant\n") and not segments[0][1]
    assert segments[1] == ["4<|im_end|>\n", True]


def test_bad_lines_are_reported_with_file_and_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"text": "fine line one, long enough"},
        "{not json",
        {"prompt": "no response"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"text": 5},
        {"prompt": "ok?", "response": "ok"},
    ])
    out = tmp_path / "out"
    assert cli.main(["prepare-data", str(src), "--out", str(out), "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:2: invalid JSON" in err
    assert f'{src}:3: missing "response"' in err
    assert f"{src}:4: messages[0].role must be one of" in err
    assert f'{src}:5: "text" must be a string' in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["bad"] == 4 and meta["counts"]["train"] == 2
    train, valid, _ = load_prepared(out)
    assert sorted(row["source"] for row in train + valid) == [f"{src}:1", f"{src}:6"]


def test_strict_fails_at_the_first_bad_line_and_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, {"text": "good 2"}, "[1, 2]"])
    out = tmp_path / "out"
    assert cli.main(["prepare-data", str(src), "--out", str(out), "--strict"]) == 1
    assert f"{src}:3: expected a JSON object, got list" in capsys.readouterr().err
    assert not out.exists()


def test_exact_and_near_duplicates_are_removed(tmp_path):
    base = ("The Raspberry Pi runs small language models from an SD card, and HubLab IO routes "
            "each question to the expert that knows the topic best.")
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"text": base},
        {"text": base.upper().replace(" ", "   ")},        # exact after normalisation
        {"text": base.replace("best.", "best!")},          # near duplicate
        {"text": "An entirely different sentence about cooking pasta in salted water."},
    ])
    result = prepare([str(src)], SEED_FORMAT, val_fraction=0, quiet=True)
    assert result.counts["exact_duplicates"] == 1
    assert result.counts["near_duplicates"] == 1
    assert len(result.train) == 2
    kept_off = prepare([str(src)], SEED_FORMAT, val_fraction=0, near_dup=0, quiet=True)
    assert kept_off.counts["near_duplicates"] == 0 and len(kept_off.train) == 3


def test_near_duplicate_index_threshold():
    index = NearDuplicateIndex(0.8)
    a = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert index.add_if_new(a)
    assert not index.add_if_new(a.replace("fourteen", "fourteen!"))
    assert index.add_if_new("a completely unrelated text about rust borrow checking rules")


def test_length_filter_and_seeded_split(tmp_path):
    rows = [{"text": f"example number {i} " + "word " * (i % 7)} for i in range(40)]
    rows.append({"text": "x"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    a = prepare([str(src)], SEED_FORMAT, min_chars=5, max_chars=40, val_fraction=0.25, seed=3,
                near_dup=0, quiet=True)
    b = prepare([str(src)], SEED_FORMAT, min_chars=5, max_chars=40, val_fraction=0.25, seed=3,
                near_dup=0, quiet=True)
    c = prepare([str(src)], SEED_FORMAT, min_chars=5, max_chars=40, val_fraction=0.25, seed=4,
                near_dup=0, quiet=True)
    assert a.counts["too_short"] == 1 and a.counts["too_long"] > 0
    assert all(5 <= len(r["text"]) <= 40 for r in a.train + a.valid)
    assert [r["text"] for r in a.valid] == [r["text"] for r in b.valid]
    assert [r["text"] for r in a.valid] != [r["text"] for r in c.valid]
    assert len(a.valid) == round((len(a.train) + len(a.valid)) * 0.25)


def test_unknown_model_path_is_an_error(tmp_path):
    with pytest.raises(ToolError, match="no such file"):
        load_chat_format(str(tmp_path / "nope.gguf"))


def test_bad_bytes_and_bad_json_are_reported_at_their_column(tmp_path, capsys):
    """Issue 14: invalid UTF-8 crashed prepare-data with a traceback; the column an error is
    reported at is the one an editor shows (characters, a BOM on line 1 skipped)."""
    src = tmp_path / "in.jsonl"
    src.write_bytes("\ufeff".encode() + b'{"prompt": "ok?", "response": "ok"}\n'
                    + b'{"prompt": "caf\xc3\xa9 \xff", "response": "x"}\n'
                    + b'{"prompt": "a", "response": "b"  "c": 1}\n'
                    + b'{"prompt": "fine", "response": "yes"}\n')
    out = tmp_path / "out"
    assert cli.main(["prepare-data", str(src), "--out", str(out), "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:2: not UTF-8 (byte 0xff at column 18)" in err
    assert f"{src}:3: invalid JSON (Expecting ',' delimiter at column 34)" in err
    assert json.loads((out / "meta.json").read_text())["counts"]["train"] == 2
