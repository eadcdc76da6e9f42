"""The memory estimate against reality: load each real model with the daemon's Engine in a fresh
process (so RSS starts clean), answer a prompt, and compare the process's RSS growth with
budget.estimate_memory — it must be within ±15%, for two context sizes per model, both after a
short question and after a prompt that fills one micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hublabio.budget import estimate_memory
from hublabio.gguf_info import read_gguf_info
from hublabio.llama.cpu import decide as repack_policy

TOLERANCE = 0.15

CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    from hublabio.engine import Engine, SamplingOptions

    path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    repack = {"auto": "auto", "off": False}[sys.argv[4]]
    proc = psutil.Process()
    before = proc.memory_info().rss
    engine = Engine(path, n_ctx=n_ctx, threads=threads, repack=repack)
    loaded = proc.memory_info().rss
    opts = SamplingOptions(max_tokens=8, temperature=0.0)
    out = {"n_ctx": engine.n_ctx, "load": loaded - before}

    text, _, stats = engine.complete([{"role": "user", "content": "What is the capital of France?"}], opts)
    out["short"] = proc.memory_info().rss - before
    out["short_tokens"] = [stats.prompt_tokens, stats.completion_tokens]

    # a prompt filling one micro-batch (or most of a small context)
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()
    target = min(engine.n_batch, engine.n_ctx) - 24
    prompt = " ".join(words[i % len(words)] for i in range(target))
    while len(engine.tokenize(prompt)) > target:
        prompt = prompt[: int(len(prompt) * 0.95)]
    text, _, stats = engine.complete(prompt, opts)
    out["long"] = proc.memory_info().rss - before
    out["long_tokens"] = [stats.prompt_tokens, stats.completion_tokens]
    engine.close()
    print(json.dumps(out))
""")


def measure(path, n_ctx: int, threads: int, repack: str = "auto") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_ctx), str(threads),
                           repack], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(path, n_ctx, threads, *, repack: str = "auto", tolerance: float = TOLERANCE,
          keys=("short", "long")):
    info = read_gguf_info(path)
    est = estimate_memory(info, n_ctx, repack=repack_policy("auto" if repack == "auto" else False))
    got = measure(path, n_ctx, threads, repack)
    mib = 1024 * 1024
    report = (f"{path.name} n_ctx={n_ctx}: estimate {est.describe()}; measured RSS growth "
              f"load {got['load'] / mib:.1f}, after short prompt {got['short'] / mib:.1f} "
              f"(tokens {got['short_tokens']}), after long prompt {got['long'] / mib:.1f} MiB "
              f"(tokens {got['long_tokens']})")
    print(report)
    assert got["n_ctx"] == est.n_ctx, report
    assert got["short_tokens"][1] > 0 and got["long_tokens"][0] > min(n_ctx, 512) // 2, report
    for key in keys:
        measured = got[key] / mib
        assert abs(est.total_mb - measured) <= tolerance * measured, f"{key}: {report}"


@pytest.mark.parametrize("n_ctx", [512, 4096])
def test_smollm2_estimate_matches_rss(smollm2_path, n_ctx, test_threads):
    check(smollm2_path, n_ctx, test_threads)


@pytest.mark.parametrize("n_ctx", [1024, 8192])
def test_gemma3_estimate_matches_rss(gemma_path, n_ctx, test_threads):
    check(gemma_path, n_ctx, test_threads)


@pytest.fixture(scope="module")
def seed_05b(tmp_path_factory, smollm2_path):
    """The seed's hublabio-0.5b shape as a random-weight Q4_K_M GGUF (hublab-tools
    random-model, SmolLM2's tokenizer): 171 MiB, made in about 20 s."""
    pytest.importorskip("gguf")
    from hublabio_tools.random_model import random_model

    return random_model("hublabio-0.5b", tmp_path_factory.mktemp("sizes") / "0.5b.Q4_K_M.gguf",
                        vocab_from=smollm2_path)


@pytest.mark.parametrize("repack", ["auto", "off"])
@pytest.mark.parametrize("n_ctx", [512, 4096])
def test_the_seeds_05b_shape_estimate_within_10_percent(seed_05b, n_ctx, repack, test_threads):
    """Issue 12: ±10% at the seed's sizes, repack on and off, after one micro-batch of prompt
    (bench/bench_sizes.py measures 1B, 3B and 7B the same way)."""
    check(seed_05b, n_ctx, test_threads, repack=repack, tolerance=0.10, keys=("long",))


EXTRA_CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    from hublabio.batching import Decoder
    from hublabio.engine import Engine, SamplingOptions

    path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    proc = psutil.Process()
    engine = Engine(path, n_ctx=n_ctx, threads=threads, decoder=Decoder())
    opts = SamplingOptions(max_tokens=4, temperature=0.0)
    engine.complete("Hello there.", opts)
    before = proc.memory_info().rss
    engine.add_context()
    engine._slots[0].busy = True  # the next generation takes the new context's slot
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()
    prompt = " ".join(words[i % len(words)] for i in range(engine.n_batch + 64))
    stats = engine.complete(prompt, opts)[2]
    print(json.dumps({"growth": proc.memory_info().rss - before,
                      "prompt_tokens": stats.prompt_tokens,
                      "new_slot_used": len(engine._slots[1].cached)}))
""")


@pytest.mark.parametrize("n_ctx", [1024, 4096])
def test_another_context_costs_what_extra_context_mb_says(smollm2_path, n_ctx, test_threads):
    """Engine.add_context: RSS growth of a second context, after a prompt of more than one
    micro-batch in it, against budget.extra_context_mb (what the pool counts for it)."""
    from hublabio.budget import extra_context_mb

    proc = subprocess.run([sys.executable, "-c", EXTRA_CHILD, str(smollm2_path), str(n_ctx),
                           str(test_threads)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["new_slot_used"] > 512 and got["prompt_tokens"] > 512, got
    measured = got["growth"] / 2**20
    est = extra_context_mb(read_gguf_info(smollm2_path), n_ctx)
    print(f"n_ctx {n_ctx}: another context grew RSS by {measured:.1f} MiB, estimate {est:.1f}")
    assert abs(est - measured) <= TOLERANCE * measured, (est, measured)
