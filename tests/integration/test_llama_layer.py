"""hublabio.llama on the real llama.cpp, on whatever CPU runs the suite: the CPU policy (never
an AMX buffer under "auto", CPU_REPACK kept where the CPU has it), load modes reaching
llama.cpp from a model's TOML, and the memory estimate following the same policy."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from hublabio.budget import estimate_memory, repack_bytes
from hublabio.config import load_model_config
from hublabio.engine import Engine, SamplingOptions
from hublabio.gguf_info import read_gguf_info
from hublabio.llama import Model, extra_buffer_types, repack_policy
from hublabio.llama.cpu import cpu_flags, has_amx
from hublabio.pool import ModelPool

GREEDY = SamplingOptions(max_tokens=4, temperature=0)
AVX2 = "avx2" in cpu_flags() and os.uname().machine == "x86_64"


def test_auto_never_puts_weights_in_an_amx_buffer_and_generates(smollm2_path, test_threads):
    offered = extra_buffer_types()
    if has_amx():
        assert "AMX" in offered  # this host's llama.cpp would use it without the policy
    with Engine(smollm2_path, n_ctx=256, threads=test_threads) as engine:
        assert "AMX" not in engine.buffers
        assert engine.buffers.get("CPU_Mapped", 0) > 50  # SmolLM2's weights, from the file
        text, _, stats = engine.complete("The capital of France is", GREEDY)
    assert stats.completion_tokens >= 1 and text


@pytest.mark.skipif(not AVX2, reason="CPU_REPACK of Q4_K needs AVX2 (x86) here")
def test_repack_auto_repacks_q4_k_and_off_does_not(gemma_path, test_threads):
    info = read_gguf_info(gemma_path)
    with Model(gemma_path, repack="auto") as auto:
        assert auto.buffers["CPU_REPACK"] == pytest.approx(
            repack_bytes(info, repack_policy("auto")) / 2**20, abs=0.05)
    with Model(gemma_path, repack=False) as off:
        assert "CPU_REPACK" not in off.buffers and "AMX" not in off.buffers
    # the estimate follows the same decision: repacked copies are anonymous memory
    on_mb = estimate_memory(info, 512, repack=repack_policy("auto")).weights_mb
    off_mb = estimate_memory(info, 512, repack=repack_policy(False)).weights_mb
    assert on_mb - off_mb == pytest.approx(auto.buffers["CPU_REPACK"], abs=0.05)


def _model_toml(folder: Path, gguf: Path, extra: str) -> Path:
    path = folder / "m.toml"
    path.write_text(f'[model]\nname = "m"\npath = "{gguf}"\n\n[inference]\ncontext_size = 256\n'
                    f"{extra}\n")
    return path


def test_mmap_false_in_a_model_toml_reaches_llama_cpp(smollm2_path, tmp_path, test_threads):
    pool = ModelPool(4096, n_threads=test_threads)
    try:
        cfg = load_model_config(_model_toml(tmp_path, smollm2_path, "mmap = false"))
        res = pool.ensure_loaded(cfg)
        # load_mode NONE: llama.cpp reads the weights into its own buffer ("CPU"), not a map
        assert "CPU" in res.engine.buffers and "CPU_Mapped" not in res.engine.buffers
    finally:
        pool.close()


def _locked_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(os.geteuid() != 0 and
                    resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < 256 * 2**20,
                    reason="mlock needs root or a 256 MiB RLIMIT_MEMLOCK")
def test_mlock_true_in_a_model_toml_locks_the_weights(smollm2_path, tmp_path, test_threads):
    before = _locked_kb()
    pool = ModelPool(4096, n_threads=test_threads)
    try:
        cfg = load_model_config(_model_toml(tmp_path, smollm2_path, "mlock = true"))
        pool.ensure_loaded(cfg)
        locked_mb = (_locked_kb() - before) / 1024
        assert locked_mb > 50  # the mapped weights (92 MiB) are locked in RAM
    finally:
        pool.close()
    assert _locked_kb() - before < 1024  # and unlocked again with the model
