"""The model pool under a memory budget, with the real SmolLM2 and Gemma 3 GGUFs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hublabio.budget import estimate_memory
from hublabio.config import load_model_config
from hublabio.engine import SamplingOptions
from hublabio.errors import BudgetError, ModelNotFound
from hublabio.gguf_info import read_gguf_info
from hublabio.pool import ModelPool

GREEDY = SamplingOptions(max_tokens=4, temperature=0)


def _cfg(tmp_path: Path, name: str, gguf: Path, *, ctx: int = 256, pinned: bool = False):
    f = tmp_path / f"{name}.toml"
    f.write_text(f'[model]\nname = "{name}"\ntype = "gguf"\npath = "{gguf}"\n'
                 f'pinned = {str(pinned).lower()}\n[inference]\ncontext_size = {ctx}\nmax_tokens = 4\n')
    return load_model_config(f)


def _need(gguf: Path, ctx: int = 256) -> float:
    return estimate_memory(read_gguf_info(gguf), ctx).total_mb


def test_loads_generates_and_accounts(tmp_path, smollm2_path, test_threads):
    pool = ModelPool(4096, n_threads=test_threads)
    cfg = _cfg(tmp_path, "small", smollm2_path)
    with pool.acquire(cfg) as engine:
        text, _, stats = engine.complete("Hello", GREEDY)
    assert stats.completion_tokens >= 1
    [res] = pool.resident()
    assert res.names == {"small"}
    assert pool.used_mb() == pytest.approx(_need(smollm2_path))
    assert pool.unload("small") == ["small"]
    assert pool.resident() == [] and pool.used_mb() == 0
    with pytest.raises(ModelNotFound):
        pool.unload("small")


def test_refuses_with_numbers_and_a_context_that_fits(tmp_path, smollm2_path):
    cfg = _cfg(tmp_path, "small", smollm2_path, ctx=8192)
    budget = _need(smollm2_path, 1024)
    pool = ModelPool(budget)
    with pytest.raises(BudgetError) as err:
        pool.ensure_loaded(cfg)
    msg = str(err.value)
    assert "needs" in msg and "budget" in msg and "in use" in msg
    assert "context" in msg  # suggests a smaller context that fits
    assert err.value.needed_mb > budget
    assert pool.resident() == []


def test_evicts_least_recently_used_to_make_room(tmp_path, smollm2_path, gemma_path, test_threads):
    a = _cfg(tmp_path, "smol", smollm2_path)
    b = _cfg(tmp_path, "gemma", gemma_path)
    budget = max(_need(smollm2_path), _need(gemma_path)) * 1.05  # room for one at a time
    pool = ModelPool(budget, n_threads=test_threads)
    with pool.acquire(a) as e:
        e.complete("Hi", GREEDY)
    with pool.acquire(b) as e:
        e.complete("Hi", GREEDY)
    assert [r.names for r in pool.resident()] == [{"gemma"}]
    assert pool.used_mb() <= budget


def test_pinned_models_are_never_evicted(tmp_path, smollm2_path, gemma_path):
    a = _cfg(tmp_path, "smol", smollm2_path, pinned=True)
    b = _cfg(tmp_path, "gemma", gemma_path)
    pool = ModelPool(max(_need(smollm2_path), _need(gemma_path)) * 1.05)
    pool.ensure_loaded(a)
    with pytest.raises(BudgetError):
        pool.ensure_loaded(b)
    assert [r.names for r in pool.resident()] == [{"smol"}]


def test_a_model_in_use_is_not_evicted(tmp_path, smollm2_path, gemma_path):
    a = _cfg(tmp_path, "smol", smollm2_path)
    b = _cfg(tmp_path, "gemma", gemma_path)
    pool = ModelPool(max(_need(smollm2_path), _need(gemma_path)) * 1.05)
    with pool.acquire(a):
        with pytest.raises(BudgetError):
            pool.ensure_loaded(b)


def test_configs_sharing_a_gguf_share_one_engine(tmp_path, smollm2_path):
    pool = ModelPool(4096)
    r1 = pool.ensure_loaded(_cfg(tmp_path, "python", smollm2_path))
    r2 = pool.ensure_loaded(_cfg(tmp_path, "rust", smollm2_path))
    assert r1 is r2 and r1.names == {"python", "rust"}
    assert len(pool.resident()) == 1


def test_idle_models_are_reaped(tmp_path, smollm2_path):
    pool = ModelPool(4096, idle_ttl_s=10)
    res = pool.ensure_loaded(_cfg(tmp_path, "smol", smollm2_path))
    assert pool.reap_idle(now=res.last_used + 5) == []
    assert pool.reap_idle(now=res.last_used + 11) == ["smol"]
    assert pool.resident() == []


def test_context_change_reloads_at_the_new_size(tmp_path, smollm2_path):
    pool = ModelPool(4096)
    r1 = pool.ensure_loaded(_cfg(tmp_path, "smol", smollm2_path, ctx=256))
    r2 = pool.ensure_loaded(_cfg(tmp_path, "smol", smollm2_path, ctx=512))
    assert r2 is not r1 and r2.n_ctx == 512 and r2.engine.n_ctx >= 512


def test_leases_serialize_generation_on_one_engine(tmp_path, smollm2_path, test_threads):
    pool = ModelPool(4096, n_threads=test_threads)
    cfg = _cfg(tmp_path, "smol", smollm2_path)
    inside = []
    lock = threading.Lock()

    def worker():
        with pool.acquire(cfg) as e:
            with lock:
                inside.append(1)
                assert len(inside) == 1  # nobody else holds the engine
            e.complete("Hi", GREEDY)
            with lock:
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == []
