"""Hyperparameter checks on a model GGUF's header, before llama.cpp sees the file.

llama.cpp aborts the process on some out-of-range values (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS,
a negative or NaN norm epsilon at the first batch);
these checks refuse them with the reason instead, and make `ai list` show the file as broken.
They are a first line only: hublabio.llama.probe loads every unknown file in a child process.
"""

from __future__ import annotations

import math
import re

from hublabio.gguf_info import ModelInfo

MAX_LAYERS = 512    # llama.cpp src/llama-hparams.h LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def problems(info: ModelInfo) -> list[str]:
    """What is wrong with a model file's hyperparameters ([] when nothing is); adapters and
    files without an architecture's block count (e.g. vocabularies) are not checked."""
    if info.general_type == "adapter":
        return []
    a = info.architecture
    meta = info.metadata
    out = []
    if f"{a}.block_count" in meta:
        n = meta[f"{a}.block_count"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
            out.append(f"{a}.block_count must be an integer in [1, {MAX_LAYERS}], got {n!r}")
        else:
            blocks = {int(m.group(1)) for t in info.tensors if (m := _BLOCK.match(t.name))}
            if blocks and max(blocks) >= n:
                out.append(f"{a}.block_count is {n} but the file has tensors for block "
                           f"{max(blocks)}")
    for key in ("attention.head_count", "embedding_length"):
        v = meta.get(f"{a}.{key}")
        if v is not None and not _positive(v):
            out.append(f"{a}.{key} must be a positive integer, got {v!r}")
    kv = meta.get(f"{a}.attention.head_count_kv")
    if kv is not None and not (isinstance(kv, list) and all(_non_negative(x) for x in kv)
                               or _non_negative(kv)):
        out.append(f"{a}.attention.head_count_kv must be a non-negative integer (or one per "
                   f"layer), got {kv!r}")
    out += _float_problems(a, meta)
    experts, used = meta.get(f"{a}.expert_count", 0), meta.get(f"{a}.expert_used_count", 0)
    if not _non_negative(experts) or experts > MAX_EXPERTS:
        out.append(f"{a}.expert_count must be an integer in [0, {MAX_EXPERTS}], got {experts!r}")
    elif not _non_negative(used) or used > experts or (experts and not used):
        out.append(f"{a}.expert_used_count must be in [1, expert_count = {experts}] for a "
                   f"mixture-of-experts model (0 without experts), got {used!r}")
    return out


def _float_problems(a: str, meta: dict) -> list[str]:
    """ggml asserts, at the first batch, that every norm epsilon is >= 0 (a NaN fails too), and
    llama.cpp that an attention temperature scale and length are not 0; a NaN or infinite
    hyperparameter is never a real model's."""
    out = []
    for key, v in meta.items():
        if not key.startswith(f"{a}.") or not isinstance(v, float):
            continue
        if not math.isfinite(v):
            out.append(f"{key} must be a finite number, got {v!r}")
        elif (key.endswith("epsilon") or key.endswith(".eps")) and v < 0:
            out.append(f"{key} must be >= 0, got {v!r}")
    for key in (f"{a}.attention.temperature_scale", f"{a}.attention.temperature_length"):
        if key in meta and meta[key] == 0:
            out.append(f"{key} must not be 0")
    return out


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
