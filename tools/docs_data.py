"""prepare-data --docs: documentation pages (HTML, man pages) -> expert training rows.

usage: hublab-tools prepare-data --docs PATH [PATH ...] --out DIR [--glob PATTERN ...]
           [--exclude PATTERN ...]
           [--chunk-chars 1200] [--heldout-pages 0.1] [--max-rows N] [--seed 0]

PATH is a page or a folder searched recursively for pages: `*.html` / `*.htm`, man pages
(`name.N`, `name.N.gz`, N a section digit), and fortune files (entries between `%` lines,
recognised by the `name.dat` index strfile writes beside them; each entry is a paragraph). `--glob` keeps only files whose path relative to
their PATH matches one of the patterns (fnmatch, e.g. `tutorial/*.html`; `*` crosses `/`), and
`--exclude` drops those matching one of its patterns. Drop pages that repeat others (mdBook's
`print.html` holds the whole book): a held-out page must not be in the training pages too.

Every page becomes blocks (headings, paragraphs, list items, code). From them:
- continued-pretraining chunks `{"text"}`: the page title, the section heading, then the
  section's blocks (code fenced), sections of one page packed up to --chunk-chars characters,
  a long section split at block (then line) boundaries; chunks under 200 characters are
  dropped (navigation stubs);
- question-answer pairs `{"prompt", "response"}` where the page has them: a heading that is a
  question (ends with "?", as in FAQ pages) and the text under it, up to the next heading of
  its level or above. Such sections become pairs only, not chunks as well.

Pages are split, never rows: --heldout-pages of the pages (shuffled with --seed, at least one
of two or more) go to DIR/docs_heldout.jsonl, the rest to DIR/docs_train.jsonl, so a benchmark
on the held-out file measures text the model was not trained on. Pages with question-answer
pairs and pages without are split separately, so that both kinds are held out. --max-rows keeps
a seeded sample of that many training rows (pairs first), to fit a CPU training budget. Each
row carries "source" (page#anchor) and "kind" ("chunk" or "qa"). DIR/docs_meta.json records
the arguments, every page with its sha256, split and row counts, and the sha256 of both
outputs. `hublab-tools train-expert DOMAIN --data DIR/docs_train.jsonl` trains on it (the
domain's system prompt is added to the pairs; chunks are trained on every token).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import random
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from hublabio.fsutil import file_sha256
from hublabio_tools.common import (
    ToolError, held_out_count, write_json_atomic, write_jsonl_atomic,
)

MIN_CHUNK_CHARS = 200
MIN_ANSWER_CHARS = 40
MAN_PAGE = re.compile(r".+\.[1-9][a-z]*(\.gz)?$")


@dataclass
class Block:
    kind: str                       # "heading", "text" or "code"
    text: str
    level: int = 0                  # headings: 1 (title) .. 6
    anchor: str = ""


@dataclass
class Page:
    path: Path
    title: str
    blocks: list[Block]


# ----------------------------------------------------------------------------- HTML
_BLOCK_TAGS = {"p", "div", "li", "dd", "dt", "td", "th", "tr", "table", "ul", "ol", "dl",
               "section", "article", "blockquote", "br", "hr", "main", "figure", "figcaption",
               "body", "details", "summary"}
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_SKIP_TAGS = {"script", "style", "nav", "header", "footer", "aside", "form", "button",
              "noscript", "svg", "head", "title", "select", "template"}
_SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "headerlink", "sidebar", "toc",
                 "toctree-wrapper", "breadcrumb", "breadcrumbs", "search", "navigation", "nav",
                 "menu", "menu-bar", "nav-wrapper", "nav-chapters", "rustdoc-breadcrumbs",
                 "copyright", "skip-link", "src", "anchor", "srclink"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "source"}


class _HTMLBlocks(HTMLParser):
    """Collects blocks; what lies inside <main> (or role="main") when the page has one."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []   # (tag, skipped, is main)
        self.blocks: list[tuple[bool, Block]] = []      # (inside main, block)
        self.buf: list[str] = []
        self.heading: tuple[int, str] | None = None
        self.pre = 0
        self.anchor = ""
        self.title: list[str] = []
        self.in_title = False
        self.saw_main = False

    def _skipped(self) -> bool:
        return any(skip for _, skip, _ in self.stack)

    def _in_main(self) -> bool:
        return any(main for _, _, main in self.stack)

    def flush(self) -> None:
        raw = "".join(self.buf)
        self.buf = []
        if self.pre:
            return
        text = re.sub(r"\s+", " ", raw).strip()
        if not text:
            return
        if self.heading is not None:
            level, anchor = self.heading
            block = Block("heading", text.rstrip("¶#").strip(), level, anchor)
        else:
            block = Block("text", text)
        self.blocks.append((self._in_main(), block))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "title":
            self.in_title = True
        classes = set((attrs.get("class") or "").lower().split())
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) \
            or attrs.get("role") in ("navigation", "search", "banner", "contentinfo") \
            or attrs.get("aria-hidden") == "true"
        main = tag == "main" or attrs.get("role") == "main"
        if main:
            self.saw_main = True
        if attrs.get("id"):
            self.anchor = attrs["id"]
        if tag in _BLOCK_TAGS or tag in _HEADINGS or tag == "pre":
            self.flush()
        if tag in _HEADINGS and not self._skipped():
            self.heading = (_HEADINGS[tag], attrs.get("id") or self.anchor)
        if tag == "pre":
            self.pre += 1
        if tag not in _VOID:
            self.stack.append((tag, skip, main))

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if not any(t == tag for t, _, _ in self.stack):
            return
        if tag == "pre" and self.pre:
            code = "".join(self.buf).strip("\n")
            self.buf = []
            self.pre -= 1
            if code.strip() and not self._skipped():
                self.blocks.append((self._in_main(), Block("code", code)))
        elif tag in _BLOCK_TAGS or tag in _HEADINGS:
            self.flush()
            if tag in _HEADINGS:
                self.heading = None
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self._skipped():
            self.buf.append(data)


