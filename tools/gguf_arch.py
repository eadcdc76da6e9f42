"""Per-architecture rules for HF -> GGUF: which llama.cpp architecture, which hyper-parameters go
into the GGUF header, and how each HF tensor is renamed and reshaped.

Learned from llama.cpp's convert_hf_to_gguf.py (Llama/Mistral Q/K permutation, Qwen2 biases,
Phi-3 fused qkv / gate_up, Gemma's `1 + weight` RMSNorm); the code here is our own and only needs
numpy + the `gguf` package, so conversion never imports torch for safetensors checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np
from hublabio_tools.common import ToolError


class ConvertError(ToolError):
    """Bad or unsupported input for a conversion; the message names the file/key at fault."""


@dataclass(frozen=True)
class ArchRule:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # HF Llama layout stores rotary halves; llama.cpp wants them interleaved
    norm_plus_one: bool = False  # Gemma RMSNorm computes x * (1 + w); llama.cpp computes x * w
    drop_lm_head: bool = False  # Gemma: output always tied to token_embd
    prefer_spm: bool = True  # use tokenizer.model when both it and tokenizer.json exist
    add_space_prefix: bool | None = None  # written only when not None (Gemma: False)


RULES: dict[str, ArchRule] = {
    "LlamaForCausalLM": ArchRule(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchRule(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchRule(gguf.MODEL_ARCH.QWEN2, prefer_spm=False),
    "Phi3ForCausalLM": ArchRule(gguf.MODEL_ARCH.PHI3),
    "GemmaForCausalLM": ArchRule(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, drop_lm_head=True,
                                 add_space_prefix=False),
    "Gemma2ForCausalLM": ArchRule(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, drop_lm_head=True,
                                  add_space_prefix=False),
    "Gemma3ForCausalLM": ArchRule(gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True, drop_lm_head=True,
                                  add_space_prefix=False),
}


def rule_for(config: dict[str, Any], where: str) -> tuple[str, ArchRule]:
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError(f"{where}: key 'architectures' is missing or empty")
    name = archs[0]
    if name not in RULES:
        raise ConvertError(f"{where}: architectures[0] = {name!r} is not supported; "
                           f"supported: {', '.join(sorted(RULES))}")
    return name, RULES[name]


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ConvertError(f"{where}: required key {key!r} is missing")
    return cfg[key]


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _rope_params(cfg: dict[str, Any], sliding: bool = False) -> dict[str, Any]:
    """Rope settings of the full-attention (or sliding-window) layers, from either the old
    `rope_scaling` + `rope_theta` keys or transformers 5's `rope_parameters` (flat, or nested per
    layer type as in Gemma 3)."""
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if "full_attention" in raw or "sliding_attention" in raw:
        raw = raw.get("sliding_attention" if sliding else "full_attention") or {}
    params = dict(raw)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    fallback = cfg.get("rope_local_base_freq") if sliding else cfg.get("rope_theta")
    if "rope_theta" not in params and fallback is not None:
        params["rope_theta"] = fallback
    return params


def _partial_rotary(cfg: dict[str, Any]) -> float:
    return float(cfg.get("partial_rotary_factor") or _rope_params(cfg).get("partial_rotary_factor") or 1.0)


def write_hparams(w: gguf.GGUFWriter, hf_arch: str, rule: ArchRule, cfg: dict[str, Any],
                  where: str, n_vocab: int) -> None:
    """Architecture metadata (everything llama.cpp reads from `<arch>.*` keys)."""
    n_embd = int(_need(cfg, "hidden_size", where))
    n_head = int(_need(cfg, "num_attention_heads", where))
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    w.add_block_count(int(_need(cfg, "num_hidden_layers", where)))
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(_need(cfg, "intermediate_size", where)))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    w.add_vocab_size(n_vocab)  # rows of the embedding matrix = entries of the token list
    rope = _rope_params(cfg)
    theta = rope.get("rope_theta", 10000.0)
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3", "longrope", "su"):
        raise ConvertError(f"{where}: rope_scaling type {rope_type!r} is not supported")
    if rule.arch == gguf.MODEL_ARCH.PHI3:
        rot = int(_partial_rotary(cfg) * n_embd) // n_head
        w.add_rope_dimension_count(rot)
        w.add_rope_freq_base(float(theta))
        orig = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings") or 4096)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if rope_type in ("longrope", "su"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            scale = cfg["max_position_embeddings"] / orig
            attn = rope.get("attention_factor") or (
                math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
            w.add_rope_scaling_attn_factors(attn)
        return
    w.add_rope_freq_base(float(theta))
    if rule.arch == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(head_dim(cfg))
    if cfg.get("head_dim") is not None or rule.arch in (
            gguf.MODEL_ARCH.GEMMA, gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        w.add_key_length(head_dim(cfg))
        w.add_value_length(head_dim(cfg))
    if rule.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        # llama.cpp scales queries by 1/sqrt(head_dim); HF by query_pre_attn_scalar**-0.5
        qpas = cfg.get("query_pre_attn_scalar")
        if qpas is not None and int(qpas) != head_dim(cfg):
            raise ConvertError(f"{where}: query_pre_attn_scalar={qpas} differs from head_dim="
                               f"{head_dim(cfg)}; llama.cpp cannot express that scaling")
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))
        # llama.cpp fixes the pattern: every 2nd (Gemma 2) / 6th (Gemma 3) layer is global
        period = 2 if rule.arch == gguf.MODEL_ARCH.GEMMA2 else 6
        types = cfg.get("layer_types")
        expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                    for i in range(int(cfg["num_hidden_layers"]))]
        if types is not None and list(types) != expected:
            raise ConvertError(f"{where}: layer_types {types} differ from llama.cpp's fixed "
                               f"pattern (every {period}th layer global) for {hf_arch}")
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if rule.arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping") or 50.0))
    if rule.arch == gguf.MODEL_ARCH.GEMMA3:
        if cfg.get("attn_logit_softcapping"):
            raise ConvertError(f"{where}: Gemma 3 with attn_logit_softcapping is not supported")
        swa_theta = _rope_params(cfg, sliding=True).get("rope_theta")
        if swa_theta is not None:
            w.add_rope_freq_base_swa(float(swa_theta))
    if cfg.get("tie_word_embeddings") is False and rule.drop_lm_head:
        raise ConvertError(f"{where}: {hf_arch} with untied lm_head is not supported")


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary dims as [x0..x(d/2-1), y0..] ; llama.cpp wants (x0,y0,x1,y1..)."""
    shape = w.shape
    return (w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


@dataclass
class TensorPlan:
    src: str  # HF tensor name ("" for generated tensors)
    dst: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy (row-major) shape of the output
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    generated: np.ndarray | None = None  # data for tensors computed from config (rope factors)
    force_f32: bool = False
    row_align: int = 1  # the transform needs whole groups of this many rows (one attention head)


def gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def plan_tensors(rule: ArchRule, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 where: str) -> list[TensorPlan]:
    """Map every HF tensor to its GGUF name/transform; unknown tensors are an error."""
    n_layer = int(cfg["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(rule.arch, n_layer)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    plans: list[TensorPlan] = []
    has_lm_head = "lm_head.weight" in shapes
    for name, shape in shapes.items():
        if name.endswith(("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")):
            continue  # buffers, recomputed by llama.cpp
        if name == "lm_head.weight" and rule.drop_lm_head:
            continue  # Gemma: llama.cpp always uses token_embd as the output matrix
        dst = gguf_name(tmap, name)
        if dst is None:
            raise ConvertError(f"{where}: tensor {name!r} has no GGUF name for {rule.arch.name}")
        transform, align = None, 1
        if rule.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            transform, align = _partial(permute_rotary, n_head), shape[0] // n_head
        elif rule.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            transform, align = _partial(permute_rotary, n_kv), shape[0] // n_kv
        elif rule.norm_plus_one and name.endswith("norm.weight"):
            transform = _plus_one
        plans.append(TensorPlan(name, dst, tuple(shape), transform, row_align=align))
    if not has_lm_head and not cfg.get("tie_word_embeddings", True) and not rule.drop_lm_head:
        raise ConvertError(f"{where}: tie_word_embeddings is false but lm_head.weight is missing")
    plans += _generated(rule, cfg, where)
    return plans


def _partial(fn: Callable[[np.ndarray, int], np.ndarray], n: int) -> Callable[[np.ndarray], np.ndarray]:
    # applied to whole heads (row_align rows each): n heads in the full tensor, fewer in a chunk
    return lambda a, total=None: fn(a, n if total is None else n * a.shape[0] // total)


def _plus_one(a: np.ndarray, total: int | None = None) -> np.ndarray:
    return a + np.float32(1.0)


def _generated(rule: ArchRule, cfg: dict[str, Any], where: str) -> list[TensorPlan]:
    rope = _rope_params(cfg)
    rope_type = str(rope.get("rope_type") or "").lower()
    out: list[TensorPlan] = []
    if rule.arch == gguf.MODEL_ARCH.LLAMA and rope_type == "llama3":
        dim = head_dim(cfg)
        base = float(rope.get("rope_theta", 10000.0))
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = float(rope.get("factor", 8.0))
        lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old = float(rope.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        factors = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < hi_wl:
                factors.append(1.0)
            elif wl > lo_wl:
                factors.append(factor)
            else:
                smooth = (old / wl - lo) / (hi - lo)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        data = np.array(factors, dtype=np.float32)
        out.append(TensorPlan("", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                              data.shape, generated=data, force_f32=True))
    if rule.arch == gguf.MODEL_ARCH.PHI3 and rope_type in ("longrope", "su"):
        rot = int(_partial_rotary(cfg) * cfg["hidden_size"]) // cfg["num_attention_heads"]
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            vals = rope.get(key)
            if vals is None or len(vals) != rot // 2:
                raise ConvertError(f"{where}: rope_scaling.{key} must have {rot // 2} values")
            data = np.array(vals, dtype=np.float32)
            out.append(TensorPlan("", gguf.TENSOR_NAMES[tensor] + ".weight", data.shape,
                                  generated=data, force_f32=True))
    return out
