"""One llama.cpp model and its context, driven through llama-cpp-python's C API.

The engine owns its C handles (model, context, sampler, LoRA adapters) and frees them in
`close()`, deterministically. Generation streams `Token`s with the log-probability the model gave
each sampled token (from the raw logits, before temperature: the model's own confidence).

LoRA adapters are loaded once per engine (`llama_adapter_lora_init`) and switched per request on
the live context (`llama_set_adapters_lora`) — the base weights are never reloaded. The KV cache
of the previous request is reused for the longest common token prefix when the adapter is the
same (system prompts are not re-evaluated).

One engine serves one generation at a time; the pool's lease enforces that.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

import llama_cpp as C

from hublabio.errors import Cancelled, ContextOverflow, GGUFError, HublabError

# llama-cpp-python routes llama.cpp's log through this logger; without a level it prints every
# line of the model load to stderr.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            C.llama_backend_init()
            _backend_ready = True


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil can fail inside odd containers
        n = None
    return max(1, n or os.cpu_count() or 1)


@dataclass
class SamplingOptions:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_inference(cls, inf, **overrides) -> "SamplingOptions":
        """Build from a config.InferenceConfig; keyword overrides win when not None."""
        values = {
            "max_tokens": inf.max_tokens,
            "temperature": inf.temperature,
            "top_p": inf.top_p,
            "top_k": inf.top_k,
            "repeat_penalty": getattr(inf, "repeat_penalty", 1.1),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        return cls(**values)


@dataclass
class Token:
    id: int
    text: str
    logprob: float


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    prompt_tps: float = 0.0
    gen_tps: float = 0.0
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled"
    mean_logprob: float = float("nan")
    logprobs: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "logprobs"}
        if math.isnan(d["mean_logprob"]):
            d["mean_logprob"] = None
        return d


class Engine:
    """A loaded GGUF model with one context of `n_ctx` tokens."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, use_mmap: bool = True, use_mlock: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(self.path, "no such model file")
        _init_backend()
        self.n_threads = n_threads or physical_cores()
        self.n_batch = n_batch
        self._lock = threading.Lock()
        self._model = self._ctx = self._sampler = None
        self._adapters: dict[Path, ctypes.c_void_p] = {}
        self._active_adapter: tuple[Path | None, float] = (None, 0.0)
        self._cached: list[int] = []  # tokens whose KV is in the context (sequence 0)
        self.last_stats: GenerationStats | None = None

        mparams = C.llama_model_default_params()
        mparams.use_mmap = use_mmap
        mparams.use_mlock = use_mlock
        self._model = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise GGUFError(self.path, "llama.cpp could not load this model "
                                       "(not a GGUF, corrupt, or an unsupported architecture)")
        try:
            self._vocab = C.llama_model_get_vocab(self._model)
            self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
            self.n_ctx_train = C.llama_model_n_ctx_train(self._model)
            cparams = C.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_threads = self.n_threads
            cparams.n_threads_batch = self.n_threads
            cparams.no_perf = True
            self._ctx = C.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise HublabError(f"{self.path}: llama.cpp could not create a context of "
                                  f"{n_ctx} tokens")
            self.n_ctx = C.llama_n_ctx(self._ctx)
            self.n_batch = C.llama_n_batch(self._ctx)  # llama.cpp clamps it to n_ctx
            self._memory = C.llama_get_memory(self._ctx)
            self.chat_template = self._meta("tokenizer.chat_template")
            self.architecture = self._meta("general.architecture") or "unknown"
            self.n_params = C.llama_model_n_params(self._model)
            self.model_size = C.llama_model_size(self._model)
            self._bos_text = self.token_text(C.llama_vocab_bos(self._vocab))
            self._eos_text = self.token_text(C.llama_vocab_eos(self._vocab))
            self._formatter = None
        except BaseException:
            self.close()
            raise

    # ---- metadata and tokens -------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        size = C.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        C.llama_model_meta_val_str(self._model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            cap = -n
            arr = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos, special)
        return list(arr[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self._piece(t) for t in ids).decode("utf-8", errors="replace")

    def format_chat(self, messages: list[dict]) -> str:
        """Render chat messages with the GGUF's own chat template (Jinja2), ready for the
        assistant's turn. Models without a template get a plain `role: content` transcript."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=self.chat_template, eos_token=self._eos_text,
                bos_token=self._bos_text, add_generation_prompt=True)
        return self._formatter(messages=messages).prompt

    def _prompt_tokens(self, prompt: str | list[dict]) -> list[int]:
        text = self.format_chat(prompt) if isinstance(prompt, list) else prompt
        add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        if add_bos and self._bos_text and text.startswith(self._bos_text):
            add_bos = False  # the template already wrote BOS
        return self.tokenize(text, add_bos=add_bos, special=True)

    # ---- adapters ------------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load a LoRA adapter GGUF over this model once; later requests only switch to it."""
        path = Path(path).resolve()
        if path in self._adapters:
            return
        if not path.is_file():
            raise GGUFError(path, "no such LoRA adapter file")
        handle = C.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise GGUFError(path, "llama.cpp could not load this LoRA adapter (wrong base "
                                  "model, not an adapter GGUF, or corrupt)")
        self._adapters[path] = handle

    def _use_adapter(self, path: Path | None, scale: float) -> None:
        key = (Path(path).resolve() if path else None, scale if path else 0.0)
        if key == self._active_adapter:
            return
        if key[0] is None:
            C.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            self.load_adapter(key[0])
            arr = (C.llama_adapter_lora_p_ctypes * 1)(self._adapters[key[0]])
            scales = (ctypes.c_float * 1)(scale)
            if C.llama_set_adapters_lora(self._ctx, arr, 1, scales) != 0:
                raise HublabError(f"{key[0]}: llama.cpp refused to apply this adapter")
        self._active_adapter = key
        self._cached = []  # KV computed under another adapter is stale

    @property
    def adapters(self) -> list[Path]:
        return list(self._adapters)

    # ---- generation ----------------------------------------------------------------------
    def _make_sampler(self, opts: SamplingOptions):
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
        if opts.repeat_penalty and opts.repeat_penalty != 1.0:
            add(C.llama_sampler_init_penalties(self.n_vocab, 64, opts.repeat_penalty, 0.0, 0.0))
        if opts.temperature <= 0:
            add(C.llama_sampler_init_greedy())
        else:
            if opts.top_k > 0:
                add(C.llama_sampler_init_top_k(opts.top_k))
            if opts.top_p < 1.0:
                add(C.llama_sampler_init_top_p(opts.top_p, 1))
            add(C.llama_sampler_init_temp(opts.temperature))
            seed = opts.seed if opts.seed is not None else C.LLAMA_DEFAULT_SEED
            add(C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _decode(self, tokens: Sequence[int], cancel: threading.Event | None) -> None:
        for start in range(0, len(tokens), self.n_batch):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            chunk = tokens[start:start + self.n_batch]
            arr = (C.llama_token * len(chunk))(*chunk)
            rc = C.llama_decode(self._ctx, C.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self._cached = []
                raise HublabError(f"llama_decode failed (code {rc})")
            self._cached.extend(chunk)

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV cache of the longest common prefix (at least the last prompt token is
        always evaluated again, to get its logits)."""
        n = 0
        limit = min(len(self._cached), len(tokens) - 1)
        while n < limit and self._cached[n] == tokens[n]:
            n += 1
        if not C.llama_memory_seq_rm(self._memory, 0, n, -1):
            n = 0
            C.llama_memory_clear(self._memory, True)
        self._cached = self._cached[:n]
        return n

    def generate(self, prompt: str | list[dict], opts: SamplingOptions | None = None, *,
                 adapter: str | os.PathLike | None = None, adapter_scale: float = 1.0,
                 cancel: threading.Event | None = None) -> Iterator[Token]:
        """Stream the answer to a raw prompt (str) or chat messages (list of dicts).
        `self.last_stats` holds the statistics once the iterator is exhausted or closed."""
        opts = opts or SamplingOptions()
        if self._ctx is None:
            raise HublabError(f"{self.path.name}: engine is closed")
        self._use_adapter(Path(adapter) if adapter else None, adapter_scale)
        tokens = self._prompt_tokens(prompt)
        max_new = min(opts.max_tokens, self.n_ctx - len(tokens))
        if max_new <= 0:
            raise ContextOverflow(f"prompt of {len(tokens)} tokens does not fit the context of "
                              f"{self.n_ctx} tokens (ai config context_size)")
        stats = GenerationStats(prompt_tokens=len(tokens))
        self.last_stats = stats
        sampler = self._make_sampler(opts)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = opts.stop
        hold = max((len(s) for s in stop), default=0)
        pending = ""  # text held back while it could still be the start of a stop string
        t0 = time.perf_counter()
        t_first = None
        try:
            stats.cached_tokens = self._reuse_prefix(tokens)
            self._decode(tokens[stats.cached_tokens:], cancel)
            t_prompt = time.perf_counter()
            evaluated = len(tokens) - stats.cached_tokens
            stats.prompt_tps = evaluated / max(t_prompt - t0, 1e-9)
            for _ in range(max_new):
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                logits_p = C.llama_get_logits_ith(self._ctx, -1)
                logits = np.ctypeslib.as_array(logits_p, shape=(self.n_vocab,))
                top = float(logits.max())
                lse = top + math.log(float(np.exp(logits - top).sum()))
                tok = C.llama_sampler_sample(sampler, self._ctx, -1)
                logprob = float(logits[tok]) - lse
                if C.llama_vocab_is_eog(self._vocab, tok):
                    stats.finish_reason = "stop"
                    break
                text = decoder.decode(self._piece(tok))
                stats.completion_tokens += 1
                stats.logprobs.append(logprob)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                if stop:
                    pending += text
                    hit = min((pending.find(s) for s in stop if s in pending), default=-1)
                    if hit >= 0:
                        if pending[:hit]:
                            yield Token(tok, pending[:hit], logprob)
                        stats.finish_reason = "stop"
                        return
                    text, pending = pending[:max(0, len(pending) - hold)], pending[max(0, len(pending) - hold):]
                if text:
                    yield Token(tok, text, logprob)
                self._decode([tok], cancel)
            else:
                stats.finish_reason = "length"
            if pending:
                yield Token(-1, pending, 0.0)
        except Cancelled:
            stats.finish_reason = "cancelled"
        finally:
            C.llama_sampler_free(sampler)
            if stats.logprobs:
                stats.mean_logprob = float(np.mean(stats.logprobs))
            if t_first is not None and stats.completion_tokens > 1:
                stats.gen_tps = (stats.completion_tokens - 1) / max(time.perf_counter() - t_first, 1e-9)

    def complete(self, prompt: str | list[dict], opts: SamplingOptions | None = None,
                 **kwargs) -> tuple[str, list[Token], GenerationStats]:
        tokens = list(self.generate(prompt, opts, **kwargs))
        return "".join(t.text for t in tokens), tokens, self.last_stats

    def bench(self, pp: int = 128, tg: int = 32, cancel: threading.Event | None = None) -> dict:
        """llama-bench style: prompt processing of `pp` tokens in one batch, then generation of
        `tg` tokens one at a time; tokens per second for each (the KV cache is cleared).
        Raises Cancelled if `cancel` is set meanwhile."""
        pp = min(pp, self.n_ctx - tg - 1)
        C.llama_memory_clear(self._memory, True)
        self._cached = []
        ids = [int(i) for i in np.random.default_rng(0).integers(0, self.n_vocab, size=pp)]
        try:
            t0 = time.perf_counter()
            self._decode(ids, cancel)
            t1 = time.perf_counter()
            tok = ids[-1]
            for _ in range(tg):
                self._decode([tok], cancel)
            t2 = time.perf_counter()
        finally:
            C.llama_memory_clear(self._memory, True)
            self._cached = []
        return {"pp": pp, "tg": tg, "pp_tps": pp / (t1 - t0), "tg_tps": tg / (t2 - t1),
                "threads": self.n_threads}

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context, the adapters and the model, in that order. Idempotent."""
        if self._ctx:
            C.llama_free(self._ctx)
            self._ctx = None
        for handle in self._adapters.values():
            C.llama_adapter_lora_free(handle)
        self._adapters.clear()
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
