"""A model and one context through hublabio.llama, for the workstation verbs that need more than
chat: logits for every scored position (eval), an eval callback that sees every matrix
multiplication (imatrix), and greedy generation (quantization checks).
The C handles are hublabio.llama's; this only arranges them for scoring."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Callable

import numpy as np

from hublabio.llama import Context, Model, owned


class LlamaModel:
    """`with LlamaModel(path, n_ctx=512) as m: m.tokenize(text); m.logits(tokens, first)`."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, threads: int = 2,
                 eval_callback: Callable[[int, bool], bool] | None = None, repack="auto",
                 kv_f32: bool = False, lora: str | os.PathLike | None = None,
                 flash_attn: bool | None = None):
        """`kv_f32`: an F32 KV cache and no flash attention (whose CPU kernel rounds through
        F16), for logits comparisons against a float reference;
        `lora`: an adapter GGUF applied at scale 1; `flash_attn`: None = llama.cpp's auto."""
        self.path = os.fspath(path)
        self._stack = ExitStack()
        try:
            self.model = owned(self._stack, Model(path, repack=repack))
            self.ctx = owned(self._stack, Context(self.model, n_ctx=n_ctx, n_batch=n_ctx,
                                                  threads=threads, eval_callback=eval_callback,
                                                  kv_type=0 if kv_f32 else None,
                                                  flash_attn=False if kv_f32 else flash_attn))
            if lora is not None:
                self.ctx.set_adapters([(self.model.adapter(lora), 1.0)])
        except BaseException:
            self._stack.close()
            raise
        self.n_ctx = n_ctx
        self.n_vocab = self.model.n_vocab
        self.add_bos = self.model.add_bos
        self.bos = self.model.bos

    def tokenize(self, text: str, add_special: bool = True, special: bool = False) -> np.ndarray:
        """Token ids; `special` parses special-token text such as <|im_start|>."""
        return np.asarray(self.model.tokenize(text, add_special=add_special,
                                              parse_special=special), dtype=np.int32)

    def piece(self, token: int) -> str:
        return self.model.token_text(int(token))

    def logits(self, tokens, first: int = 0) -> np.ndarray:
        """Fresh sequence: decode `tokens` in one batch and return the logits of positions
        first..len-1 as float32 [n, n_vocab] (a copy)."""
        self.ctx.clear()
        n_out = self.ctx.decode([int(t) for t in tokens], 0, outputs_from=first)
        return self.ctx.all_logits(n_out)

    def greedy(self, tokens, n_new: int) -> tuple[list[int], np.ndarray]:
        """Greedy-generate n_new tokens after `tokens`; returns them and their logits rows."""
        self.ctx.clear()
        self.ctx.decode([int(t) for t in tokens], 0)
        pos = len(tokens)
        out, rows = [], []
        for _ in range(n_new):
            row = self.ctx.logits(-1).copy()
            tok = int(np.argmax(row))
            out.append(tok)
            rows.append(row)
            self.ctx.decode([tok], pos)
            pos += 1
        return out, np.stack(rows)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
