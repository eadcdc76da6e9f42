"""Generation on one llama.cpp model, in three layers (the C handles are hublabio.llama's):

1. `Engine.steps()` — the token stepper: reuse the KV cache of the longest common prefix, decode
   the rest of the prompt, then per step compute the sampled token's log-probability (and the
   top-N alternatives when asked) from the raw logits, sample, and decode it.
2. hublabio.textstream.TextStream — tokens → text pieces (UTF-8, stop strings), pure.
3. `Engine.generate()` — a generator of `Piece`s whose *return value* is the GenerationStats;
   `collect()` runs one to the end and returns (text, pieces, stats).

LoRA adapters are loaded once per model and switched per request on the live context; a prefix
computed under one adapter set is never reused under another. An engine loaded with
`parallel = N` serves N generations at once, one per slot (a sequence of the context with its
own KV cache and cached prefix); their decodes are batched by hublabio.batching's decoder
thread. With N = 1 it serves one generation at a time, decoding in the calling thread unless
it was given the decoder (the pool gives it under a batching daemon). The pool's lease
enforces both. Remote models (hublabio.remote) implement the same `generate()`
interface.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Generator, Iterator, Sequence

import numpy as np

from hublabio import params
from hublabio.errors import Cancelled, ContextOverflow, HublabError, ProtocolError
from hublabio.llama import Context, Model, SamplerChain, owned
from hublabio.llama.chat import ChatTemplate
from hublabio.llama.handles import adapter_key
from hublabio.params import schema_dataclass
from hublabio.penalties import LogitEdits
from hublabio.textstream import Piece, TextStream, TokenInfo


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil can fail inside odd containers
        n = None
    return max(1, n or os.cpu_count() or 1)


@schema_dataclass(params.INFERENCE, where=params.REQUEST)
class SamplingOptions:
    """Every option a generation takes (hublabio.params.INFERENCE, where "request"); remote
    models forward each one or refuse it."""
    logprobs: bool = True   # each token's log-probability (False skips the log-softmax)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a grammar: the answer is argmax of the logits (after the penalties
        and bias, which hublabio.penalties applies), as llama.cpp's greedy sampler picks."""
        return self.temperature <= 0 and self.grammar is None

    @classmethod
    def from_inference(cls, inf, **overrides) -> "SamplingOptions":
        """Build from a config.InferenceConfig; keyword overrides win when not None."""
        names = {f.name for f in fields(cls)}
        values = {k: getattr(inf, k) for k in names if hasattr(inf, k)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        return cls(**{k: v for k, v in values.items() if k in names})


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


@dataclass(frozen=True)
class Step:
    """One sampled token: its id, log-probability and top alternatives."""
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class _Lane:
    """One llama.cpp context of the engine: its slots' sequences, and the decoder's state for
    it (None: decodes in the calling thread)."""
    ctx: Context
    batch: object | None  # hublabio.batching.BatchState
    n_slots: int


@dataclass(eq=False)
class _Slot:
    """One sequence of a context: the tokens whose KV it holds, under which adapters."""
    seq: int
    lane: _Lane
    cached: list[int] = field(default_factory=list)
    adapters: tuple = ()       # ((LoraAdapter, scale), ...) its KV was computed under
    busy: bool = False
    last_used: float = 0.0


@dataclass
class _DirectTicket:
    """A decode run in the calling thread (one slot): nothing to release."""
    index: int
    first_out: int
    n_out: int

    def release(self) -> None:
        pass


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


Generation = Generator[Piece, None, GenerationStats]


def map_pieces(gen: Generation, fn):
    """Yield fn(piece) for each Piece of a generation; return its GenerationStats. Lets a
    generator pass a generation on (`stats = yield from map_pieces(gen, to_event)`)."""
    while True:
        try:
            piece = next(gen)
        except StopIteration as done:
            return done.value
        yield fn(piece)


def collect(gen: Generation) -> tuple[str, list[Piece], GenerationStats]:
    """Run a generation to its end: (text, pieces, stats)."""
    pieces: list[Piece] = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return "".join(p.text for p in pieces), pieces, done.value


def log_softmax_at(logits: np.ndarray, ids, scratch: np.ndarray | None = None):
    """log softmax(logits)[ids], without allocating when `scratch` (same shape) is given."""
    top = float(logits.max())
    buf = np.subtract(logits, top, out=scratch)
    np.exp(buf, out=buf)
    return logits[ids] - (top + math.log(float(buf.sum())))


class Engine:
    """A loaded GGUF model with one context of `n_ctx` tokens."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, threads: int | None = None,
                 threads_batch: int | None = None, n_batch: int = 512, mmap: bool = True,
                 mlock: bool = False, repack="auto", parallel: int = 1, decoder=None):
        """`n_ctx` is each slot's context; `parallel` slots share the weights and batch their
        decodes on `decoder` (default with parallel > 1: the process's one hublabio.batching
        decoder; with one slot and no decoder, decodes run in the calling thread)."""
        self.path = Path(path)
        self.parallel = max(1, int(parallel))
        self._stack = ExitStack()
        try:
            self.model = owned(self._stack, Model(self.path, mmap=mmap, mlock=mlock,
                                                  repack=repack))
            self.threads = threads or physical_cores()
            self.threads_batch = threads_batch or self.threads
            self.ctx = owned(self._stack, Context(self.model, n_ctx=n_ctx * self.parallel,
                                                  n_batch=n_batch, n_seq_max=self.parallel,
                                                  threads=self.threads,
                                                  threads_batch=self.threads_batch))
        except BaseException:
            self._stack.close()
            raise
        self.n_ctx, self.n_batch = self.ctx.n_ctx // self.parallel, self.ctx.n_batch
        self.n_vocab, self.n_ctx_train = self.model.n_vocab, self.model.n_ctx_train
        self.architecture, self.chat_template = self.model.architecture, self.model.chat_template
        self.n_params, self.model_size = self.model.n_params, self.model.size
        self._bos_text = self.model.token_text(self.model.bos)
        self._eos_text = self.model.token_text(self.model.eos)
        self._formatter = None
        self._slot_cond = threading.Condition()
        if decoder is None and self.parallel > 1:
            from hublabio.batching import shared_decoder

            decoder = shared_decoder()
        self._decoder = decoder  # None: one slot, decodes in the calling thread
        lane = self._lane(self.ctx, self.parallel)
        self._lanes = [lane]
        self._slots = [_Slot(i, lane) for i in range(self.parallel)]

    def _lane(self, ctx: Context, n_slots: int) -> _Lane:
        batch = None
        if self._decoder is not None:  # every decode on the decoder's thread, batched
            batch = self._decoder.attach(ctx, self.n_batch)
            self._stack.callback(self._decoder.detach, batch)  # before the context goes
        return _Lane(ctx, batch, n_slots)

    def add_context(self) -> None:
        """One more llama.cpp context over the same weights, with one slot of n_ctx tokens
        (its own KV cache and compute buffer). llama.cpp applies LoRA adapters per context, and
        a context that changes its adapter set re-reserves its compute graph (~5 ms for
        SmolLM2, docs/BENCHMARKS.md): with a context per adapter set, experts with different
        adapters each keep theirs applied. Needs the batching decoder (every context decodes
        on its one thread)."""
        if self._decoder is None:
            raise HublabError(f"{self.path.name}: another context needs continuous batching "
                              "(ai config batch_mode continuous)")
        ctx = owned(self._stack, Context(self.model, n_ctx=self.n_ctx, n_batch=self.n_batch,
                                         n_seq_max=1, threads=self.threads,
                                         threads_batch=self.threads_batch))
        lane = self._lane(ctx, 1)
        with self._slot_cond:
            self._lanes.append(lane)
            self._slots.append(_Slot(0, lane))
            self._slot_cond.notify()

    @property
    def contexts(self) -> int:
        return len(self._lanes)

    @property
    def slots(self) -> int:
        return len(self._slots)

    # ---- what the pool and `ai info` show --------------------------------------------------
    @property
    def buffers(self) -> dict[str, float]:
        return self.model.buffers

    @property
    def repack(self):
        return self.model.policy

    @property
    def adapters(self) -> list[Path]:
        return self.model.adapters

    # ---- text ------------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.model.token_text(token)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.model.detokenize(ids)

    def format_chat(self, messages: list[dict], cancel: threading.Event | None = None) -> str:
        """Render chat messages with the GGUF's own chat template (Jinja2), ready for the
        assistant's turn. Models without a template get a plain `role: content` transcript."""
        if self._formatter is None:
            self._formatter = ChatTemplate(self.chat_template, bos=self._bos_text,
                                           eos=self._eos_text)
        return self._formatter.render(messages, cancel)

    def prompt_tokens(self, prompt: str | list[dict],
                      cancel: threading.Event | None = None) -> list[int]:
        text = self.format_chat(prompt, cancel) if isinstance(prompt, list) else prompt
        add_bos = self.model.add_bos
        if add_bos and self._bos_text and text.startswith(self._bos_text):
            add_bos = False  # the template already wrote BOS
        return self.tokenize(text, add_bos=add_bos, special=True)

    # ---- adapters --------------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load a LoRA adapter GGUF over this model once; later requests only switch to it."""
        self.model.adapter(path)

    def _adapters(self, path, scale: float) -> tuple:
        return ((self.model.adapter(path), scale),) if path else ()

    def _use_adapter(self, path, scale: float, slot: "_Slot | None" = None) -> None:
        """Make `slot` (default: the first) generate under this adapter set: its cached prefix
        is forgotten when the set changes (KV computed under another adapter is stale). With
        one slot the context switches now; with several the decoder switches per batch."""
        slot = slot or self._slots[0]
        adapters = self._adapters(path, scale)
        if adapter_key(adapters) != adapter_key(slot.adapters):
            slot.cached = []
        slot.adapters = adapters
        if self._decoder is None:
            slot.lane.ctx.set_adapters(list(slot.adapters))

    # ---- slots -----------------------------------------------------------------------------
    def _take_slot(self, tokens: Sequence[int], key: tuple) -> "_Slot":
        """A free slot, preferring (1) the longest cached prefix of `tokens` under the same
        adapter set; (2) one whose own cached prefix is not one under another set (losing it
        costs that expert a prompt evaluation); (3) one whose context has this set applied now;
        (4) one whose context's other slots hold no prefix under another set (changing the
        context's set costs a graph reservation: with several contexts each set finds its
        own); (5) the least recently used. Waits while all are busy."""
        def held(sl: _Slot) -> bool:  # a prefix under another adapter set
            return bool(sl.cached) and adapter_key(sl.adapters) != key

        def score(sl: _Slot):
            same = adapter_key(sl.adapters) == key
            others = sum(held(o) for o in self._slots if o.lane is sl.lane and o is not sl)
            return (_common_prefix(sl.cached, tokens) if same else -1, not held(sl),
                    sl.lane.ctx.adapter_set == key, -others, -sl.last_used)

        with self._slot_cond:
            while True:
                free = [sl for sl in self._slots if not sl.busy]
                if free:
                    slot = max(free, key=score)
                    slot.busy = True
                    return slot
                self._slot_cond.wait()

    def _give_slot(self, slot: "_Slot") -> None:
        with self._slot_cond:
            slot.busy = False
            slot.last_used = time.monotonic()
            if self._decoder is not None:
                self._decoder.end(slot.lane.batch, slot.seq)
            self._slot_cond.notify()

    @staticmethod
    def _kv(slot: "_Slot"):
        """Hold while changing the slot's KV cache (a batched decode may be running)."""
        batch = slot.lane.batch
        return batch.lock if batch is not None else contextlib.nullcontext()

    # ---- layer 1: the token stepper -------------------------------------------------------
    def _reuse_prefix(self, tokens: list[int], slot: "_Slot") -> int:
        """Keep the KV cache of the longest common prefix (the last prompt token is always
        evaluated again, to get its logits)."""
        n = min(_common_prefix(slot.cached, tokens), len(tokens) - 1)
        with self._kv(slot):
            if not slot.lane.ctx.keep_prefix(n, seq=slot.seq):
                n = 0
                slot.lane.ctx.keep_prefix(0, seq=slot.seq)
        slot.cached = slot.cached[:n]
        return n

    def _decode(self, tokens: Sequence[int], cancel: threading.Event | None,
                slot: "_Slot | None" = None):
        """Decode `tokens` after `slot`'s cached ones, in chunks; returns the last chunk's
        ticket (`.index`: the batch row of its logits; `.release()` once they are read)."""
        slot = slot or self._slots[0]
        # with several slots, leave room in each batch for the others' next tokens
        size = self.n_batch - (slot.lane.n_slots - 1)
        ticket = None
        for start in range(0, len(tokens), size):
            if ticket is not None:
                ticket.release()
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            ticket = self._decode_chunk(list(tokens[start:start + size]), slot)
        return ticket

    def _decode_chunk(self, chunk: list[int], slot: "_Slot", *, all_outputs: bool = False):
        pos = len(slot.cached)
        outputs_from = pos if all_outputs else None
        try:
            if self._decoder is None:
                ticket = _DirectTicket(-1, 0, slot.lane.ctx.decode(chunk, pos,
                                                                  outputs_from=outputs_from))
            else:
                ticket = self._decoder.submit(slot.lane.batch, slot.seq, chunk, pos,
                                              outputs_from=outputs_from, adapters=slot.adapters,
                                              embeddings=all_outputs)
        except HublabError:
            slot.cached = []
            raise
        except RuntimeError as exc:  # the decoder's: the model was unloaded meanwhile
            slot.cached = []
            raise HublabError(str(exc)) from None
        slot.cached.extend(chunk)
        return ticket

    def steps(self, tokens: list[int], opts: "SamplingOptions", stats: GenerationStats,
              cancel: threading.Event | None = None,
              slot: "_Slot | None" = None) -> Iterator[Step]:
        """Evaluate the prompt `tokens` (reusing the slot's cached prefix), then yield sampled
        tokens until end-of-generation, max_tokens or the context's end. Sets stats' prompt
        fields. The logits are read (sampled, log-probabilities) before a step is yielded."""
        slot = slot or self._slots[0]
        ctx = slot.lane.ctx
        max_new = min(opts.max_tokens, self.n_ctx - len(tokens))
        t0 = time.perf_counter()
        stats.cached_tokens = self._reuse_prefix(tokens, slot)
        ticket = self._decode(tokens[stats.cached_tokens:], cancel, slot)
        stats.prompt_tps = (len(tokens) - stats.cached_tokens) / max(time.perf_counter() - t0, 1e-9)
        with ExitStack() as stack:
            stack.callback(lambda: ticket.release())
            # penalties and bias touch a few logits: edited here (hublabio.penalties), not by
            # llama.cpp's samplers, which visit the whole vocabulary per token under the lock
            edits = LogitEdits(repeat_penalty=opts.repeat_penalty,
                               frequency_penalty=opts.frequency_penalty,
                               presence_penalty=opts.presence_penalty,
                               logit_bias=opts.logit_bias, n_vocab=self.n_vocab)
            sampler = None if opts.plain_greedy else stack.enter_context(SamplerChain(
                self.model, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                seed=opts.seed, grammar=opts.grammar))
            scratch = np.empty(self.n_vocab, dtype=np.float32)
            for _ in range(max_new):
                logits = ctx.logits(ticket.index)
                edit = edits.apply(logits) if edits.active else None
                # plain greedy: argmax, as llama.cpp's greedy sampler picks (first maximum),
                # without copying the vocabulary into a candidates array under the lock
                if sampler is None:
                    tok = int(np.argmax(logits))
                else:
                    with self._kv(slot):  # llama.cpp's sampler reads the context: one at a time
                        tok = sampler.sample(ctx, ticket.index)
                if edit is not None:  # log-probabilities are the model's own
                    edits.restore(logits, edit)
                edits.accept(tok)
                top: tuple = ()
                logprob = math.nan
                if opts.top_logprobs:
                    k = min(opts.top_logprobs, self.n_vocab)
                    ids = np.argpartition(logits, -k)[-k:]
                    ids = ids[np.argsort(-logits[ids])]
                    lps = log_softmax_at(logits, np.append(ids, tok), scratch)
                    top = tuple((int(i), float(lp)) for i, lp in zip(ids, lps[:-1]))
                    logprob = float(lps[-1])
                elif opts.logprobs:
                    logprob = float(log_softmax_at(logits, tok, scratch))
                ticket.release()  # the logits are read: the next batch may overwrite them
                if self.model.is_eog(tok):
                    stats.finish_reason = "stop"
                    return
                yield Step(tok, logprob, top)
                ticket = self._decode([tok], cancel, slot)
            stats.finish_reason = "length"

    # ---- layer 3: generate ----------------------------------------------------------------
    def generate(self, prompt: str | list[dict], opts: SamplingOptions | None = None, *,
                 adapter: str | os.PathLike | None = None, adapter_scale: float = 1.0,
                 cancel: threading.Event | None = None) -> Generation:
        """Stream the answer to a raw prompt (str) or chat messages (list of dicts) as Pieces;
        the generator's return value is the GenerationStats."""
        opts = opts or SamplingOptions()
        self.ctx._live()
        try:
            tokens = self.prompt_tokens(prompt, cancel)
        except Cancelled:  # while the chat template rendered
            return GenerationStats(finish_reason="cancelled")
        if not tokens:  # an empty raw prompt: start from beginning-of-text, never from the
            if self.model.bos < 0:  # previous request's context
                raise ProtocolError("the prompt is empty and this model has no BOS token to "
                                    "start from")
            tokens = [self.model.bos]
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"prompt of {len(tokens)} tokens does not fit the context of "
                                  f"{self.n_ctx} tokens (ai config context_size)")
        stats = GenerationStats(prompt_tokens=len(tokens))
        text = TextStream(opts.stop)
        t0 = time.perf_counter()
        t_first = None
        slot = self._take_slot(tokens, adapter_key(self._adapters(adapter, adapter_scale)))
        try:
            self._use_adapter(adapter, adapter_scale, slot)
            for step in self.steps(tokens, opts, stats, cancel, slot):
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                stats.completion_tokens += 1
                if not math.isnan(step.logprob):
                    stats.logprobs.append(step.logprob)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                top = tuple((i, self.model.token_text(i), lp) for i, lp in step.top)
                yield from text.push(TokenInfo(step.id, self.model.piece(step.id), step.logprob,
                                               top))
                if text.stopped:
                    stats.finish_reason = "stop"
                    break
            yield from text.finish()
        except Cancelled:
            stats.finish_reason = "cancelled"
        finally:
            self._give_slot(slot)
            if stats.logprobs:
                stats.mean_logprob = float(np.mean(stats.logprobs))
            if t_first is not None and stats.completion_tokens > 1:
                stats.gen_tps = (stats.completion_tokens - 1) / max(time.perf_counter() - t_first,
                                                                    1e-9)
        return stats

    def complete(self, prompt: str | list[dict], opts: SamplingOptions | None = None,
                 **kwargs) -> tuple[str, list[Piece], GenerationStats]:
        return collect(self.generate(prompt, opts, **kwargs))

    def bench(self, pp: int = 128, tg: int = 32, cancel: threading.Event | None = None) -> dict:
        """llama-bench style: prompt processing of `pp` tokens in one batch, then generation of
        `tg` tokens one at a time; tokens per second for each (the slot's KV cache is cleared).
        Raises Cancelled if `cancel` is set meanwhile."""
        pp = min(pp, self.n_ctx - tg - 1)
        ids = [int(i) for i in np.random.default_rng(0).integers(0, self.n_vocab, size=pp)]
        with self._scratch_slot() as slot:
            t0 = time.perf_counter()
            self._decode(ids, cancel, slot).release()
            t1 = time.perf_counter()
            tok = ids[-1]
            for _ in range(tg):
                self._decode([tok], cancel, slot).release()
            t2 = time.perf_counter()
        return {"pp": pp, "tg": tg, "pp_tps": pp / (t1 - t0), "tg_tps": tg / (t2 - t1),
                "threads": self.threads, "threads_batch": self.threads_batch}

    @contextlib.contextmanager
    def _scratch_slot(self, adapter=None, adapter_scale: float = 1.0):
        """A slot with an empty KV cache for work that is not a generation (bench, embed);
        emptied again afterwards, its prefix cache forgotten."""
        def empty():
            with self._kv(slot):
                slot.lane.ctx.keep_prefix(0, seq=slot.seq)
            slot.cached = []

        slot = self._take_slot((), ())
        try:
            self._use_adapter(adapter, adapter_scale, slot)
            empty()
            yield slot
        finally:
            empty()
            self._give_slot(slot)

    # ---- embeddings ------------------------------------------------------------------------
    EMBED_CHUNK = 16  # tokens per decode: llama.cpp computes logits for every output too, and
                      # keeps its output buffer at the largest size asked (vocab x chunk floats)

    def embed_tokens(self, text: str) -> list[int]:
        """An input to embed as tokens: BOS as the model wants it, special tokens as text."""
        return self.tokenize(text, add_bos=self.model.add_bos, special=False)

    def embed(self, tokens: Sequence[int], *, adapter: str | os.PathLike | None = None,
              adapter_scale: float = 1.0, cancel: threading.Event | None = None) -> np.ndarray:
        """The input's embedding: the mean of the final hidden states (after the output norm)
        of its tokens, L2-normalized, float32 [n_embd]. Decoder models only (llama.cpp pooling
        NONE). Runs in a slot whose KV cache is emptied before and after (its cached prefix is
        forgotten)."""
        if self.ctx.pooling != 0:  # LLAMA_POOLING_TYPE_NONE
            raise ProtocolError(f"{self.path.name}: an encoder with its own pooling (type "
                                f"{self.ctx.pooling}); only decoder models embed here")
        if not tokens:
            raise ProtocolError("an empty input has no embedding")
        if len(tokens) > self.n_ctx:
            raise ContextOverflow(f"input of {len(tokens)} tokens does not fit the context of "
                                  f"{self.n_ctx} tokens (ai config context_size)")
        self.ctx._live()
        total = np.zeros(self.model.n_embd, dtype=np.float64)
        with self._scratch_slot(adapter, adapter_scale) as slot:
            ctx = slot.lane.ctx
            if self._decoder is None:
                ctx.set_embeddings(True)
            try:
                for start in range(0, len(tokens), self.EMBED_CHUNK):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled")
                    chunk = [int(t) for t in tokens[start:start + self.EMBED_CHUNK]]
                    ticket = self._decode_chunk(chunk, slot, all_outputs=True)
                    rows = ctx.embeddings(ticket.first_out + ticket.n_out)[ticket.first_out:]
                    ticket.release()
                    total += rows.sum(axis=0, dtype=np.float64)
            finally:
                if self._decoder is None:
                    ctx.set_embeddings(False)
        mean = total / len(tokens)
        norm = float(np.linalg.norm(mean))
        return (mean / norm if norm > 0 else mean).astype(np.float32)

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context, then the adapters and the model. Idempotent."""
        self._stack.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
