"""One class per llama.cpp handle: Model, LoraAdapter, Context, Batch, SamplerChain.

Each owns exactly one C object, frees it in `close()` (idempotent; also on `with` exit and at
garbage collection) and refuses use after close. A Model frees the adapters loaded over it
before itself; close a Context before the Model it was made from (hublabio.engine keeps them on
one ExitStack in that order). Every failure is a LlamaError naming the file or the call.
"""

from __future__ import annotations

import abc
import ctypes
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Sequence

import llama_cpp as C
import numpy as np

from hublabio.errors import GGUFError, LlamaError, ProtocolError
from hublabio.llama import backend, log
from hublabio.llama.abi import set_fields
from hublabio.llama.cpu import RepackPolicy, decide


def load_mode(mmap: bool, mlock: bool) -> int:
    """llama_model_params.load_mode for the mmap/mlock settings."""
    if mmap:
        return C.LLAMA_LOAD_MODE_MMAP_MLOCK if mlock else C.LLAMA_LOAD_MODE_MMAP
    return C.LLAMA_LOAD_MODE_MLOCK if mlock else C.LLAMA_LOAD_MODE_NONE


class _Handle(abc.ABC):
    _ptr = None

    def _live(self):
        if not self._ptr:
            raise LlamaError(f"{type(self).__name__} is closed")
        return self._ptr

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @abc.abstractmethod
    def close(self) -> None:
        """Free the C object (idempotent)."""


