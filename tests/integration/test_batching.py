"""Continuous batching (hublabio.batching) on the real llama.cpp: several generations share
each decode, give the greedy text each gives alone, keep their prefixes per slot and never
reuse a prefix computed under another adapter; and through the real daemon."""

from __future__ import annotations

import threading

import pytest

from hublabio.batching import Decoder
from hublabio.client import Client
from hublabio.engine import Engine, SamplingOptions
from hublabio.errors import HublabError
from hublabio.llama.handles import adapter_key

from .lora_fixture import make_lora_adapter
from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import make_daemon, write_model_config

QUESTIONS = ["Name three colours.", "What is Python?", "Count from one to five.",
             "Say hello in French."]
GREEDY = SamplingOptions(temperature=0, max_tokens=32, repeat_penalty=1.0)


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def run_together(engine, prompts, opts=GREEDY, **kwargs) -> list:
    out = [None] * len(prompts)

    def one(i):
        out[i] = engine.complete(prompts[i], opts, **kwargs)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.fixture(scope="module")
def alone(smollm2_path, test_threads):
    with Engine(smollm2_path, n_ctx=512, threads=test_threads) as e:
        return [e.complete(chat(q), GREEDY)[0] for q in QUESTIONS]


def test_concurrent_generations_share_decodes_and_give_the_same_greedy_text(
        smollm2_path, test_threads, alone):
    """Batched kernels could change the numbers (a decode of 4 rows vs 1); for SmolLM2 Q4_1
    on llama.cpp's CPU backend they do not change a greedy choice here: the texts are equal."""
    decoder = Decoder()
    with Engine(smollm2_path, n_ctx=512, threads=test_threads, parallel=4,
                decoder=decoder) as e:
        for _ in range(2):  # the second round starts from the slots' cached prefixes
            got = run_together(e, [chat(q) for q in QUESTIONS])
            assert [g[0] for g in got] == alone
        assert all(g[2].cached_tokens > 0 for g in got)
    tokens = sum(len(g[1]) for g in got)
    assert decoder.batched / decoder.batches > 1.2, "the generations were not batched"  # 1 = never
    assert decoder.batches < 2 * tokens


def test_a_prefix_computed_under_one_adapter_is_never_reused_under_another(
        smollm2_path, test_threads, tmp_path):
    a = make_lora_adapter(smollm2_path, tmp_path / "a.gguf", seed=1)
    b = make_lora_adapter(smollm2_path, tmp_path / "b.gguf", seed=2)
    prompt = chat("Tell me about the sea.")
    with Engine(smollm2_path, n_ctx=512, threads=test_threads) as solo:
        want = {p: solo.complete(prompt, GREEDY, adapter=p)[0] for p in (a, b)}
    with Engine(smollm2_path, n_ctx=512, threads=test_threads, parallel=2,
                decoder=Decoder()) as e:
        first = e.complete(prompt, GREEDY, adapter=a)
        other = e.complete(prompt, GREEDY, adapter=b)
        assert other[2].cached_tokens == 0  # slot 0 holds a's prefix: b gets the empty slot
        back = e.complete(prompt, GREEDY, adapter=a)
        assert back[2].cached_tokens == back[2].prompt_tokens - 1  # a's slot kept its prefix
        assert (first[0], other[0], back[0]) == (want[a], want[b], want[a])
        # both experts at once: their steps alternate (one adapter set per decode)
        out = [None, None]

        def one(i, path):
            out[i] = e.complete(prompt, GREEDY, adapter=path)

        threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [o[0] for o in out] == [want[a], want[b]]
        assert all(o[2].cached_tokens == o[2].prompt_tokens - 1 for o in out)


def test_experts_with_different_adapters_keep_them_applied_in_contexts_of_their_own(
        smollm2_path, test_threads, tmp_path):
    """Engine.add_context: a second context over the same weights. Expert b takes it (the
    first context's slot holds a's prefix), so neither context changes its adapter set again,
    a switch back re-evaluates only the last prompt token, and the text is each adapter's."""
    a = make_lora_adapter(smollm2_path, tmp_path / "a.gguf", seed=1)
    b = make_lora_adapter(smollm2_path, tmp_path / "b.gguf", seed=2)
    prompt = chat("Tell me about the sea.")
    with Engine(smollm2_path, n_ctx=512, threads=test_threads) as solo:
        want = {p: solo.complete(prompt, GREEDY, adapter=p)[0] for p in (a, b)}
        with pytest.raises(HublabError, match="continuous batching"):
            solo.add_context()  # no decoder: it decodes in the calling thread
    with Engine(smollm2_path, n_ctx=512, threads=test_threads, decoder=Decoder()) as e:
        e.add_context()
        assert (e.contexts, e.slots) == (2, 2)
        first, second = (lane.ctx for lane in e._lanes)
        changes = []
        for ctx in (first, second):
            real = ctx.set_adapters

            def spy(adapters, ctx=ctx, real=real):
                if adapter_key(adapters) != ctx.adapter_set:
                    changes.append(ctx)
                real(adapters)
            ctx.set_adapters = spy
        got = [e.complete(prompt, GREEDY, adapter=p) for p in (a, b, a, b, a)]
        assert [g[0] for g in got] == [want[a], want[b]] * 2 + [want[a]]
        assert [g[2].cached_tokens for g in got[2:]] == [got[0][2].prompt_tokens - 1] * 3
        assert changes == [first, second]  # each set its adapter once, and kept it
        assert (first.adapter_set, second.adapter_set) == (((a, 1.0),), ((b, 1.0),))


