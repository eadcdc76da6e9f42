"""bench/board_table.py: the per-board table in docs/BENCHMARKS.md is what the script computes,
and every pick is the largest recipe the estimate admits in the board's budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hublabio.board import profile_for
from hublabio.budget import estimate_memory
from hublabio.llama.cpu import decide

ROOT = Path(__file__).resolve().parents[2]


def _load_board_table():
    spec = importlib.util.spec_from_file_location("board_table", ROOT / "bench" / "board_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["board_table"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bt():
    return _load_board_table()


@pytest.fixture(scope="module")
def infos(bt):
    return bt.model_infos()


@pytest.mark.slow
def test_the_docs_hold_the_tables_the_script_prints(bt, infos):
    docs = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert bt.markdown(bt.rows(infos)) in docs, "rerun bench/board_table.py and update the docs"
    assert bt.memory_markdown(infos) in docs


@pytest.mark.slow
def test_each_pick_fits_and_the_next_size_up_does_not(bt, infos):
    min_ctx = 2048
    for board in bt.BOARDS:
        budget = board.ram_mb - profile_for(board.model_string, board.ram_mb).os_reserve_mb
        policy = decide("auto", machine=board.cpu[0], flags=board.cpu[1])
        for ftype in bt.TYPES:
            pick = bt.largest_fitting(infos, ftype, budget, policy, min_ctx=min_ctx,
                                      position=512, peak_gbs=board.peak_gbs)
            assert pick.recipe is not None, (board.label, ftype)  # 0.5B fits every board
            assert pick.needs_mb <= budget and pick.n_ctx >= min_ctx
            i = bt.RECIPES.index(pick.recipe)
            for bigger in bt.RECIPES[:i]:
                assert estimate_memory(infos[(bigger, ftype)], min_ctx,
                                       repack=policy).total_mb > budget, (board.label, bigger)
            if pick.n_ctx < 4096:  # the context is the largest that fits
                assert estimate_memory(infos[(pick.recipe, ftype)], pick.n_ctx + 256,
                                       repack=policy).total_mb > budget