def html_page(path: Path, text: str) -> Page:
    parser = _HTMLBlocks()
    parser.feed(text)
    parser.close()
    parser.flush()
    blocks = [b for main, b in parser.blocks if main or not parser.saw_main]
    title = next((b.text for b in blocks if b.kind == "heading"), "") \
        or re.sub(r"\s+", " ", "".join(parser.title)).strip() or path.stem
    return Page(path, title, blocks)


# ----------------------------------------------------------------------------- man pages
_ESCAPES = {r"\-": "-", r"\(em": "\u2014", r"\(en": "\u2013", r"\(aq": "'", r"\(dq": '"',
            r"\(lq": '"', r"\(rq": '"', r"\*(lq": '"', r"\*(rq": '"', r"\(bu": "\u2022",
            r"\e": "\\", r"\~": " ", r"\ ": " ", r"\0": " ", r"\&": "", r"\|": "", r"\^": "",
            r"\c": "", r"\,": "", r"\/": "", r"\(co": "(c)", r"\(rg": "(R)", r"\(mu": "x",
            r"\(>=": ">=", r"\(<=": "<=", r"\(ti": "~", r"\(ha": "^", r"\(ga": "`",
            r"\(cq": "'", r"\(oq": "'"}
_ESCAPE = re.compile("|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*\[[^\]]*\]|\\\*\(..|\\\*.|\\\(..|"
                   r"\\\[[^\]]*\]|\\[kn]\S|\\[hvwo]'[^']*'")
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}


def man_text(line: str) -> str:
    """One troff text line without font changes and with the common escapes resolved."""
    line = _ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], line)
    return _FONT.sub("", line)


def _macro_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_page(path: Path, text: str) -> Page:
    title, blocks, para, code, fill = path.name.split(".")[0], [], [], [], True

    def end_para():
        if para:
            blocks.append(Block("text", re.sub(r"\s+", " ", " ".join(para)).strip()))
            para.clear()

    for raw in text.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '.\\}')) or raw.strip() in (".", "'"):
            continue
        if raw.startswith((".", "'")) and len(raw) > 1:
            name, _, rest = raw[1:].strip().partition(" ")
            args = _macro_args(rest)
            if name == "TH":
                title = args[0].lower() if args else title
                if len(args) > 1:
                    title = f"{title}({args[1]})"
            elif name in ("SH", "SS"):
                end_para()
                blocks.append(Block("heading", man_text(" ".join(args)).strip().capitalize(),
                                    2 if name == "SH" else 3))
            elif name in ("PP", "LP", "P", "sp", "br", "TP", "HP", "RS", "RE", "in"):
                end_para()
            elif name == "IP":
                end_para()
                if args and args[0] not in ("\\(bu", "\\(em", "-", "*"):
                    para.append(man_text(args[0]))
            elif name in ("nf", "EX"):
                end_para()
                fill = False
            elif name in ("fi", "EE") and not fill:
                if code:
                    blocks.append(Block("code", "\n".join(code)))
                code.clear()
                fill = True
            elif name in ("B", "I", "SM", "SB", "UR", "MT", "OP"):
                (para if fill else code).append(man_text(" ".join(args)))
            elif name in _ALTERNATING:
                (para if fill else code).append(man_text("".join(args)))
            elif name == "so":
                return Page(path, title, [])      # a link to another page
            continue
        line = man_text(raw)
        if fill:
            if line.strip():
                para.append(line.strip())
            else:
                end_para()
        else:
            code.append(line.replace("\t", "    ").rstrip())
    end_para()
    if code:
        blocks.append(Block("code", "\n".join(code)))
    return Page(path, title, blocks)