class Model(_Handle):
    """A GGUF loaded by llama.cpp under the CPU policy (`repack`) and a load mode."""

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True, mlock: bool = False,
                 repack="auto", vocab_only: bool = False, metadata_only: bool = False):
        """`metadata_only`: read hyperparameters and tensor shapes, allocate and read no weight
        (llama.cpp's no_alloc; hublabio.llama.probe uses it)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(self.path, "no such model file")
        backend.init()
        self.policy: RepackPolicy = decide(repack)
        self._adapters: dict[Path, LoraAdapter] = {}
        params = C.llama_model_default_params()
        set_fields(params, load_mode=load_mode(mmap and not metadata_only, mlock),
                   use_extra_bufts=self.policy.use_extra_bufts, vocab_only=vocab_only,
                   no_alloc=metadata_only)
        with backend.load_lock:
            self.extra_buffer_types = backend.apply_policy(self.policy)
            log.clear_errors()
            with log.capture_buffers() as buffers:
                self._ptr = C.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._ptr:
            detail = "; ".join(log.recent_errors(3))
            raise GGUFError(self.path, "llama.cpp could not load this model (not a GGUF, corrupt, "
                                       "or an unsupported architecture)"
                                       + (f": {detail}" if detail else ""))
        self.buffers: dict[str, float] = dict(buffers)  # buffer type -> MiB of weights
        self.vocab = C.llama_model_get_vocab(self._ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self._ptr)
        self.n_embd = C.llama_model_n_embd(self._ptr)
        self.n_params = C.llama_model_n_params(self._ptr)
        self.size = C.llama_model_size(self._ptr)
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.architecture = self.meta("general.architecture") or "unknown"
        self.chat_template = self.meta("tokenizer.chat_template")

    # ---- metadata and tokens -------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        ptr = self._live()
        size = C.llama_model_meta_val_str(ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        C.llama_model_meta_val_str(ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (any length: the buffer grows to what llama.cpp asks)."""
        self._live()
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def token_text(self, token: int) -> str:
        return "" if token < 0 else self.piece(token, special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = True) -> list[int]:
        self._live()
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special,
                                 parse_special)
        return list(arr[:n])

    def detokenize(self, ids: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    # ---- adapters ------------------------------------------------------------------------
    def adapter(self, path: str | os.PathLike) -> "LoraAdapter":
        """The LoRA adapter at `path`, loaded over this model once."""
        key = Path(path).resolve()
        found = self._adapters.get(key)
        if found is None:
            found = self._adapters[key] = LoraAdapter(self, key)
        return found

    @property
    def adapters(self) -> list[Path]:
        return list(self._adapters)

    def close(self) -> None:
        for adapter in self._adapters.values():
            adapter.close()
        self._adapters.clear()
        if self._ptr:
            C.llama_model_free(self._ptr)
            self._ptr = None


class LoraAdapter(_Handle):
    def __init__(self, model: Model, path: Path):
        self.path = path
        if not path.is_file():
            raise GGUFError(path, "no such LoRA adapter file")
        with backend.load_lock:
            log.clear_errors()
            self._ptr = C.llama_adapter_lora_init(model._live(), os.fsencode(path))
        if not self._ptr:
            detail = "; ".join(log.recent_errors(2))
            raise GGUFError(path, "llama.cpp could not load this LoRA adapter (wrong base model, "
                                  "not an adapter GGUF, or corrupt)"
                                  + (f": {detail}" if detail else ""))

    def close(self) -> None:
        if self._ptr:
            C.llama_adapter_lora_free(self._ptr)
            self._ptr = None


def adapter_key(adapters) -> tuple:
    """What identifies an adapter set ((LoraAdapter, scale), ...): ((path, scale), ...)."""
    return tuple((a.path, s) for a, s in adapters)


class Batch(_Handle):
    """A llama_batch of up to `capacity` tokens, for one or more sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        self.capacity = capacity
        self._ptr = True  # the struct itself is held by value
        self._batch = C.llama_batch_init(capacity, 0, n_seq_max)

    def fill(self, tokens: Sequence[int], start_pos: int, *, seq: int = 0,
             outputs_from: int | None = None) -> int:
        """Put `tokens` at positions start_pos.. of sequence `seq`; logits are produced for
        positions >= outputs_from (default: the last token only). Returns the output count."""
        return self.fill_many([(tokens, start_pos, seq, outputs_from)])[0][1]

    def fill_many(self, parts) -> list[tuple[int, int]]:
        """Several sequences' tokens in one batch: parts of (tokens, start_pos, seq,
        outputs_from). Returns, per part, (batch row of its last token, its output count)."""
        self._live()
        total = sum(len(p[0]) for p in parts)
        if total > self.capacity:
            raise LlamaError(f"{total} tokens do not fit a batch of {self.capacity}")
        b = self._batch
        i, out = 0, []
        for tokens, start_pos, seq, outputs_from in parts:
            n = len(tokens)
            first = start_pos + n - 1 if outputs_from is None else outputs_from
            n_out = 0
            for j, tok in enumerate(tokens):
                b.token[i] = int(tok)
                b.pos[i] = start_pos + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                want = start_pos + j >= first
                b.logits[i] = 1 if want else 0
                n_out += want
                i += 1
            out.append((i - 1, n_out))
        b.n_tokens = i  # a declared field (abi.FIELDS), checked at import; this is the hot path
        return out

    def close(self) -> None:
        if self._ptr:
            C.llama_batch_free(self._batch)
            self._ptr = None


class Context(_Handle):
    """A llama_context: the KV cache of `n_ctx` tokens, threads for generation (`threads`) and
    prompt batches (`threads_batch`), and the adapters applied to it."""

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: int = 512,
                 n_ubatch: int | None = None, threads: int = 1, threads_batch: int | None = None,
                 n_seq_max: int = 1, eval_callback: Callable[[int, bool], bool] | None = None,
                 kv_type: int | None = None, flash_attn: bool | None = None,
                 kv_unified: bool = False):
        """`kv_type`: the KV cache's ggml type (None = llama.cpp's F16; 0 = F32, for tests that
        compare logits with a reference); `flash_attn`: None = llama.cpp's auto."""
        self.model = model
        params = C.llama_context_default_params()
        set_fields(params, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch,
                   n_seq_max=n_seq_max, n_threads=threads,
                   n_threads_batch=threads_batch or threads, no_perf=True,
                   kv_unified=kv_unified)
        if kv_type is not None:
            set_fields(params, type_k=kv_type, type_v=kv_type)
        if flash_attn is not None:
            set_fields(params, flash_attn_type=C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                       else C.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._cb = None
        if eval_callback is not None:
            self._cb = C.ggml_backend_sched_eval_callback(
                lambda t, ask, _ud: bool(eval_callback(t, bool(ask))))
            set_fields(params, cb_eval=self._cb, cb_eval_user_data=None)
        log.clear_errors()
        self._ptr = C.llama_init_from_model(model._live(), params)
        if not self._ptr:
            detail = "; ".join(log.recent_errors(2))
            raise LlamaError(f"{model.path}: llama.cpp could not create a context of {n_ctx} "
                             f"tokens" + (f": {detail}" if detail else ""))
        self.threads, self.threads_batch = threads, threads_batch or threads
        self.n_ctx = C.llama_n_ctx(self._ptr)
        self.n_batch = C.llama_n_batch(self._ptr)  # llama.cpp clamps it to n_ctx
        self._memory = C.llama_get_memory(self._ptr)
        self._batch = Batch(self.n_batch)
        self._adapters: tuple = ()
        self._logits_views: dict[int, np.ndarray] = {}

    def decode(self, tokens: Sequence[int], start_pos: int, *, seq: int = 0,
               outputs_from: int | None = None) -> int:
        """Evaluate `tokens` (at most n_batch) at start_pos.. of `seq`; returns the number of
        logits rows produced (the last token's only, unless outputs_from says otherwise)."""
        return self.decode_many([(tokens, start_pos, seq, outputs_from)])[0][1]

    def decode_many(self, parts) -> list[tuple[int, int]]:
        """One llama_decode of several sequences' tokens (see Batch.fill_many): per part,
        (batch row of its last token, its output count)."""
        rows = self._batch.fill_many(parts)
        rc = C.llama_decode(self._live(), self._batch._batch)
        if rc != 0:
            raise LlamaError(f"llama_decode failed (code {rc}"
                             + (", the KV cache is full)" if rc == 1 else ")"))
        return rows

    def settle_outputs(self) -> None:
        """Put the last decode's output rows in batch order now. llama.cpp does it lazily, in
        place, on the first read of any row (output_reorder): when several threads read
        their rows of one batch, the decoding thread calls this first so that no read moves
        a row another thread is reading."""
        C.llama_get_logits(self._live())

    def logits(self, i: int = -1) -> np.ndarray:
        """Row `i` of the last decode's logits: a view, valid until the next decode."""
        ptr = C.llama_get_logits_ith(self._live(), i)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise LlamaError(f"no logits for output {i}")
        # a row usually sits at the same place every step: keep its view (per address, so
        # that slots reading their rows from several threads each get their own)
        view = self._logits_views.get(addr)
        if view is None:
            if len(self._logits_views) >= 64:
                self._logits_views = {}
            view = np.frombuffer((ctypes.c_float * self.model.n_vocab).from_address(addr),
                                 dtype=np.float32)
            self._logits_views[addr] = view
        return view

    def all_logits(self, n_out: int) -> np.ndarray:
        """Every logits row of the last decode, as a float32 copy [n_out, n_vocab]."""
        ptr = C.llama_get_logits(self._live())
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.model.n_vocab,)).reshape(
            n_out, self.model.n_vocab).copy()

    @property
    def pooling(self) -> int:
        """llama.cpp's pooling type for this context (C.LLAMA_POOLING_TYPE_NONE for a
        generative model: one embedding per output token, pooled by the caller)."""
        return int(C.llama_pooling_type(self._live()))

    def set_embeddings(self, on: bool) -> None:
        """Also produce the final hidden states (after the output norm) of each output token;
        llama.cpp keeps computing the logits too."""
        C.llama_set_embeddings(self._live(), bool(on))

    def embeddings(self, n_out: int) -> np.ndarray:
        """The hidden states of the last decode's outputs, a float32 copy [n_out, n_embd]
        (set_embeddings(True) first)."""
        ptr = C.llama_get_embeddings(self._live())
        if not ctypes.cast(ptr, ctypes.c_void_p).value:
            raise LlamaError("llama.cpp returned no embeddings (set_embeddings was not on)")
        n = self.model.n_embd
        return np.ctypeslib.as_array(ptr, shape=(n_out * n,)).reshape(n_out, n).copy()

    def keep_prefix(self, n: int, seq: int = 0) -> bool:
        """Drop the KV cache of `seq` from position n on (False if llama.cpp cannot)."""
        return bool(C.llama_memory_seq_rm(self._memory, seq, n, -1))

    def clear(self) -> None:
        C.llama_memory_clear(self._memory, True)

    @property
    def adapter_set(self) -> tuple:
        """The adapter set applied now, as `adapter_key` writes it (() for none)."""
        return self._adapters

    def set_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        key = adapter_key(adapters)
        if key == self._adapters:
            return
        if not adapters:
            rc = C.llama_set_adapters_lora(self._live(), None, 0, None)
        else:
            arr = (C.llama_adapter_lora_p_ctypes * len(adapters))(*[a._live() for a, _ in adapters])
            scales = (ctypes.c_float * len(adapters))(*[s for _, s in adapters])
            rc = C.llama_set_adapters_lora(self._live(), arr, len(adapters), scales)
        if rc != 0:
            names = ", ".join(str(a.path) for a, _ in adapters)
            raise LlamaError(f"{names}: llama.cpp refused to apply this adapter")
        self._adapters = key

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._batch.close()
        if self._ptr:
            C.llama_free(self._ptr)
            self._ptr = None


