"""How much memory a model needs, and whether it may be loaded.

`estimate_memory(info, n_ctx)` predicts the growth of the process's resident memory (RSS) once
llama.cpp has loaded the GGUF (mmap on) and answered a prompt of up to one micro-batch:

- weights: every tensor's bytes — mapped pages count once touched, and a forward pass touches
  them all — plus the copies llama.cpp's CPU backend makes of the matrices it repacks for
  faster kernels (e.g. Q4_K → q4_K_8x8 on x86 with AVX2), decided by the same CPU policy the
  engine loads with (hublabio.llama.cpu: never AMX under "auto", nothing when repack = false);
- KV cache: layers × KV heads × (key + value head size) × n_ctx × bytes per element, with n_ctx
  rounded up to 256 as llama.cpp does (it clears the buffer, so all of it is resident;
  sliding-window layers get a full-size cache in llama-cpp-python's defaults), once per slot
  (`parallel`: continuous batching gives every sequence its own cache);
- compute: what one micro-batch of prompt touches in llama.cpp's compute buffer (attention
  scores n_head × n_ubatch² and the FFN's three n_ff-wide activations, whichever stage is
  larger, plus the residual stream); llama.cpp *reserves* more virtual memory (the logits of
  n_ubatch outputs), but only the pages a decode writes become resident;
- overhead: backend start-up, vocabulary tables and per-decode buffers (logits, sampler
  candidates), linear in the vocabulary size.

The constants were fitted on SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M at n_ctx 256..8192
(tests/integration/test_estimate_rss.py keeps them within ±15% of measured RSS growth).
Not covered: a full micro-batch processed late in a long context makes the attention scores
grow to n_head × n_ubatch × n_ctx × 4 bytes for the duration of that batch; an embeddings
request (Engine.embed) leaves 16 output rows of logits resident (16 × vocab × 4 bytes: 3 MiB
for SmolLM2, 10 MiB for a 152k vocabulary).

`plan_admission(needed_mb, budget_mb, resident)` returns which resident models to evict (least
recently used unpinned first, no more than needed) or raises BudgetError with the numbers and,
when `info` and `n_ctx` are given and a smaller context would fit, which one.
"""

from __future__ import annotations

from dataclasses import dataclass

from hublabio.errors import BudgetError
from hublabio.gguf_info import ModelInfo
from hublabio.llama.cpu import RepackPolicy
from hublabio.llama.cpu import decide as repack_policy

MiB = 1024 * 1024
CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of this

# Fitted constants (see the module docstring): fixed start-up + per-decode memory, and the
# per-vocabulary-entry cost of the tokenizer tables, the logits and the sampler's candidates.
OVERHEAD_FIXED_MB = 16.0
OVERHEAD_PER_VOCAB_BYTES = 153


@dataclass(frozen=True)
class Estimate:
    weights_mb: float
    kv_mb: float
    compute_mb: float
    total_mb: float
    overhead_mb: float = 0.0
    n_ctx: int = 0  # the context size llama.cpp will actually allocate (padded)

    def describe(self) -> str:
        return (f"{self.total_mb:.0f} MiB (weights {self.weights_mb:.0f}, KV cache "
                f"{self.kv_mb:.0f}, compute {self.compute_mb:.0f}, overhead {self.overhead_mb:.0f})")


def repack_bytes(info: ModelInfo, policy: RepackPolicy | None = None) -> int:
    """Bytes of the matrices that llama.cpp copies into a repacked (anonymous) buffer under
    `policy` (hublabio.llama.cpu; default: "auto" on this CPU). Token embeddings never are:
    they are read with get_rows, which the repacked layouts do not support."""
    policy = policy or repack_policy("auto")
    return sum(t.n_bytes for t in info.tensors
               if len(t.shape) >= 2 and t.name != "token_embd.weight"
               and policy.repacked(t.type_name, t.shape[1]))


