"""budget.py: estimate arithmetic on real headers, eviction order, refusals with numbers."""

from __future__ import annotations

import pytest

from hublabio.budget import (MiB, Estimate, Resident, estimate_memory, max_context_fitting,
                             padded_ctx, plan_admission, repack_bytes)
from hublabio.llama.cpu import decide
from hublabio.errors import BudgetError
from hublabio.gguf_info import read_gguf_info


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return read_gguf_info(smollm2_path)


def test_kv_cache_formula(smol):
    for n_ctx in (256, 2048, 8192):
        est = estimate_memory(smol, n_ctx)
        # layers × kv heads × head dim × context × 2 bytes (f16) × 2 (K and V)
        assert est.kv_mb * MiB == 30 * 3 * 64 * n_ctx * 2 * 2
    assert estimate_memory(smol, 2048, kv_bytes=1).kv_mb == estimate_memory(smol, 2048).kv_mb / 2


def test_context_is_padded_like_llama_cpp(smol):
    assert [padded_ctx(c) for c in (1, 64, 256, 257, 300, 2048)] == [256, 256, 256, 512, 512, 2048]
    assert estimate_memory(smol, 300).kv_mb == estimate_memory(smol, 512).kv_mb
    assert estimate_memory(smol, 300).n_ctx == 512


def test_parts_add_up_and_grow_with_context(smol):
    prev = None
    for n_ctx in (256, 512, 1024, 4096):
        e = estimate_memory(smol, n_ctx)
        assert e.total_mb == pytest.approx(e.weights_mb + e.kv_mb + e.compute_mb + e.overhead_mb)
        assert e.weights_mb >= smol.tensor_bytes / MiB
        if prev:
            assert e.total_mb > prev.total_mb
        prev = e
    # a smaller micro-batch needs a smaller compute buffer
    assert estimate_memory(smol, 2048, n_ubatch=64).compute_mb < estimate_memory(smol, 2048).compute_mb
    with pytest.raises(ValueError):
        estimate_memory(smol, 0)


def test_repack_depends_on_cpu(gemma_path, smol):
    gemma = read_gguf_info(gemma_path)
    avx2 = decide("auto", machine="x86_64", flags=frozenset({"avx2"}))
    assert avx2.repacked("Q4_K", 640) and avx2.repacked("Q4_0", 64) and avx2.repacked("IQ4_NL", 8)
    assert not avx2.repacked("Q4_K", 644)  # rows must be a multiple of 8
    assert not avx2.repacked("Q4_1", 64) and not avx2.repacked("Q8_0", 64)
    assert not decide("auto", machine="x86_64", flags=frozenset()).repacked("Q4_0", 64)
    assert not decide("auto", machine="aarch64", flags=frozenset({"asimd"})).repacked("Q4_0", 64)
    pi5 = decide("auto", machine="aarch64", flags=frozenset({"asimd", "asimddp"}))
    assert pi5.repacked("Q4_0", 64) and pi5.repacked("Q8_0", 64)
    # Gemma 3 270M Q4_K_M: its Q4_K matrices (12.66 MiB, what llama.cpp logs as CPU_REPACK)
    assert repack_bytes(gemma, avx2) == 13271040
    assert repack_bytes(gemma, decide(False, machine="x86_64", flags=frozenset({"avx2"}))) == 0
    assert repack_bytes(smol, avx2) == 0  # SmolLM2 is Q4_1 + Q8_0 embd
    assert repack_bytes(smol, pi5) == 0  # token_embd (the only Q8_0) is never repacked


def test_amx_is_excluded_under_auto_and_counted_when_forced(smol):
    amx = frozenset({"avx2", "avx512f", "amx_int8", "amx_tile"})
    auto = decide("auto", machine="x86_64", flags=amx)
    assert auto.use_extra_bufts and not auto.allow_amx and "AMX" in auto.reason
    forced = decide(True, machine="x86_64", flags=amx)
    assert forced.allow_amx
    # AMX takes Q4_1 too (SmolLM2's matrices): only the forced policy copies them
    assert repack_bytes(smol, auto) == 0 < repack_bytes(smol, forced)
    off = decide(False, machine="x86_64", flags=amx)
    assert not off.use_extra_bufts and not off.repacked("Q4_0", 64)


def test_max_context_fitting(smol):
    need_2048 = estimate_memory(smol, 2048).total_mb
    assert max_context_fitting(smol, need_2048) == 2048
    assert max_context_fitting(smol, need_2048 - 1) == 1792
    assert max_context_fitting(smol, 10_000) == 8192  # capped at the training context
    assert max_context_fitting(smol, estimate_memory(smol, 256).total_mb - 1) is None
    assert max_context_fitting(smol, 10_000, ceiling=1000) == 768


def R(key, mb, last, pinned=False):
    return Resident(key, mb, pinned, last)


def test_fits_without_eviction():
    assert plan_admission(100, 500, [R("a", 200, 1), R("b", 200, 2)]) == []
    assert plan_admission(100, 500, []) == []


def test_evicts_least_recently_used_first():
    resident = [R("new", 100, 30), R("old", 100, 10), R("mid", 100, 20)]
    assert plan_admission(150, 400, resident) == ["old"]
    assert plan_admission(250, 400, resident) == ["old", "mid"]


def test_pinned_are_never_evicted():
    resident = [R("old", 100, 10, pinned=True), R("mid", 100, 20), R("new", 100, 30)]
    assert plan_admission(150, 400, resident) == ["mid"]


def test_minimal_set():
    # LRU order: small (10 MiB) then big (500 MiB); the big one alone makes room
    resident = [R("small", 10, 1), R("big", 500, 2)]
    assert plan_admission(400, 600, resident) == ["big"]


def test_refusal_has_numbers():
    resident = [R("p", 300, 1, pinned=True), R("q", 100, 2)]
    with pytest.raises(BudgetError) as info:
        plan_admission(250, 500, resident)
    err = info.value
    assert "needs 250 MiB, budget 500 MiB, in use 400 MiB" in str(err)
    assert "300 MiB of it pinned or busy" in str(err)
    assert (err.needed_mb, err.budget_mb, err.in_use_mb) == (250, 500, 400)
    assert err.code == "budget" and err.suggestion is None


def test_refusal_suggests_a_context_that_fits(smol):
    need = estimate_memory(smol, 8192).total_mb
    budget = estimate_memory(smol, 2048).total_mb + 5
    with pytest.raises(BudgetError) as info:
        plan_admission(need, budget, [], info=smol, n_ctx=8192)
    assert info.value.suggestion == ("a context of 2048 tokens would fit "
                                     "(ai config context_size 2048)")
    assert "ai config context_size 2048" in str(info.value)
    # nothing fits at all: no suggestion
    with pytest.raises(BudgetError) as info:
        plan_admission(need, 20, [], info=smol, n_ctx=8192)
    assert info.value.suggestion is None and "needs" in str(info.value)


def test_estimate_describe(smol):
    text = estimate_memory(smol, 2048).describe()
    assert text.startswith(f"{estimate_memory(smol, 2048).total_mb:.0f} MiB (weights 92")
    assert isinstance(estimate_memory(smol, 2048), Estimate)