class SamplerChain(_Handle):
    """llama.cpp's sampler chain: grammar → logit bias → penalties → greedy, or top-k → top-p →
    temperature → seeded distribution. A `grammar` (GBNF, rule `root`) masks every token that
    would leave its language, and only lets the generation end once a sentence is complete."""

    def __init__(self, model: Model, *, temperature: float, top_k: int = 40, top_p: float = 1.0,
                 repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, penalty_last_n: int = 64,
                 seed: int | None = None, logit_bias: dict[int, float] | None = None,
                 grammar: str | None = None):
        params = C.llama_sampler_chain_default_params()
        set_fields(params, no_perf=True)
        self._ptr = C.llama_sampler_chain_init(params)
        add = lambda s: C.llama_sampler_chain_add(self._ptr, s)  # noqa: E731
        if grammar is not None:
            log.clear_errors()
            g = C.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not g:
                self.close()
                detail = "; ".join(log.recent_errors(2))
                raise ProtocolError("options.grammar: llama.cpp could not parse the grammar"
                                    + (f": {detail}" if detail else ""))
            add(g)
        if logit_bias:
            arr = (C.llama_logit_bias * len(logit_bias))()
            for i, (tok, bias) in enumerate(logit_bias.items()):
                set_fields(arr[i], token=int(tok), bias=float(bias))
            add(C.llama_sampler_init_logit_bias(model.n_vocab, len(logit_bias), arr))
        if repeat_penalty != 1.0 or frequency_penalty or presence_penalty:
            add(C.llama_sampler_init_penalties(model.n_vocab, penalty_last_n, repeat_penalty,
                                               frequency_penalty, presence_penalty))
        if temperature <= 0:
            add(C.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(C.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                add(C.llama_sampler_init_top_p(top_p, 1))
            add(C.llama_sampler_init_temp(temperature))
            add(C.llama_sampler_init_dist((C.LLAMA_DEFAULT_SEED if seed is None else seed)
                                          & 0xFFFFFFFF))

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample from output `i` of ctx's last decode (the chain also accepts the token)."""
        return int(C.llama_sampler_sample(self._live(), ctx._live(), i))

    def close(self) -> None:
        if self._ptr:
            C.llama_sampler_free(self._ptr)
            self._ptr = None


def owned(stack: ExitStack, handle):
    """Push `handle.close` on `stack` and return the handle."""
    stack.callback(handle.close)
    return handle
