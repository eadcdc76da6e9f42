"""One llama.cpp model + context through llama-cpp-python's low-level API, for the workstation
verbs that need more than chat: logits for every scored position (eval), an eval callback that
sees every matrix multiplication (imatrix), and greedy generation (quantization checks).
C handles are owned here and freed deterministically by close() / the context manager."""

from __future__ import annotations

import collections
import ctypes
import os
import sys
from typing import Callable

import numpy as np

import llama_cpp as lc

_log_tail: collections.deque[str] = collections.deque(maxlen=200)
_log_echo = False
_last_level = 0
GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 3, 4, 5  # ggml.h enum ggml_log_level


@lc.llama_log_callback
def _log_callback(level, text, user_data):  # keeps llama.cpp quiet; errors are kept for messages
    global _last_level
    msg = text.decode("utf-8", "replace") if text else ""
    if level != GGML_LOG_CONT:
        _last_level = level
    if _last_level in (GGML_LOG_WARN, GGML_LOG_ERROR):
        _log_tail.append(msg)
    if _log_echo:
        print(msg, end="", file=sys.stderr)


def quiet_llama_logs(echo: bool = False) -> None:
    """Route llama.cpp's log through this module (silent unless echo); recent warnings/errors are
    available from recent_llama_errors()."""
    global _log_echo
    _log_echo = echo
    lc.llama_log_set(_log_callback, ctypes.c_void_p(0))


def recent_llama_errors(n: int = 8) -> list[str]:
    lines = [line.strip(" =\n") for line in _log_tail]
    lines = [line for line in lines if line]
    return lines[-n:]


class LlamaModel:
    """`with LlamaModel(path, n_ctx=512) as m: m.tokenize(text); m.logits(tokens, first)`."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, threads: int = 2,
                 eval_callback: Callable[[int, bool], bool] | None = None):
        quiet_llama_logs()
        lc.llama_backend_init()
        self.path = os.fspath(path)
        self._model = self._ctx = None
        mparams = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            detail = "; ".join(recent_llama_errors(3)) or "llama.cpp could not load it"
            raise RuntimeError(f"{self.path}: failed to load model: {detail}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.bos = lc.llama_vocab_bos(self._vocab)
        self.n_ctx = n_ctx
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        self._cb = None
        if eval_callback is not None:
            self._cb = lc.ggml_backend_sched_eval_callback(
                lambda t, ask, _ud: bool(eval_callback(t, bool(ask))))
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = None
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise RuntimeError(f"{self.path}: failed to create a llama.cpp context (n_ctx={n_ctx})")
        self._batch = lc.llama_batch_init(n_ctx, 0, 1)

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, False)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    # -- decoding ---------------------------------------------------------------------------
    def _decode(self, tokens, start_pos: int, want_from: int) -> int:
        b = self._batch
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit a batch of {self.n_ctx}")
        n_out = 0
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            want = start_pos + i >= want_from
            b.logits[i] = 1 if want else 0
            n_out += want
        b.n_tokens = n
        rc = lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc})")
        return n_out

    def reset(self) -> None:
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)

    def logits(self, tokens, first: int = 0) -> np.ndarray:
        """Fresh sequence: decode `tokens` in one batch and return the logits of positions
        first..len-1 as float32 [n, n_vocab] (a copy)."""
        self.reset()
        n_out = self._decode(tokens, 0, first)
        ptr = lc.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(
            n_out, self.n_vocab).copy()

    def greedy(self, tokens, n_new: int) -> tuple[list[int], np.ndarray]:
        """Greedy-generate n_new tokens after `tokens`; returns them and their logits rows."""
        self.reset()
        self._decode(tokens, 0, len(tokens) - 1)
        pos = len(tokens)
        out, rows = [], []
        for _ in range(n_new):
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, -1),
                                        shape=(self.n_vocab,)).copy()
            tok = int(np.argmax(row))
            out.append(tok)
            rows.append(row)
            self._decode([tok], pos, pos)
            pos += 1
        return out, np.stack(rows)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