def padded_ctx(n_ctx: int) -> int:
    return max(CTX_PAD, -(-int(n_ctx) // CTX_PAD) * CTX_PAD)


def _ffn_length(info: ModelInfo) -> int:
    v = info.metadata.get(f"{info.architecture}.feed_forward_length")
    if isinstance(v, list):
        v = max(v) if v else 0
    if isinstance(v, int) and v > 0:
        return v
    return 4 * info.embedding_length


def estimate_memory(info: ModelInfo, n_ctx: int, *, n_batch: int = 512, n_ubatch: int = 512,
                    kv_bytes: int = 2, repack: RepackPolicy | None = None,
                    parallel: int = 1) -> Estimate:
    """Predicted RSS growth of loading `info`'s model with a context of `n_ctx` tokens per
    slot and `parallel` slots (each its own KV cache; one row of logits each), with weights
    repacked as `repack` decides (default: "auto" on this CPU)."""
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    ctx = padded_ctx(n_ctx)
    weights = info.tensor_bytes + repack_bytes(info, repack)
    parallel = max(1, parallel)
    kv = info.kv_elements_per_token * ctx * kv_bytes * parallel

    # One micro-batch of prompt at the start of the context, one row of logits out.
    ub = max(1, min(n_ubatch, n_batch, n_ctx))
    heads = max(1, info.heads)
    q_width = heads * info.head_dim
    kv_width = info.kv_heads * (info.head_dim + info.value_head_dim)
    attn_stage = heads * ub * padded_ctx(ub) * 4 + ub * (q_width + kv_width) * 4
    ffn_stage = 3 * ub * _ffn_length(info) * 4
    residual = 4 * ub * info.embedding_length * 4
    compute = max(attn_stage, ffn_stage) + residual

    overhead = OVERHEAD_FIXED_MB * MiB + OVERHEAD_PER_VOCAB_BYTES * info.vocab_size
    overhead += (parallel - 1) * info.vocab_size * 4  # every slot's row of logits
    total = weights + kv + compute + overhead
    return Estimate(weights_mb=weights / MiB, kv_mb=kv / MiB, compute_mb=compute / MiB,
                    total_mb=total / MiB, overhead_mb=overhead / MiB, n_ctx=ctx)


def extra_context_mb(info: ModelInfo, n_ctx: int, **kwargs) -> float:
    """Predicted RSS growth of one more context of one slot over a loaded model
    (Engine.add_context): its KV cache of `n_ctx` tokens, its compute buffer and its row of
    logits; the weights are shared. `kwargs` as estimate_memory's."""
    est = estimate_memory(info, n_ctx, **kwargs)
    return est.kv_mb + est.compute_mb + info.vocab_size * 4 / MiB


def bytes_per_token(info: ModelInfo, position: int, kv_bytes: int = 2) -> int:
    """Bytes one decode step reads from memory: every weight once (of the token embedding only
    one row, unless it doubles as the output matrix) plus the KV cache of `position` tokens.
    Decoding is bound by this: tok/s <= memory read bandwidth / bytes_per_token."""
    names = {t.name for t in info.tensors}
    total = 0
    for t in info.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            total += t.n_bytes // max(1, t.shape[-1])
        else:
            total += t.n_bytes
    return total + info.kv_elements_per_token * kv_bytes * position


def max_context_fitting(info: ModelInfo, available_mb: float, *, floor: int = 256,
                        ceiling: int | None = None, **kwargs) -> int | None:
    """The largest context (a multiple of 256, at least `floor`, at most the model's training
    context) whose estimate fits in `available_mb`; None when not even `floor` fits."""
    ceiling = ceiling or info.context_length or 131072
    ceiling = max(floor, min(ceiling, 131072))
    fits = lambda c: estimate_memory(info, c, **kwargs).total_mb <= available_mb  # noqa: E731
    if not fits(floor):
        return None
    lo, hi = padded_ctx(floor) // CTX_PAD, max(1, ceiling // CTX_PAD)
    if lo > hi:
        return floor
    best = floor
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid * CTX_PAD):
            best, lo = mid * CTX_PAD, mid + 1
        else:
            hi = mid - 1
    return max(best, floor)


@dataclass(frozen=True)
class Resident:
    key: str
    mb: float
    pinned: bool          # pinned, or busy serving a request: never evicted
    last_used: float      # monotonic time; smaller = longer ago


def plan_admission(needed_mb: float, budget_mb: float, resident: list[Resident], *,
                   info: ModelInfo | None = None, n_ctx: int | None = None) -> list[str]:
    """Keys of the resident models to evict so that `needed_mb` fits in `budget_mb`: least
    recently used unpinned models first, and none that is not needed. Raises BudgetError
    ("needs X MiB, budget Y MiB, in use Z MiB") when even evicting every unpinned model is not
    enough; with `info` and `n_ctx`, it also says which smaller context would fit."""
    in_use = sum(r.mb for r in resident)
    free = budget_mb - in_use
    if needed_mb <= free:
        return []
    candidates = sorted((r for r in resident if not r.pinned), key=lambda r: r.last_used)
    victims: list[Resident] = []
    freed = 0.0
    for r in candidates:
        if free + freed >= needed_mb:
            break
        victims.append(r)
        freed += r.mb
    if free + freed < needed_mb:
        held = sum(r.mb for r in resident if r.pinned)
        message = (f"not enough memory: needs {needed_mb:.0f} MiB, budget {budget_mb:.0f} MiB, "
                   f"in use {in_use:.0f} MiB")
        if held:
            message += f" ({held:.0f} MiB of it pinned or busy)"
        suggestion = None
        if info is not None and n_ctx is not None:
            ctx = max_context_fitting(info, budget_mb - held)
            if ctx is not None and ctx < n_ctx:
                suggestion = (f"a context of {ctx} tokens would fit "
                              f"(ai config context_size {ctx})")
        raise BudgetError(message, needed_mb=needed_mb, budget_mb=budget_mb, in_use_mb=in_use,
                          suggestion=suggestion)
    # Keep any victim the others already make room without (minimal set, LRU preference).
    for r in list(victims):
        if free + freed - r.mb >= needed_mb:
            victims.remove(r)
            freed -= r.mb
    return [r.key for r in victims]


__all__ = ["Estimate", "Resident", "estimate_memory", "plan_admission", "max_context_fitting",
           "repack_bytes", "padded_ctx", "bytes_per_token"]