def fortune_page(path: Path, text: str) -> Page:
    """A fortune file: each entry between `%` lines is one text block."""
    entries = re.split(r"^%[ \t]*$", text, flags=re.M)
    return Page(path, path.name, [Block("text", " ".join(e.split())) for e in entries if e.strip()])


def is_fortune_file(path: Path) -> bool:
    return not path.suffix and path.with_name(path.name + ".dat").is_file()


def read_page(path: Path) -> tuple[Page, str]:
    """(page, sha256 of the file's bytes); ToolError names a file that cannot be read."""
    try:
        data = path.read_bytes()
        raw = gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ToolError(f"{path}: cannot read ({err})") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix.lower() in (".html", ".htm"):
        page = html_page(path, text)
    elif is_fortune_file(path):
        page = fortune_page(path, text)
    else:
        page = man_page(path, text)
    return page, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- rows
def _render(block: Block) -> str:
    return f"```\n{block.text}\n```" if block.kind == "code" else block.text


def _split_long(text: str, limit: int) -> list[str]:
    """A block longer than `limit`: cut at line, then sentence, then word boundaries."""
    if len(text) <= limit:
        return [text]
    for sep in ("\n", ". ", " "):
        parts, cur = [], ""
        for piece in text.split(sep):
            cand = f"{cur}{sep}{piece}" if cur else piece
            if len(cand) > limit and cur:
                parts.append(cur)
                cur = piece
            else:
                cur = cand
        parts.append(cur)
        if all(len(p) <= limit for p in parts):
            return parts
    return [text[i:i + limit] for i in range(0, len(text), limit)]


def _is_question(heading: str) -> bool:
    return heading.rstrip().endswith("?") and len(heading.split()) >= 3


def clean_heading(text: str) -> str:
    return re.sub(r"^(\d+(\.\d+)*\.?|[A-Z]\.\d+(\.\d+)*)\s+", "", text).strip()


@dataclass
class Section:
    heading: Block | None
    body: list[Block] = field(default_factory=list)


def page_sections(page: Page) -> list[Section]:
    out = [Section(None)]
    for b in page.blocks:
        if b.kind == "heading":
            out.append(Section(b))
        else:
            out[-1].body.append(b)
    return out


def page_rows(page: Page, source: str, chunk_chars: int = 1200) -> list[dict]:
    """The page's chunks and question-answer pairs (see the module docstring)."""
    rows: list[dict] = []
    sections = page_sections(page)
    qa_owned: set[int] = set()
    for i, sec in enumerate(sections):
        if sec.heading is None or not _is_question(clean_heading(sec.heading.text)):
            continue
        body = list(sec.body)
        qa_owned.add(i)
        for j in range(i + 1, len(sections)):     # deeper headings belong to this answer
            nxt = sections[j].heading
            if nxt is None or nxt.level <= sec.heading.level:
                break
            body += [nxt] + sections[j].body
            qa_owned.add(j)
        answer = ""
        for b in body:
            piece = _render(b)
            if answer and len(answer) + len(piece) + 2 > chunk_chars:
                break
            answer = f"{answer}\n\n{piece}" if answer else piece[:chunk_chars]
        if len(answer) >= MIN_ANSWER_CHARS:
            rows.append({"prompt": clean_heading(sec.heading.text), "response": answer,
                         "source": f"{source}#{sec.heading.anchor}", "kind": "qa"})
    head = f"# {page.title}\n\n"
    chunk, anchor = "", ""

    def emit():
        if len(chunk) >= MIN_CHUNK_CHARS:
            rows.append({"text": chunk.strip(), "source": f"{source}#{anchor}", "kind": "chunk"})

    for i, sec in enumerate(sections):
        if i in qa_owned:
            continue
        title = clean_heading(sec.heading.text) if sec.heading else ""
        pieces = [p for b in sec.body for p in _split_long(_render(b), chunk_chars - 200)]
        if not pieces:
            continue
        intro = f"## {title}\n\n" if title and title != page.title else ""
        for n, piece in enumerate(pieces):
            add = (intro if n == 0 else "") + piece
            if chunk and len(chunk) + len(add) + 2 > chunk_chars:
                emit()
                chunk = ""
            if not chunk:
                chunk, anchor = head + (intro if n and intro else ""), \
                    sec.heading.anchor if sec.heading else ""
            chunk += add + "\n\n"
    emit()
    return rows


