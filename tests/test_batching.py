"""hublabio.batching's scheduling on a fake context (the real one: tests/integration/
test_batching.py): what goes into one decode, in which order, and when."""

from __future__ import annotations

import threading
import time

from hublabio.batching import Decoder


class FakeAdapter:
    def __init__(self, path):
        self.path = path


class FakeContext:
    """Records every decode: [(seq, tokens, pos), ...] and the adapters it ran under."""

    def __init__(self, delay: float = 0.0):
        self.decodes: list[list[tuple]] = []
        self.adapters: list[tuple] = []
        self.delay = delay
        self.reading_during_decode = False

    def set_adapters(self, adapters):
        self.current = tuple(a.path for a, _ in adapters)

    def set_embeddings(self, on):
        pass

    def decode_many(self, parts):
        self.decodes.append([(seq, tuple(tokens), pos) for tokens, pos, seq, _ in parts])
        self.adapters.append(self.current)
        time.sleep(self.delay)
        rows, i = [], 0
        for tokens, *_ in parts:
            i += len(tokens)
            rows.append((i - 1, 1))
        return rows

    def settle_outputs(self):
        pass


def run_slots(decoder, state, plan):
    """plan: {slot: (adapters, [token lists])}: each slot submits its steps in a thread."""
    got = {}

    def slot(i, adapters, steps):
        rows = []
        for n, tokens in enumerate(steps):
            t = decoder.submit(state, i, tokens, n, adapters=adapters)
            rows.append(t.index)
            t.release()
        decoder.end(state, i)
        got[i] = rows

    threads = [threading.Thread(target=slot, args=(i, a, s)) for i, (a, s) in plan.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return got


def test_a_batch_is_in_sequence_order_and_each_slot_gets_its_own_row():
    """llama.cpp splits a batch whose sequences come out of order into several micro-batches
    (a 4-sequence step: 38 ms instead of 24, docs/BENCHMARKS.md), so the decoder sorts."""
    ctx = FakeContext(delay=0.01)
    decoder = Decoder()
    state = decoder.attach(ctx, 512)
    got = run_slots(decoder, state, {i: ((), [[10 + i], [20 + i], [30 + i]]) for i in (3, 1, 2, 0)})
    steps = [d for d in ctx.decodes if len(d) == 4]
    assert steps, ctx.decodes
    for d in ctx.decodes:
        assert [seq for seq, *_ in d] == sorted(seq for seq, *_ in d)
    for d in steps:  # each slot's tokens sit at its place in the sorted batch
        assert [tok[0] % 10 for _, tok, _ in d] == [0, 1, 2, 3]
    assert sorted(got) == [0, 1, 2, 3] and all(len(rows) == 3 for rows in got.values())


def test_different_adapter_sets_never_share_a_decode():
    ctx = FakeContext(delay=0.005)
    decoder = Decoder()
    state = decoder.attach(ctx, 512)
    a, b = ((FakeAdapter("a"), 1.0),), ((FakeAdapter("b"), 1.0),)
    run_slots(decoder, state, {0: (a, [[1], [2], [3]]), 1: (b, [[4], [5], [6]]),
                               2: (a, [[7], [8], [9]])})
    for d, adapters in zip(ctx.decodes, ctx.adapters):
        want = ("a",) if {seq for seq, *_ in d} <= {0, 2} else ("b",)
        assert adapters == want and ({seq for seq, *_ in d} <= {0, 2} or
                                     {seq for seq, *_ in d} == {1})
    assert sum(len(d) for d in ctx.decodes) == 9


def test_no_decode_starts_while_a_slot_still_reads_its_logits():
    ctx = FakeContext()
    decoder = Decoder()
    state = decoder.attach(ctx, 512)
    first = decoder.submit(state, 0, [1], 0)  # decoded; slot 0 now reads
    done = threading.Event()

    def other():
        decoder.submit(state, 1, [2], 0).release()
        done.set()

    threading.Thread(target=other).start()
    assert not done.wait(0.2), "slot 1 was decoded while slot 0 was still reading"
    first.release()
    assert done.wait(5)
    decoder.end(state, 0)
    decoder.end(state, 1)
