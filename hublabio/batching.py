"""Continuous batching: the generations on one llama.cpp context decode together.

An engine loaded with `parallel = N` has a context of N sequences (slots), each with its own
KV cache of n_ctx tokens (and maybe more contexts of one slot each: Engine.add_context). Every
generation on it runs in its own thread and, instead of calling llama_decode, submits its next
tokens to the one `Decoder` thread and waits. The decoder packs what is pending into one batch
— the oldest submission first, then every other one under the same adapter set while the batch
has room — decodes once, and wakes each with the batch row of its logits. A new request joins
at the next step; a finished one leaves at once.

Safety of the shared output buffer: between its decode and the moment it has read its logits
(sampling, log-probabilities), a slot is *reading*, and no decode of that context starts.
Once it has read them it releases, yields its token to its consumer and submits the next one;
a slow consumer therefore holds nobody up for more than `GATHER_S`, the time the decoder waits
for the other generating slots to submit before it decodes without them.

LoRA adapters apply per context, not per sequence: submissions under another adapter set wait
for the next batch, which takes the oldest waiting submission's set, so two experts with
different adapters alternate step by step (MoE-R has such experts take turns instead:
moe.MoE.batches_together). Their prefixes stay in their own slots, so a switch back costs no
prompt evaluation; with a context per adapter set (Engine.add_context: each context is a
state of its own here) it costs no re-application of the adapters either (docs/BENCHMARKS.md
measures both).

One Decoder (one calling thread) serves every engine: llama.cpp's OpenMP build keeps a team of
worker threads per calling thread, and teams of several threads compete for the cores.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from hublabio.llama.handles import adapter_key

GATHER_S = 0.004  # how long a pending step waits for the other generating slots to submit


@dataclass(eq=False)
class Submission:
    slot: int
    tokens: list[int]
    pos: int
    outputs_from: int | None  # positions >= this produce outputs (None: the last one only)
    adapters: tuple           # ((LoraAdapter, scale), ...) the context must have for it
    embeddings: bool = False
    order: int = 0
    t: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    index: int = -1           # batch row of the last token (llama_get_logits_ith)
    first_out: int = 0        # its first output's row among the batch's outputs
    n_out: int = 0

    @property
    def key(self) -> tuple:
        return adapter_key(self.adapters), self.embeddings


@dataclass(eq=False)
class BatchState:
    """What the decoder knows of one context (made by `Decoder.attach`)."""
    ctx: object                  # hublabio.llama.Context
    n_batch: int
    pending: list[Submission] = field(default_factory=list)
    active: set[int] = field(default_factory=set)  # slots generating now
    reading: int = 0             # submissions decoded whose logits are still being read
    lock: threading.Lock = field(default_factory=threading.Lock)  # KV ops vs decode
    embeddings_on: bool = False
    closed: bool = False


class Ticket:
    """One decoded submission: `index` is the batch row of its last token's logits; call
    `release()` once they are read (the context's next decode waits for it)."""

    def __init__(self, decoder: "Decoder", state: BatchState, sub: Submission):
        self._decoder, self._state, self.sub = decoder, state, sub
        self.index, self.first_out, self.n_out = sub.index, sub.first_out, sub.n_out
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._decoder._release(self._state)


class Decoder:
    """The thread that runs every batched llama_decode (see the module doc)."""

    def __init__(self, gather_s: float = GATHER_S):
        self.gather_s = gather_s
        self._cond = threading.Condition()
        self._states: list[BatchState] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self.batches = 0      # decodes run, and the submissions in them (for tests and stats)
        self.batched = 0

    def attach(self, ctx, n_batch: int) -> BatchState:
        state = BatchState(ctx=ctx, n_batch=n_batch)
        with self._cond:
            self._states.append(state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hublabd-decoder",
                                                daemon=True)
                self._thread.start()
        return state

    def detach(self, state: BatchState) -> None:
        with self._cond:
            state.closed = True
            if state in self._states:
                self._states.remove(state)
            for sub in state.pending:
                sub.error = RuntimeError("the model was unloaded")
                sub.done.set()
            state.pending.clear()
            self._cond.notify()

    # ---- the slots' side ---------------------------------------------------------------------
    def end(self, state: BatchState, slot: int) -> None:
        with self._cond:
            state.active.discard(slot)
            self._cond.notify()

    def submit(self, state: BatchState, slot: int, tokens: Sequence[int], pos: int, *,
               outputs_from: int | None = None, adapters: tuple = (),
               embeddings: bool = False) -> Ticket:
        """Queue `tokens` at positions pos.. of sequence `slot` and wait for their decode."""
        sub = Submission(slot, [int(t) for t in tokens], pos, outputs_from, tuple(adapters),
                         embeddings)
        with self._cond:
            if state.closed:
                raise RuntimeError("the model was unloaded")
            state.active.add(slot)
            sub.order, sub.t = next(self._order), time.monotonic()
            state.pending.append(sub)
            self._cond.notify()  # only the decoder waits on it; each slot on its own event
        sub.done.wait()
        if sub.error is not None:
            raise sub.error
        return Ticket(self, state, sub)

    def _release(self, state: BatchState) -> None:
        with self._cond:
            state.reading -= 1
            self._cond.notify()

    # ---- the decoder's side ------------------------------------------------------------------
    def _ready(self, now: float) -> tuple[BatchState | None, float | None]:
        """The context to decode now (oldest pending first), or how long to wait."""
        best, wait = None, None
        for s in self._states:
            if not s.pending or s.reading:
                continue
            waiting_slots = {p.slot for p in s.pending}
            due = s.pending[0].t + self.gather_s
            if waiting_slots >= s.active or now >= due:
                if best is None or s.pending[0].order < best.pending[0].order:
                    best = s
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return best, wait

    def _take(self, s: BatchState) -> list[Submission]:
        """The oldest submission, then the others under its adapter set that fit the batch."""
        first = s.pending[0]
        group, room = [], s.n_batch
        for sub in list(s.pending):
            if sub.key == first.key and len(sub.tokens) <= room and \
                    all(g.slot != sub.slot for g in group):
                group.append(sub)
                room -= len(sub.tokens)
                s.pending.remove(sub)
        return group

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    state, wait = self._ready(time.monotonic())
                    if state is not None:
                        break
                    self._cond.wait(wait)
                group = self._take(state)
                state.reading += len(group)
            error = None
            try:
                with state.lock:
                    self._decode(state, group)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting slots
                error = exc
            with self._cond:
                self.batches += 1
                self.batched += len(group)
                for sub in group:
                    if error is not None:
                        sub.error = error
                        state.reading -= 1  # nobody will read this one's logits
                    sub.done.set()

    def _decode(self, state: BatchState, group: list[Submission]) -> None:
        ctx = state.ctx
        ctx.set_adapters(list(group[0].adapters))
        if group[0].embeddings != state.embeddings_on:
            ctx.set_embeddings(group[0].embeddings)
            state.embeddings_on = group[0].embeddings
        # in sequence order: llama.cpp splits a batch whose sequences come out of order into
        # several micro-batches (4 steps shuffled: 38 ms a decode instead of 24, BENCHMARKS.md)
        group = sorted(group, key=lambda sub: sub.slot)
        parts = [(sub.tokens, sub.pos, sub.slot, sub.outputs_from) for sub in group]
        rows = ctx.decode_many(parts)
        ctx.settle_outputs()  # llama.cpp reorders rows on first read: do it before the slots
        n_out = 0
        for sub, (last_row, outs) in zip(group, rows):
            sub.index, sub.first_out, sub.n_out = last_row, n_out, outs
            n_out += outs


_shared: Decoder | None = None
_shared_lock = threading.Lock()


def shared_decoder() -> Decoder:
    """The process's one decoder thread (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Decoder()
        return _shared
