"""hublab-tools prepare-data: jsonl -> chat-formatted, deduplicated train/validation dataset.

usage: hublab-tools prepare-data INPUT.jsonl [INPUT.jsonl ...] --out DIR [options]
       hublab-tools prepare-data --docs PATH [PATH ...] --out DIR [docs options]
       hublab-tools prepare-data --docs PATH [PATH ...] --router-domain DOMAIN --out DIR

--docs reads documentation (HTML or man pages) instead and writes raw rows for train-expert:
see "Documentation" below. With --router-domain it writes short labelled rows for
train-router --extra: see "Router rows" below.

Each input line is one of
  {"text": "..."}                                     plain text (trained on every token)
  {"prompt": "...", "response": "..."}                 ("completion" also accepted)
  {"instruction": "...", "input": "...", "response": "..."}   ("output" also accepted)
  {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
and may carry "system" (a system prompt). Conversations are rendered with the target model's
chat template (--model: a local HF directory or a .gguf file), or with the seed's
`<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>` format for models trained from scratch.

Writes DIR/train.jsonl and DIR/valid.jsonl (rows {"text", "segments": [[text, trained], ...],
"source": "file:line"} plus "messages" for conversations; the segments keep the prompt/response
boundaries so `finetune` puts the loss on response tokens only) and DIR/meta.json (format and counts). Exact duplicates
(normalised text hash) and near-duplicates (MinHash over character 5-gram shingles, verified
by exact Jaccard >= --near-dup) are removed, keeping the first. A bad line is reported as
file:line: reason and skipped (--strict: the first bad line is an error and nothing is written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hublabio_tools.common import (
    SEED_CHAT_TEMPLATE, ToolError, held_out_count, iter_jsonl, main_guard, render_template,
    write_json_atomic, write_jsonl_atomic,
)

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- chat formats
@dataclass
class ChatFormat:
    """A chat template plus the special-token strings it refers to."""

    name: str
    template: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_template(self.template, messages, add_generation_prompt,
                               self.bos_token, self.eos_token)


SEED_FORMAT = ChatFormat("seed", SEED_CHAT_TEMPLATE, "<s>", "</s>")


def _token_text(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _gguf_chat_format(path: Path) -> ChatFormat | None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct errors on a broken file
        raise ToolError(f"{path}: not a readable GGUF ({err})") from None

    def scalar(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    template = scalar("tokenizer.chat_template")
    if not template:
        return None
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key):
        index = scalar(key)
        if index is None or tokens is None:
            return ""
        return bytes(tokens.parts[tokens.data[int(index)]]).decode("utf-8", "replace")

    return ChatFormat(f"gguf:{path.name}", template, token("tokenizer.ggml.bos_token_id"),
                      token("tokenizer.ggml.eos_token_id"))


def _hf_chat_format(directory: Path) -> ChatFormat | None:
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ToolError(f"{config_path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    template = config.get("chat_template")
    jinja_file = directory / "chat_template.jinja"
    if not template and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    return ChatFormat(f"hf:{directory.name}", template, _token_text(config.get("bos_token")),
                      _token_text(config.get("eos_token")))


def load_chat_format(model: str | None) -> ChatFormat:
    """The chat format of a local model (HF dir or .gguf), or the seed format when `model` is
    None or has no chat template (a message says so)."""
    if not model:
        return SEED_FORMAT
    path = Path(model)
    if not path.exists():
        raise ToolError(f"--model {model}: no such file or directory (give a local HF dir or .gguf)")
    found = _gguf_chat_format(path) if path.is_file() else _hf_chat_format(path)
    if found is None:
        print(f"note: {model} has no chat template; using the seed <|user|>...<|end|> format",
              file=sys.stderr)
        return SEED_FORMAT
    return found


# ----------------------------------------------------------------------------- records
def _text_field(obj: dict, key: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f'missing "{key}"')
        return None
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    if required and not value.strip():
        raise ValueError(f'"{key}" is empty')
    return value


def normalize_record(obj, default_system: str | None = None) -> dict:
    """One input object -> {"text": str} or {"messages": [...]}; ValueError names the problem.
    `default_system` becomes the system turn of conversations that have none."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    system = _text_field(obj, "system", required=False) or default_system
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            content = message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise ValueError("messages has no non-empty assistant turn")
        if head and out[0]["role"] != "system":
            out = head + out
        return {"messages": out}
    response_key = next((k for k in ("response", "completion", "output") if k in obj), None)
    if "prompt" in obj or "instruction" in obj:
        if response_key is None:
            raise ValueError('missing "response"')
        if "prompt" in obj:
            user = _text_field(obj, "prompt")
        else:
            user = _text_field(obj, "instruction")
            extra = _text_field(obj, "input", required=False)
            if extra and extra.strip():
                user = f"{user}\n\n{extra}"
        response = _text_field(obj, response_key)
        return {"messages": head + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": response}]}
    if "text" in obj:
        return {"text": _text_field(obj, "text")}
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f'no known fields (have: {keys}; expected "text", "prompt"/"response", '
                     f'"instruction"/"response" or "messages")')


