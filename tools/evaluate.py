"""hublab-tools eval: perplexity of a GGUF on a text file, through llama.cpp.

Usage: hublab-tools eval MODEL.gguf TEXT.txt [--ctx N] [--chunks N] [--threads N]
                        [--adapter LORA.gguf]

Scored like llama.cpp's llama-perplexity: the text is tokenized once and cut into chunks of --ctx
tokens; each chunk is evaluated from an empty context (its first token replaced by BOS when the
model adds one) and only the second half of each chunk is scored, so every scored token sees at
least ctx/2 tokens of context. Prints PPL = exp(mean negative log-likelihood) +/- its standard
error (delta method: ppl * stddev(nll) / sqrt(n - 1)). Lower is better; compare quantizations of
one model on the same text and --ctx only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hublabio.errors import HublabError
from hublabio_tools.common import ToolError


class EvalError(ToolError):
    code = "eval"


@dataclass
class Perplexity:
    ppl: float
    stderr: float
    tokens_scored: int
    chunks: int
    n_ctx: int
    seconds: float

    def __str__(self) -> str:
        return (f"PPL = {self.ppl:.4f} +/- {self.stderr:.4f} ({self.chunks} chunks x {self.n_ctx} "
                f"tokens, {self.tokens_scored} scored, {self.seconds:.1f} s)")


def perplexity(model: str | os.PathLike, text: str, *, n_ctx: int = 512, n_chunks: int | None = None,
               threads: int = 2, progress=None,
               adapter: str | os.PathLike | None = None) -> Perplexity:
    """`adapter`: a LoRA adapter GGUF applied over `model` (an expert's perplexity)."""
    from hublabio_tools.llama_context import LlamaModel

    if n_ctx < 8:
        raise EvalError(f"--ctx {n_ctx} is too small (at least 8)")
    t0 = time.perf_counter()
    with LlamaModel(model, n_ctx=n_ctx, threads=threads, lora=adapter) as m:
        tokens = m.tokenize(text, add_special=True)
        available = len(tokens) // n_ctx
        if available < 1:
            raise EvalError(f"the text has {len(tokens)} tokens; --ctx {n_ctx} needs at least "
                            f"{n_ctx} (give more text or a smaller --ctx)")
        n = available if not n_chunks else min(n_chunks, available)
        first = n_ctx // 2
        nlls = []
        for i in range(n):
            start = i * n_ctx
            chunk = tokens[start:start + n_ctx].copy()
            if m.add_bos:
                chunk[0] = m.bos
            logits = m.logits(chunk, first=first)[:-1].astype(np.float64)  # rows first..n_ctx-2
            target = tokens[start + first + 1:start + n_ctx]
            mx = logits.max(axis=1)
            lse = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))
            nlls.append(lse - logits[np.arange(len(target)), target])
            if progress:
                so_far = np.concatenate(nlls)
                progress(i + 1, n, math.exp(so_far.mean()))
    nll = np.concatenate(nlls)
    if not np.all(np.isfinite(nll)):
        raise EvalError(f"{model}: the model produced non-finite logits")
    mean = float(nll.mean())
    ppl = math.exp(mean)
    stderr = ppl * float(nll.std()) / math.sqrt(max(len(nll) - 1, 1))
    return Perplexity(ppl=ppl, stderr=stderr, tokens_scored=len(nll), chunks=n, n_ctx=n_ctx,
                      seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF model")
    ap.add_argument("text", type=Path, help="plain-text file to score")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=0, help="at most this many chunks (default all)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--adapter", type=Path, help="a LoRA adapter GGUF to apply over MODEL (score "
                                                 "an expert: base + adapter)")
    args = ap.parse_args(argv)
    for path in (args.model, args.adapter):
        if path is not None and not path.is_file():
            print(f"hublab-tools eval: {path}: no such file", file=sys.stderr)
            return 1
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"hublab-tools eval: {args.text}: cannot read text ({err})", file=sys.stderr)
        return 1

    def progress(i, n, ppl):
        print(f"\r[{i}/{n}] {ppl:.4f}", end="", file=sys.stderr, flush=True)

    try:
        res = perplexity(args.model, text, n_ctx=args.ctx, n_chunks=args.chunks or None,
                         threads=args.threads, progress=progress, adapter=args.adapter)
    except (HublabError, RuntimeError) as err:
        print(f"\nhublab-tools eval: {err}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    print(f"{args.model.name}" + (f" + {args.adapter.name}" if args.adapter else "") + f": {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