def test_a_cancelled_generation_leaves_the_others_running(smollm2_path, test_threads, alone):
    with Engine(smollm2_path, n_ctx=512, threads=test_threads, parallel=2,
                decoder=Decoder()) as e:
        cancel = threading.Event()
        out = {}

        def long():
            gen = e.generate(chat("Write a long story."),
                             SamplingOptions(temperature=0, max_tokens=400), cancel=cancel)
            for i, _ in enumerate(gen):
                if i == 5:
                    cancel.set()
            out["long"] = True

        t = threading.Thread(target=long)
        t.start()
        assert e.complete(chat(QUESTIONS[0]), GREEDY)[0] == alone[0]
        t.join(60)
        assert out == {"long": True}


def test_the_daemon_serves_clients_at_once(smollm2_path, tmp_path):
    from hublabio.config import update_settings

    update_settings("inference", "parallel", 4)
    models = tmp_path / "models"
    write_model_config(models, smollm2_path, max_tokens=32)
    with make_daemon(models, queue_size=2) as d:
        assert d.service.concurrency() == 4
        results = [None] * 4

        def ask(i):
            with Client(d.socket_path, timeout=120) as c:
                results[i] = c.call("generate", messages=chat(QUESTIONS[i]),
                                    options={"repeat_penalty": 1.0})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # the model's system prompt is added: compare against the same request run alone
        with Client(d.socket_path, timeout=120) as c:
            one = [c.call("generate", messages=chat(q), options={"repeat_penalty": 1.0})["text"]
                   for q in QUESTIONS]
        assert [r["text"] for r in results] == one
        with Client(d.socket_path, timeout=30) as c:
            info = c.call("info")
        assert info.get("parallel") == 4 and info.get("batch_mode") == "continuous"


def test_the_busy_queue_counts_every_running_slot(smollm2_path, tmp_path):
    """parallel 2, queue_size 1: two generate at once, one waits, the next is busy at once."""
    from hublabio.config import update_settings
    from hublabio.errors import BusyError

    from .test_daemon import wait_for

    update_settings("inference", "parallel", 2)
    models = tmp_path / "models"
    write_model_config(models, smollm2_path, max_tokens=400)
    with make_daemon(models, queue_size=1) as d, Client(d.socket_path, timeout=120) as a, \
            Client(d.socket_path, timeout=120) as b, Client(d.socket_path, timeout=120) as c, \
            Client(d.socket_path, timeout=120) as e:
        first = a.stream("generate", prompt="A long story:")
        second = b.stream("generate", prompt="Another long story:")
        assert next(ev for ev in first if ev["type"] == "token")
        assert next(ev for ev in second if ev["type"] == "token")  # both run at once
        waiting = c.stream("generate", prompt="Hi", options={"max_tokens": 2})
        wait_for(lambda: d.server.dispatcher.waiting == 1)
        with pytest.raises(BusyError, match="queue_size=1"):
            e.call("generate", prompt="Hi", options={"max_tokens": 2})
        first.cancel()
        assert list(first)[-1]["data"]["finish_reason"] == "cancelled"
        assert list(waiting)[-1]["data"]["completion_tokens"] >= 1  # took the freed slot
        second.cancel()
        assert list(second)[-1]["data"]["finish_reason"] == "cancelled"


def test_a_one_slot_model_beside_batched_ones_decodes_on_the_decoder_thread(smollm2_path,
                                                                            tmp_path):
    """batch_mode off in a model's TOML gives it one slot, but its decodes still go to the one
    decoder thread: the daemon runs queued ops on several threads, and a second decoding thread
    would keep a second OpenMP team (docs/BENCHMARKS.md)."""
    from hublabio.config import load_model_config
    from hublabio.pool import LoadSettings, ModelPool

    models = tmp_path / "models"
    write_model_config(models, smollm2_path)
    text = (models / "model-config.toml").read_text()
    (models / "model-config.toml").write_text(text.replace("[inference]\n",
                                                           '[inference]\nbatch_mode = "off"\n'))
    cfg = load_model_config(models / "model-config.toml")
    for daemon_mode, via_decoder in (("continuous", True), ("off", False)):
        pool = ModelPool(2048, load=LoadSettings(threads=1, parallel=4, batch_mode=daemon_mode))
        try:
            res = pool.ensure_loaded(cfg)
            assert res.parallel == 1
            assert (res.engine._decoder is not None) == via_decoder
            with pool.acquire(cfg) as engine:
                assert engine.complete("Hi", GREEDY)[0]
        finally:
            pool.close()
