"""Helpers shared by the training verbs: jsonl reading with line numbers, the seed chat format,
recipes, seeding, device/precision detection, progress lines and atomic jsonl output.

Nothing here imports torch at module level: `prepare-data` and `--help` stay torch-free.
"""

from __future__ import annotations

import functools
import contextlib
import json
import os
import random
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from hublabio.errors import HublabError
from hublabio.fsutil import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
DATA_DIR = PACKAGE_DIR / "data"
DISTRIBUTED_DIR = PACKAGE_DIR / "distributed"

# The seed's chat format (`<|user|>\n...<|end|>\n<|assistant|>\n...<|end|>`), written as a jinja
# chat template so that prepare-data, a trained tokenizer (tokenizer_config.json) and llama.cpp
# all render conversations the same way.
SEED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SEED_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


# Exit statuses, the same for every verb: a failure (bad input, a missing file, a refused
# operation: a ToolError) is 1; a usage error (argparse: unknown or malformed flags) is 2;
# an interrupt 130.
EXIT_FAILURE = 1
EXIT_USAGE = 2


class ToolError(HublabError):
    """The base of every hublab-tools error (ConvertError, DeployError, QuantizeError, ...):
    a user-facing message naming the file or option at fault; the verb exits with
    EXIT_FAILURE."""

    code = "tool"


@dataclass
class JsonlLine:
    path: str
    line: int
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def iter_jsonl(path: str | os.PathLike) -> Iterator[JsonlLine]:
    """Yield every non-blank line of a jsonl file with its 1-based line number; a line that is
    not valid JSON comes back with `.error` set instead of raising."""
    path = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ToolError(f"{path}: cannot read ({err.strerror})") from None
    with handle:
        for number, data in enumerate(handle, start=1):
            try:
                raw = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:  # the column counts characters, as an editor does
                column = len(data[:err.start].decode("utf-8", "replace")) + 1
                yield JsonlLine(path, number, error=f"not UTF-8 (byte 0x{data[err.start]:02x} "
                                                    f"at column {column})")
                continue
            if not raw.strip():
                continue
            try:
                yield JsonlLine(path, number, json.loads(raw))
            except json.JSONDecodeError as err:
                yield JsonlLine(path, number, error=f"invalid JSON ({err.msg} at column {err.colno})")


def read_jsonl_strict(path: str | os.PathLike) -> list[Any]:
    """All values of a jsonl file; the first bad line raises ToolError naming file:line."""
    values = []
    for item in iter_jsonl(path):
        if item.error:
            raise ToolError(f"{item.where}: {item.error}")
        values.append(item.value)
    return values


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write rows as jsonl through a temp file + rename; returns the row count."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def held_out_count(n: int, share: float) -> int:
    """How many of n items a seeded split holds out: round(share * n), but at least one and
    never all of them when share > 0 and there are two or more."""
    count = round(n * share) if share > 0 else 0
    if share > 0 and n >= 2:
        count = min(max(count, 1), n - 1)
    return count


def load_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as err:
        raise ToolError(f"{path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ToolError(f"{path}: invalid TOML ({err})") from None


def recipe_path(name_or_path: str) -> Path:
    """`hublabio-tiny` -> tools/recipes/hublabio-tiny.toml; an existing path is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.exists():
        return candidate
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise ToolError(f"unknown recipe {name_or_path!r}: give a .toml path or one of: {names}")


RECIPE_MODEL_KEYS = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "max_position_embeddings": int,
    "rope_theta": float, "rms_norm_eps": float, "tie_word_embeddings": bool,
}
RECIPE_TRAIN_KEYS = {
    "seq_len": int, "micro_batch": int, "grad_accum": int, "lr": float, "min_lr_ratio": float,
    "warmup_steps": int, "weight_decay": float, "max_steps": int, "eval_every": int,
    "save_every": int, "grad_clip": float,
}


def load_recipe(name_or_path: str) -> dict:
    """A recipe TOML: [model] LlamaConfig sizes, [train] defaults. Unknown or mistyped keys are
    errors that name the file and key."""
    path = recipe_path(name_or_path)
    data = load_toml(path)
    for section, schema in (("model", RECIPE_MODEL_KEYS), ("train", RECIPE_TRAIN_KEYS)):
        table = data.get(section)
        if not isinstance(table, dict):
            raise ToolError(f"{path}: missing [{section}] table")
        for key, value in table.items():
            if key not in schema:
                raise ToolError(f"{path}: [{section}] {key}: unknown key")
            kind = schema[key]
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ToolError(f"{path}: [{section}] {key}: expected {kind.__name__}, got {value!r}")
    model = data["model"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in model:
            raise ToolError(f"{path}: [model] {key}: required")
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ToolError(f"{path}: [model] hidden_size must be a multiple of num_attention_heads")
    kv = model.get("num_key_value_heads", model["num_attention_heads"])
    if model["num_attention_heads"] % kv:
        raise ToolError(f"{path}: [model] num_attention_heads must be a multiple of num_key_value_heads")
    data["name"] = data.get("name", path.stem)
    data["path"] = str(path)
    return data


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (when imported) torch on every device."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a runtime dependency
        pass
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def pick_precision(requested: str = "auto") -> str:
    """accelerate's mixed_precision value: 'bf16' / 'fp16' on a GPU that has it, 'no' (fp32) on
    CPU unless asked. `requested` is auto|fp32|bf16|fp16."""
    import torch

    if requested == "fp32":
        return "no"
    if requested in ("bf16", "fp16"):
        if requested == "fp16" and not torch.cuda.is_available():
            raise ToolError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return requested
    if requested != "auto":
        raise ToolError(f"--precision {requested!r}: expected auto, fp32, bf16 or fp16")
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Progress:
    """A progress line on stderr at most every `every_s` seconds (and at the end)."""

    def __init__(self, total: int, label: str, every_s: float = 2.0, enabled: bool = True):
        self.total, self.label, self.every_s, self.enabled = total, label, every_s, enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        print(f"{self.label}: {done}/{self.total} ({rate:.2f}/s, eta {eta:.0f}s) {extra}".rstrip(),
              file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Render a HF/GGUF chat template with jinja2 the way transformers does (sandboxed,
    trim_blocks, lstrip_blocks, raise_exception); compiled once per template."""
    return _compiled_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token)


def main_guard(func):
    """Decorator for verb entry points: a HublabError (ToolError and the device errors the
    tools meet: GGUF, config, llama.cpp) -> "error: ..." on stderr, exit status EXIT_FAILURE."""

    def wrapper(argv=None):
        try:
            return func(argv)
        except HublabError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILURE

    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper


@contextlib.contextmanager
def gguf_output(dst: str | os.PathLike, arch: str):
    """A gguf.GGUFWriter onto a temp file beside `dst`. The block writes header, metadata and
    tensors; when it ends normally the file is flushed, fsynced, closed and renamed onto `dst`.
    On any error it is closed and removed: `dst` is never left half-written."""
    from gguf import GGUFWriter

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, arch)
    try:
        yield writer
        for f in writer.fout or []:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        try:
            writer.close()
        finally:
            tmp.unlink(missing_ok=True)
        raise
