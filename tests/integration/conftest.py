"""Fixtures shared by several integration modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def seed_router(tmp_path_factory):
    """(folder, torch model): the seed-format transformer router (seed_router_fixture), made
    once per run (about 90 s: torch, transformers, 300 steps, the ONNX export). Tests copy
    the folder before they change anything in it."""
    from .seed_router_fixture import make_seed_router

    out = tmp_path_factory.mktemp("seed") / "router"
    model = make_seed_router(out)
    return out, model