def render_segments(record: dict, fmt: ChatFormat) -> list[list]:
    """[[text, trained], ...]: assistant turns are trained, everything else is context."""
    if "text" in record:
        return [[record["text"], True]]
    messages = record["messages"]
    segments: list[list] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = fmt.render(messages[:i], add_generation_prompt=True)
        full = fmt.render(messages[: i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            # The template rewrites earlier turns (e.g. drops reasoning): train on the last turn.
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            prefix = fmt.render(messages[:last], add_generation_prompt=True)
            full = fmt.render(messages[: last + 1])
            if not full.startswith(prefix):
                raise ValueError(f"chat template {fmt.name} does not render the prompt as a "
                                 "prefix of the conversation")
            return [[prefix, False], [full[len(prefix):], True]]
        segments.append([prefix[len(done):], False])
        segments.append([full[len(prefix):], True])
        done = full
    tail = fmt.render(messages)[len(done):]
    if tail:
        segments.append([tail, False])
    return [s for s in segments if s[0]]


# ----------------------------------------------------------------------------- dedup
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    return _SPACE.sub(" ", text.casefold()).strip()


def shingles(text: str, k: int = 5) -> set[int]:
    norm = normalize_text(text)
    if len(norm) <= k:
        return {zlib.crc32(norm.encode())}
    return {zlib.crc32(norm[i:i + k].encode()) for i in range(len(norm) - k + 1)}


class NearDuplicateIndex:
    """MinHash + LSH banding to find candidates, the MinHash estimate to skip clear misses
    (estimate more than 0.15 below the threshold: with 128 permutations its standard error is
    at most 0.045), exact shingle Jaccard to confirm."""

    MERSENNE = (1 << 61) - 1

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        import numpy as np

        self.np = np
        self.threshold = threshold
        rows = 2 if threshold < 0.6 else 4
        self.bands, self.rows = num_perm // rows, rows
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.MERSENNE, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self.MERSENNE, size=num_perm, dtype=np.uint64)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.kept: list[set[int]] = []
        self.signatures: list = []

    def signature(self, shingle_set: set[int]):
        np = self.np
        values = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
        with np.errstate(over="ignore"):
            hashed = (values[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(self.MERSENNE)
        return (hashed & np.uint64(0xFFFFFFFF)).min(axis=0)

    def add_if_new(self, text: str) -> bool:
        """True (and remembered) unless `text` is a near-duplicate of one already added."""
        np = self.np
        shingle_set = shingles(text)
        sig = self.signature(shingle_set)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = sorted({other for band, key in enumerate(keys)
                             for other in self.buckets[band].get(key, ())})
        if candidates:
            # MinHash estimate first (vectorised), exact Jaccard only for the plausible ones.
            estimate = (np.stack([self.signatures[i] for i in candidates]) == sig).mean(axis=1)
            for other, guess in zip(candidates, estimate):
                if guess < self.threshold - 0.15:
                    continue
                kept = self.kept[other]
                if len(shingle_set & kept) / len(shingle_set | kept) >= self.threshold:
                    return False
        index = len(self.kept)
        self.kept.append(shingle_set)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(index)
        return True


def content_of(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


# ----------------------------------------------------------------------------- pipeline
@dataclass
class Prepared:
    train: list[dict]
    valid: list[dict]
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    format_name: str = "seed"


def prepare(inputs: list[str], fmt: ChatFormat, *, near_dup: float = 0.85, min_chars: int = 1,
            max_chars: int = 0, val_fraction: float = 0.1, seed: int = 0, strict: bool = False,
            quiet: bool = False, default_system: str | None = None) -> Prepared:
    """Read, validate, render, deduplicate, filter and split. Bad lines are collected in
    `.problems` (file:line: reason) or, with strict, raise ToolError at the first one."""
    counts: Counter = Counter()
    problems: list[str] = []
    rows: list[dict] = []
    exact: set[str] = set()
    near = NearDuplicateIndex(near_dup) if 0 < near_dup < 1 else None
    last_report = time.monotonic()
    for path in inputs:
        for item in iter_jsonl(path):
            counts["read"] += 1
            if not quiet and time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                print(f"prepare-data: {counts['read']} lines read, {len(rows)} kept", file=sys.stderr)
            try:
                if item.error:
                    raise ValueError(item.error)
                record = normalize_record(item.value, default_system)
                segments = render_segments(record, fmt)
            except ValueError as err:
                if strict:
                    raise ToolError(f"{item.where}: {err}") from None
                counts["bad"] += 1
                problems.append(f"{item.where}: {err}")
                if not quiet:
                    print(f"skipped {item.where}: {err}", file=sys.stderr)
                continue
            text = "".join(s[0] for s in segments)
            if len(text) < min_chars:
                counts["too_short"] += 1
                continue
            if max_chars and len(text) > max_chars:
                counts["too_long"] += 1
                continue
            content = content_of(record)
            digest = hashlib.sha1(normalize_text(content).encode()).hexdigest()
            if digest in exact:
                counts["exact_duplicates"] += 1
                continue
            exact.add(digest)
            if near is not None and not near.add_if_new(content):
                counts["near_duplicates"] += 1
                continue
            counts["text" if "text" in record else "chat"] += 1
            row = {"text": text, "segments": segments, "source": item.where}
            if "messages" in record:  # mlx-lm reads these (with --mask-prompt) directly
                row["messages"] = record["messages"]
            rows.append(row)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    valid_ids = set(order[:held_out_count(len(rows), val_fraction)])
    train = [rows[i] for i in order if i not in valid_ids]
    valid = [rows[i] for i in order if i in valid_ids]
    counts["train"], counts["valid"] = len(train), len(valid)
    return Prepared(train, valid, counts, problems, fmt.name)


def write_prepared(prepared: Prepared, out: Path, fmt: ChatFormat, inputs: list[str]) -> None:
    if not prepared.train:
        raise ToolError("no usable examples left after filtering: nothing written")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "train.jsonl", prepared.train)
    write_jsonl_atomic(out / "valid.jsonl", prepared.valid)
    write_json_atomic(out / "meta.json", {
        "format": fmt.name, "chat_template": fmt.template, "bos_token": fmt.bos_token,
        "eos_token": fmt.eos_token, "inputs": [str(p) for p in inputs],
        "counts": dict(prepared.counts), "bad_lines": prepared.problems[:100],
    })


def load_prepared(directory: str | Path) -> tuple[list[dict], list[dict], dict]:
    """(train rows, valid rows, meta) of a prepare-data output directory."""
    from hublabio_tools.common import read_jsonl_strict

    directory = Path(directory)
    if not (directory / "train.jsonl").exists():
        raise ToolError(f"{directory}: no train.jsonl (run hublab-tools prepare-data first)")
    train = read_jsonl_strict(directory / "train.jsonl")
    valid_path = directory / "valid.jsonl"
    valid = read_jsonl_strict(valid_path) if valid_path.exists() else []
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for where, rows in (("train.jsonl", train), ("valid.jsonl", valid)):
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or not isinstance(row.get("segments"), list):
                raise ToolError(f"{directory / where}:{number}: not a prepare-data row "
                                '(expected {"text", "segments"})')
    return train, valid, meta


def load_rows(data: str, fmt, *, hint: str = "", force_format: bool = False
              ) -> tuple[list[dict], list[dict]]:
    """Training rows from `data`: a prepare-data output directory as it is, or a raw jsonl file
    prepared on the fly in chat format `fmt` (bad lines skipped with a note). `hint` names the
    model whose template a prepared directory must match: a mismatch (prepare-data without
    --model, then a finetune of SmolLM2) is a ToolError unless `force_format`, since the model
    would learn turns in a format it never sees on the device."""
    path = Path(data)
    if path.is_dir():
        train, valid, meta = load_prepared(path)
        if hint and meta.get("chat_template") and meta["chat_template"] != fmt.template:
            message = (f"--data {path} was prepared in chat format {meta.get('format')!r}, not "
                       f"in {hint}'s own chat template ({fmt.name}); the model would learn a "
                       f"format the device never sends it. Re-run prepare-data --model {hint}, "
                       "or pass a raw jsonl as --data (it is prepared in the base's format)")
            if not force_format:
                raise ToolError(message + ", or --force-format to train on it anyway")
            print(f"warning: {message}", file=sys.stderr)
        return train, valid
    if not path.exists():
        raise ToolError(f"--data {data}: no such file or directory")
    prepared = prepare([str(path)], fmt, quiet=True)
    if prepared.problems:
        print(f"note: {len(prepared.problems)} bad line(s) skipped, first: {prepared.problems[0]}",
              file=sys.stderr)
    return prepared.train, prepared.valid


def summary_table(counts: Counter) -> str:
    keys = ["read", "bad", "too_short", "too_long", "exact_duplicates", "near_duplicates",
            "chat", "text", "train", "valid"]
    return "\n".join(f"  {key:<17} {counts.get(key, 0)}" for key in keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools prepare-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from hublabio_tools import docs_data

    from hublabio_tools import router_docs

    parser.epilog = ("Documentation (--docs):\n" + docs_data.__doc__.split("\n", 1)[1]
                     + "\nRouter rows (--docs --router-domain):\n"
                     + router_docs.__doc__.split("\n", 1)[1])
    parser.add_argument("inputs", nargs="+", help="input jsonl file(s); with --docs: pages or "
                        "folders of pages")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", help="local HF dir or .gguf whose chat template to use "
                        "(default: the seed <|user|>...<|end|> format)")
    parser.add_argument("--near-dup", type=float, default=0.85,
                        help="Jaccard threshold for near-duplicates (0 or 1 disables; default 0.85)")
    parser.add_argument("--min-chars", type=int, default=1, help="drop shorter examples")
    parser.add_argument("--max-chars", type=int, default=0, help="drop longer examples (0: no limit)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation share (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--strict", action="store_true", help="fail at the first bad line")
    docs = parser.add_argument_group("documentation (--docs)")
    docs.add_argument("--docs", action="store_true",
                      help="INPUTS are HTML or man pages (files or folders): write chunks and "
                           "question-answer pairs, split by page")
    docs.add_argument("--glob", action="append", default=[],
                      help="only pages whose path under INPUT matches (repeatable)")
    docs.add_argument("--exclude", action="append", default=[],
                      help="drop pages whose path under INPUT matches (repeatable)")
    docs.add_argument("--chunk-chars", type=int, default=1200, help="longest chunk (1200)")
    docs.add_argument("--heldout-pages", type=float, default=0.1,
                      help="share of the pages held out for benchmarks (0.1)")
    docs.add_argument("--max-rows", type=int, default=0,
                      help="keep a seeded sample of this many training rows (0: all)")
    docs.add_argument("--router-domain", metavar="DOMAIN",
                      help="write short router training rows labelled DOMAIN instead "
                           "(DIR/router_DOMAIN.jsonl, for train-router --extra)")
    return parser


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.docs:
        return _main_docs(args, argv)
    if args.glob or args.exclude or args.max_rows or args.router_domain:
        raise ToolError("--glob, --exclude, --max-rows and --router-domain apply to --docs only")
    if not 0 <= args.val_fraction < 1:
        raise ToolError("--val-fraction must be in [0, 1)")
    fmt = load_chat_format(args.model)
    prepared = prepare(args.inputs, fmt, near_dup=args.near_dup, min_chars=args.min_chars,
                       max_chars=args.max_chars, val_fraction=args.val_fraction, seed=args.seed,
                       strict=args.strict)
    out = Path(args.out)
    write_prepared(prepared, out, fmt, args.inputs)
    print(f"format: {fmt.name}\n{summary_table(prepared.counts)}")
    print(f"wrote {out / 'train.jsonl'} ({len(prepared.train)}), {out / 'valid.jsonl'} "
          f"({len(prepared.valid)}), {out / 'meta.json'}")
    return 0


def _main_docs(args, argv) -> int:
    from hublabio_tools.docs_data import prepare_docs

    if args.max_rows < 0:
        raise ToolError(f"--max-rows {args.max_rows}: expected 0 (all) or more")
    out = Path(args.out)
    if args.router_domain is not None:
        return _main_router_rows(args, argv, out)
    meta = prepare_docs(args.inputs, out, globs=args.glob, excludes=args.exclude,
                        chunk_chars=args.chunk_chars,
                        heldout_pages=args.heldout_pages, max_rows=args.max_rows,
                        seed=args.seed, argv=list(sys.argv[1:] if argv is None else argv))
    c = meta["counts"]
    print(f"{meta['pages']} pages ({meta['heldout_page_count']} held out): {c['train']} training "
          f"rows ({c['train_qa']} question-answer pairs; {c['train_available']} before "
          f"--max-rows), {c['heldout']} held-out rows ({c['heldout_qa']} pairs)")
    print(f"wrote {out / 'docs_train.jsonl'} (sha256 {meta['train_sha256'][:16]}), "
          f"{out / 'docs_heldout.jsonl'}, {out / 'docs_meta.json'}")
    return 0


def _main_router_rows(args, argv, out: Path) -> int:
    from hublabio_tools.router_docs import prepare_router_rows

    meta = prepare_router_rows(args.inputs, args.router_domain, out, globs=args.glob,
                               excludes=args.exclude, max_rows=args.max_rows, seed=args.seed,
                               argv=list(sys.argv[1:] if argv is None else argv))
    print(f"{meta['pages_read']} of {meta['pages_found']} pages gave rows: {meta['rows']} rows "
          f"labelled {meta['domain']} ({meta['rows_available']} before --max-rows)")
    print(f"wrote {out / ('router_' + meta['domain'] + '.jsonl')} (sha256 "
          f"{meta['sha256'][:16]}), {out / ('router_' + meta['domain'] + '_meta.json')}")
    return 0