# ----------------------------------------------------------------------------- files
def is_page(path: Path) -> bool:
    return path.suffix.lower() in (".html", ".htm") or bool(MAN_PAGE.match(path.name)) \
        or is_fortune_file(path)


def find_pages(paths: list[str], globs: list[str], excludes: list[str] = ()
               ) -> list[tuple[Path, str]]:
    """(file, name relative to its PATH argument), sorted; errors name a missing PATH or one
    with no page."""
    found: list[tuple[Path, str]] = []
    for arg in paths:
        root = Path(arg)
        if root.is_file():
            found.append((root, root.name))
            continue
        if not root.is_dir():
            raise ToolError(f"{arg}: no such file or folder")
        here = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
                if p.is_file() and is_page(p)]
        if globs:
            here = [(p, rel) for p, rel in here if any(fnmatch.fnmatch(rel, g) for g in globs)]
        here = [(p, rel) for p, rel in here if not any(fnmatch.fnmatch(rel, g) for g in excludes)]
        if not here:
            matching = f" matching {', '.join(globs)}" if globs else ""
            raise ToolError(f"{arg}: no HTML, man pages or fortune files{matching}")
        found += [(p, f"{root.name}/{rel}") for p, rel in here]
    return found


def prepare_docs(paths: list[str], out: Path, *, globs: list[str] = (), excludes: list[str] = (),
                 chunk_chars: int = 1200,
                 heldout_pages: float = 0.1, max_rows: int = 0, seed: int = 0,
                 argv: list[str] | None = None) -> dict:
    """Read, split by page, write DIR/docs_train.jsonl, docs_heldout.jsonl, docs_meta.json."""
    if chunk_chars < 400:
        raise ToolError(f"--chunk-chars {chunk_chars}: too small (at least 400)")
    if not 0 <= heldout_pages < 1:
        raise ToolError(f"--heldout-pages {heldout_pages}: expected a number in [0, 1)")
    pages = find_pages(paths, list(globs), list(excludes))
    read = [(path, name, *read_page(path)) for path, name in pages]
    rows_of = [page_rows(page, name, chunk_chars) for _, name, page, _ in read]
    with_qa = [i for i, rows in enumerate(rows_of) if any(r["kind"] == "qa" for r in rows)]
    held = _held_out(with_qa, heldout_pages, seed) | _held_out(
        [i for i in range(len(read)) if i not in set(with_qa)], heldout_pages, seed)
    train, heldout, sources = [], [], []
    for i, ((path, name, _, digest), rows) in enumerate(zip(read, rows_of)):
        (heldout if i in held else train).extend(rows)
        sources.append({"path": str(path), "source": name, "sha256": digest,
                        "split": "heldout" if i in held else "train",
                        "chunks": sum(r["kind"] == "chunk" for r in rows),
                        "qa": sum(r["kind"] == "qa" for r in rows)})
    if not train:
        raise ToolError("no training rows: the pages gave no chunk of at least "
                        f"{MIN_CHUNK_CHARS} characters and no question-answer pair")
    available = len(train)
    if max_rows and len(train) > max_rows:
        rng = random.Random(seed)
        qa = [r for r in train if r["kind"] == "qa"]
        chunks = [r for r in train if r["kind"] == "chunk"]
        rng.shuffle(qa)
        rng.shuffle(chunks)
        keep = (qa + chunks)[:max_rows]
        kept_ids = {id(r) for r in keep}
        train = [r for r in train if id(r) in kept_ids]   # page order, reproducibly
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "docs_train.jsonl", train)
    write_jsonl_atomic(out / "docs_heldout.jsonl", heldout)
    meta = {"by": "hublab-tools prepare-data --docs", "argv": argv, "seed": seed,
            "chunk_chars": chunk_chars, "heldout_pages": heldout_pages, "max_rows": max_rows,
            "globs": list(globs), "excludes": list(excludes), "pages": len(read), "heldout_page_count": len(held),
            "counts": {"train": len(train), "train_available": available,
                       "train_qa": sum(r["kind"] == "qa" for r in train),
                       "heldout": len(heldout),
                       "heldout_qa": sum(r["kind"] == "qa" for r in heldout)},
            "train_sha256": file_sha256(out / "docs_train.jsonl"),
            "heldout_sha256": file_sha256(out / "docs_heldout.jsonl"),
            "sources": sources}
    write_json_atomic(out / "docs_meta.json", meta)
    return meta


def _held_out(pages: list[int], share: float, seed: int) -> set[int]:
    """held_out_count(len(pages), share) of `pages`, drawn with `seed`."""
    order = list(pages)
    random.Random(seed).shuffle(order)
    return set(order[:held_out_count(len(order), share)])
