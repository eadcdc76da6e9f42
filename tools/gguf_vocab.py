"""Tokenizer of an HF checkpoint -> GGUF vocabulary keys (`tokenizer.ggml.*`).

Three inputs are understood, chosen in this order (SentencePiece first where the architecture
prefers it):
  * `tokenizer.model` (SentencePiece)                   -> `tokenizer.ggml.model = "llama"`
  * `tokenizer.json` byte-level BPE (GPT-2 style)        -> `"gpt2"` + an explicit `tokenizer.ggml.pre`
  * `tokenizer.json` BPE with byte fallback (SentencePiece converted by transformers) -> `"llama"`

The BPE pre-tokenizer is recognised from the *structure* of tokenizer.json (its regex / steps),
not from a hash of known models, so a tokenizer trained from scratch with the `tokenizers`
library maps to the llama.cpp pre-tokenizer that splits text the same way. Only plain file
parsing here: no transformers import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from hublabio_tools.gguf_arch import ArchRule, ConvertError

# regexes as they appear in tokenizer.json, and the llama.cpp pre-tokenizer that implements them
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# llama.cpp pre-tokenizer names (llama-vocab.cpp) this module can declare
KNOWN_PRE = ("gpt-2", "smollm", "llama-bpe", "qwen2")


@dataclass
class VocabSummary:
    model: str  # "llama" | "gpt2"
    pre: str
    n_tokens: int
    source: str  # file the vocabulary came from


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON (line {e.lineno}): {e.msg}") from None


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _steps(p)]
    return [pre]


def _describe(steps: list[dict[str, Any]]) -> str:
    parts = []
    for s in steps:
        extra = {k: v for k, v in s.items() if k != "type"}
        parts.append(f"{s.get('type')}{json.dumps(extra, ensure_ascii=False)}")
    return " + ".join(parts) or "none"


def detect_bpe_pre(tok: dict[str, Any], where: str) -> str:
    """The llama.cpp pre-tokenizer equivalent to tokenizer.json's normalizer + pre_tokenizer."""
    norm = tok.get("normalizer")
    steps = _steps(tok.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    found: str | None = None
    if kinds and kinds[-1] == "ByteLevel":
        last = steps[-1]
        if last.get("add_prefix_space", False):
            raise ConvertError(
                f"{where}: pre_tokenizer ByteLevel has add_prefix_space=true (a space is prepended "
                f"to the text); llama.cpp's BPE tokenizer has no such step, so tokenization would "
                f"differ. Train/save the tokenizer with ByteLevel(add_prefix_space=False)")
        regex = last.get("use_regex", True)
        head = steps[:-1]
        if regex and not head:
            found = "gpt-2"
        elif (regex and len(head) == 1 and head[0].get("type") == "Digits"
              and head[0].get("individual_digits")):
            found = "smollm"
        elif not regex and len(head) == 1 and head[0].get("type") == "Split":
            pattern = (head[0].get("pattern") or {}).get("Regex")
            if head[0].get("behavior") == "Isolated" and not head[0].get("invert"):
                found = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2", _GPT2_RE: "gpt-2"}.get(pattern)
    if found is not None and norm is not None and not (found == "qwen2" and norm.get("type") == "NFC"):
        raise ConvertError(f"{where}: normalizer {norm.get('type')!r} is not applied by llama.cpp "
                           f"for pre-tokenizer {found!r}")
    if found is None:
        raise ConvertError(
            f"{where}: pre_tokenizer {_describe(steps)} does not match a llama.cpp pre-tokenizer "
            f"this converter knows ({', '.join(KNOWN_PRE)}); pass --pre NAME to declare one "
            f"(tokenization may then differ from transformers)")
    return found


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>") \
        or (text.startswith("<unused") and text.endswith(">"))


def _added_tokens(tok: dict[str, Any] | None, cfg_tok: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json added_tokens and tokenizer_config.json."""
    out: dict[int, tuple[str, bool]] = {}
    for t in (tok or {}).get("added_tokens", []):
        out[int(t["id"])] = (t["content"], bool(t.get("special")))
    for sid, t in (cfg_tok.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(sid), (t["content"], bool(t.get("special"))))
    return out


def _spm_from_model(path: Path, n_vocab: int, added: dict[int, tuple[str, bool]]):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() > n_vocab:
        raise ConvertError(f"{path}: {sp.vocab_size()} pieces but the model has only {n_vocab} "
                           f"embedding rows (config.json vocab_size)")
    tokens, scores, types = _padded(n_vocab)
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL
                    if sp.IsControl(i) else gguf.TokenType.UNUSED if sp.IsUnused(i)
                    else gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL)
    _apply_added(tokens, scores, types, added, spm=True)
    return tokens, scores, types


def _spm_from_json(tok: dict[str, Any], n_vocab: int, added: dict[int, tuple[str, bool]], where: str):
    """SentencePiece-style BPE (byte fallback) in tokenizer.json: score = -(rank of the merge
    that produces the token), so llama.cpp's score-ordered merging follows the merge list."""
    model = tok["model"]
    vocab: dict[str, int] = model["vocab"]
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ConvertError(f"{where}: token id {max(vocab.values())} >= embedding rows {n_vocab}")
    tokens, scores, types = _padded(n_vocab)
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    for text, i in vocab.items():
        tokens[i] = text.encode("utf-8")
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i], scores[i] = gguf.TokenType.BYTE, 0.0
        else:
            types[i] = gguf.TokenType.UNKNOWN if text == unk else gguf.TokenType.NORMAL
            scores[i] = -float(rank[text]) if text in rank else (0.0 if len(text) == 1 else -1e9)
    _apply_added(tokens, scores, types, added, spm=True)
    return tokens, scores, types


def _padded(n: int):
    return ([f"[PAD{i}]".encode() for i in range(n)], [-1000.0] * n, [gguf.TokenType.UNUSED] * n)


def _apply_added(tokens, scores, types, added, spm: bool) -> None:
    for i, (text, special) in added.items():
        if i >= len(tokens):
            raise ConvertError(f"added token {text!r} has id {i} >= embedding rows {len(tokens)}")
        if special or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            types[i] = gguf.TokenType.USER_DEFINED
            if spm:
                text = text.replace("\u2581", " ")
        tokens[i] = text.encode("utf-8")
        scores[i] = -1000.0 if spm else 0.0


def _post_processor_adds(tok: dict[str, Any] | None) -> tuple[bool, bool] | None:
    if not tok or not tok.get("post_processor"):
        return None
    pp = tok["post_processor"]
    for p in pp.get("processors", [pp]):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = bool(single) and "SpecialToken" in single[0]
            last = len(single) > 1 and "SpecialToken" in single[-1]
            return first, last
    return None


def add_vocab(w: gguf.GGUFWriter, hf_dir: Path, rule: ArchRule, n_vocab: int,
              pre_override: str | None = None) -> VocabSummary:
    """Write the tokenizer of `hf_dir` into `w`; `n_vocab` = rows of the embedding matrix."""
    sp_path, tj_path = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg_tok = _read_json(cfg_path) if cfg_path.is_file() else {}
    tok = _read_json(tj_path) if tj_path.is_file() else None
    added = _added_tokens(tok, cfg_tok)
    tj_model = (tok or {}).get("model") or {}
    bytelevel_bpe = tj_model.get("type") == "BPE" and not tj_model.get("byte_fallback", False)
    if sp_path.is_file() and (rule.prefer_spm or tok is None or not bytelevel_bpe):
        model, pre, source = "llama", "default", sp_path
        tokens, scores, types = _spm_from_model(sp_path, n_vocab, added)
    elif tok is not None and tj_model.get("type") == "BPE" and bytelevel_bpe:
        model, source = "gpt2", tj_path
        pre = pre_override or detect_bpe_pre(tok, str(tj_path))
        if pre_override and pre_override not in KNOWN_PRE:
            raise ConvertError(f"--pre {pre_override!r}: choose one of {', '.join(KNOWN_PRE)}")
        vocab: dict[str, int] = tj_model["vocab"]
        if max(vocab.values(), default=-1) >= n_vocab:
            raise ConvertError(f"{tj_path}: token id {max(vocab.values())} >= embedding rows {n_vocab}")
        tokens, scores, types = _padded(n_vocab)
        for text, i in vocab.items():
            tokens[i], types[i] = text.encode("utf-8"), gguf.TokenType.NORMAL
        _apply_added(tokens, scores, types, added, spm=False)
        scores = None
    elif tok is not None and tj_model.get("type") == "BPE":
        model, pre, source = "llama", "default", tj_path
        tokens, scores, types = _spm_from_json(tok, n_vocab, added, str(tj_path))
    elif tok is not None:
        raise ConvertError(f"{tj_path}: model type {tj_model.get('type')!r} is not supported "
                           f"(BPE or a tokenizer.model SentencePiece file are)")
    else:
        raise ConvertError(f"{hf_dir}: no tokenizer found (tokenizer.json or tokenizer.model)")

    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    if rule.add_space_prefix is not None and model == "llama":
        w.add_add_space_prefix(rule.add_space_prefix)

    special = gguf.SpecialVocab(hf_dir, load_merges=(model == "gpt2"), n_vocab=n_vocab)
    adds = dict(special.add_special_token)
    special.add_special_token = {}
    special.add_to_gguf(w, quiet=True)
    # add_bos/add_eos are always explicit: what transformers does is what llama.cpp must do
    pp = _post_processor_adds(tok)
    for kind, idx in (("bos", 0), ("eos", 1)):
        if isinstance(cfg_tok.get(f"add_{kind}_token"), bool):
            value = cfg_tok[f"add_{kind}_token"]
        elif pp is not None:
            value = pp[idx]
        elif kind in adds:
            value = adds[kind]
        else:
            value = model == "llama" and kind == "bos" and tok is None
        getattr(w, f"add_add_{kind}_token")(bool(value))
    return VocabSummary(model, pre, n_vocab, str(source))
