"""The pinned llama-cpp-python binding, checked once at import.

ctypes accepts any attribute on a Structure: `params.use_mmap = False` on a struct that has no
`use_mmap` field sets a Python attribute and reaches nothing (0.3.36 replaced use_mmap/use_mlock
with `load_mode`). So every struct field this layer writes is declared in `FIELDS`, checked
against the binding's `_fields_` when hublabio.llama is imported, and written only through
`set_fields()`, which refuses an undeclared or missing name. A version bump that renames a field
fails loudly at import, naming the struct, the field and the version.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp as C

from hublabio.errors import LlamaError

PINNED = "0.3.36"
VERSION = getattr(C, "__version__", "unknown")

# Every field of every struct that the layer (or a tool through it) sets.
FIELDS: dict[str, tuple[str, ...]] = {
    "llama_model_params": ("load_mode", "use_extra_bufts", "n_gpu_layers", "vocab_only",
                           "check_tensors", "no_host", "no_alloc"),
    "llama_context_params": ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads",
                             "n_threads_batch", "no_perf", "embeddings", "cb_eval",
                             "cb_eval_user_data", "type_k", "type_v", "flash_attn_type",
                             "kv_unified"),
    "llama_batch": ("n_tokens", "token", "pos", "n_seq_id", "seq_id", "logits"),
    "llama_model_quantize_params": ("nthread", "ftype", "allow_requantize", "imatrix",
                                    "kv_overrides"),
    "llama_model_imatrix_data": ("name", "data", "size"),
    "llama_model_kv_override": ("key", "tag", "value"),
    "llama_logit_bias": ("token", "bias"),
    "llama_sampler_chain_params": ("no_perf",),
}

# Every C function the layer calls: a missing one is an error at import, not mid-request.
FUNCTIONS: tuple[str, ...] = (
    "llama_backend_init", "llama_log_set", "llama_model_default_params",
    "llama_context_default_params", "llama_model_load_from_file", "llama_model_free",
    "llama_model_get_vocab", "llama_vocab_n_tokens", "llama_model_n_ctx_train",
    "llama_model_meta_val_str", "llama_model_n_params", "llama_model_size",
    "llama_vocab_bos", "llama_vocab_eos", "llama_vocab_is_eog", "llama_vocab_get_add_bos",
    "llama_token_to_piece", "llama_tokenize", "llama_init_from_model", "llama_free",
    "llama_n_ctx", "llama_n_batch", "llama_get_memory", "llama_memory_seq_rm",
    "llama_memory_clear", "llama_decode", "llama_get_logits", "llama_get_logits_ith",
    "llama_batch_init", "llama_batch_free", "llama_adapter_lora_init", "llama_adapter_lora_free",
    "llama_set_adapters_lora", "llama_sampler_chain_init", "llama_sampler_chain_default_params",
    "llama_sampler_chain_add", "llama_sampler_free", "llama_sampler_sample",
    "llama_sampler_init_penalties", "llama_sampler_init_top_k", "llama_sampler_init_top_p",
    "llama_sampler_init_temp", "llama_sampler_init_dist", "llama_sampler_init_greedy",
    "llama_sampler_init_grammar",
    "llama_sampler_init_logit_bias", "llama_model_quantize",
    "llama_model_quantize_default_params", "llama_model_n_embd", "llama_pooling_type",
    "llama_set_embeddings", "llama_get_embeddings",
)


class LlamaABIError(LlamaError):
    """The installed binding does not have a field or function this layer relies on."""


def struct_fields(struct_type: type) -> frozenset[str]:
    names: set[str] = set()
    for name, *_ in getattr(struct_type, "_fields_", ()):
        names.add(name)
    return frozenset(names)


def check(binding: Any = C, fields: dict[str, tuple[str, ...]] = FIELDS,
          functions: tuple[str, ...] = FUNCTIONS) -> None:
    """Raise LlamaABIError naming every declared field or function the binding lacks."""
    version = getattr(binding, "__version__", "unknown")
    problems = []
    for struct_name, wanted in fields.items():
        struct_type = getattr(binding, struct_name, None)
        if struct_type is None:
            problems.append(f"struct {struct_name} is missing")
            continue
        have = struct_fields(struct_type)
        problems += [f"{struct_name}.{f} is missing" for f in wanted if f not in have]
    problems += [f"function {f} is missing" for f in functions if not hasattr(binding, f)]
    if problems:
        raise LlamaABIError(
            f"llama-cpp-python {version} lacks what hublabio.llama uses (written for "
            f"{PINNED}): " + "; ".join(problems) + ". Install llama-cpp-python==" + PINNED)


def set_fields(struct: ctypes.Structure, **values: Any) -> ctypes.Structure:
    """Assign declared, existing fields only (an unknown name is a LlamaABIError). Hot paths
    (one llama_batch per token) assign declared fields directly: FIELDS is checked at import."""
    name = type(struct).__name__
    declared = FIELDS.get(name, ())
    have = struct_fields(type(struct))
    for key, value in values.items():
        if key not in declared or key not in have:
            raise LlamaABIError(f"{name}.{key}: not a declared field of llama-cpp-python "
                                f"{VERSION}'s {name} (declared: {', '.join(declared)})")
        setattr(struct, key, value)
    return struct


check()
