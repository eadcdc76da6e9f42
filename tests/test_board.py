"""board.py with fake device trees and meminfo files, one per profile."""

from __future__ import annotations

import pytest

from hublabio.board import Board, budget_mb, detect_board, nominal_ram_mb, read_total_ram_mb
from hublabio.config import DaemonSettings


def fake(tmp_path, model: str | None, memtotal_kb: int, cgroup: str | None = None):
    dt = tmp_path / "model"
    if model is not None:
        dt.write_bytes(model.encode() + b"\0")  # the device tree NUL-terminates the string
    mi = tmp_path / "meminfo"
    mi.write_text(f"MemTotal:       {memtotal_kb} kB\nMemFree:         12345 kB\n")
    cg = tmp_path / "memory.max"
    if cgroup is not None:
        cg.write_text(cgroup + "\n")
    return dict(device_tree_model_path=dt, meminfo=mi, cgroup_max=cg)


@pytest.mark.parametrize("model, memtotal_mb, name, reserve", [
    ("Raspberry Pi Zero 2 W Rev 1.0", 427, "Raspberry Pi Zero 2 W", 128),
    ("Raspberry Pi 3 Model B Rev 1.2", 921, "Raspberry Pi 3 (1 GB)", 192),
    ("Raspberry Pi 3 Model A Plus Rev 1.0", 430, "Raspberry Pi 3 (512 MB)", 128),
    ("Raspberry Pi 4 Model B Rev 1.1", 924, "Raspberry Pi 4 (1 GB)", 224),
    ("Raspberry Pi 4 Model B Rev 1.2", 1849, "Raspberry Pi 4 (2 GB)", 384),
    ("Raspberry Pi 4 Model B Rev 1.4", 3794, "Raspberry Pi 4 (4 GB)", 512),
    ("Raspberry Pi 4 Model B Rev 1.4", 7812, "Raspberry Pi 4 (8 GB)", 768),
    ("Raspberry Pi 400 Rev 1.0", 3794, "Raspberry Pi 4 (4 GB)", 512),
    ("Raspberry Pi Compute Module 4 Rev 1.0", 7812, "Raspberry Pi 4 (8 GB)", 768),
    ("Raspberry Pi 5 Model B Rev 1.0", 4045, "Raspberry Pi 5 (4 GB)", 512),
    ("Raspberry Pi 5 Model B Rev 1.0", 8062, "Raspberry Pi 5 (8 GB)", 768),
    ("Raspberry Pi 5 Model B Rev 1.1", 16218, "Raspberry Pi 5 (16 GB)", 1024),
    ("Raspberry Pi 500 Rev 1.0", 8062, "Raspberry Pi 5 (8 GB)", 768),
])
def test_pi_profiles(tmp_path, model, memtotal_mb, name, reserve):
    board = detect_board(**fake(tmp_path, model, memtotal_mb * 1024))
    assert board.name == name
    assert board.model_string == model  # NUL stripped
    assert board.ram_mb == memtotal_mb and board.cores == 4
    assert board.os_reserve_mb == reserve and board.is_raspberry_pi
    assert budget_mb(DaemonSettings(), board) == memtotal_mb - reserve


def test_other_pi_and_generic(tmp_path):
    zero = detect_board(**fake(tmp_path, "Raspberry Pi Zero W Rev 1.1", 434 * 1024))
    assert zero.name == "Raspberry Pi (other)" and 96 <= zero.os_reserve_mb < 434

    (tmp_path / "x").mkdir()
    pc = detect_board(**fake(tmp_path / "x", None, 16 * 1024 * 1024), cores=8)  # no device tree
    assert pc == Board("Generic Linux", "", 16384, 8, 4096)
    small = detect_board(**fake(tmp_path / "x", None, 2 * 1024 * 1024), cores=2)
    assert small.os_reserve_mb == 512 and not small.is_raspberry_pi


def test_cgroup_limit_lowers_ram(tmp_path):
    board = detect_board(**fake(tmp_path, None, 64 * 1024 * 1024, cgroup=str(3 * 2**30)), cores=2)
    assert board.ram_mb == 3072
    assert read_total_ram_mb(tmp_path / "meminfo", tmp_path / "memory.max") == 3072
    (tmp_path / "memory.max").write_text("max\n")
    assert read_total_ram_mb(tmp_path / "meminfo", tmp_path / "memory.max") == 64 * 1024


def test_missing_meminfo_falls_back_to_psutil(tmp_path):
    import psutil

    got = read_total_ram_mb(tmp_path / "none", None)
    assert got == psutil.virtual_memory().total // 2**20


def test_budget_configured_wins_then_configured_reserve():
    board = Board("Raspberry Pi 4 (4 GB)", "Raspberry Pi 4 Model B", 3794, 4, 512)
    assert budget_mb(DaemonSettings(budget_mb=1000), board) == 1000
    assert budget_mb(DaemonSettings(os_reserve_mb=1000), board) == 2794
    assert budget_mb(DaemonSettings(), board) == 3282
    assert budget_mb(DaemonSettings(os_reserve_mb=9000), board) == 0


@pytest.mark.parametrize("ram, tier", [(200, 256), (427, 512), (512, 512), (924, 1024),
                                       (3794, 4096), (16218, 16384), (65000, 65000)])
def test_nominal_ram(ram, tier):
    assert nominal_ram_mb(ram) == tier


def test_detect_on_this_machine():
    board = detect_board()
    assert board.ram_mb > 0 and board.cores >= 1
    assert 0 <= budget_mb(DaemonSettings(), board) < board.ram_mb


def test_thread_defaults_per_board():
    from hublabio.board import profile_for

    pi5 = profile_for("Raspberry Pi 5 Model B Rev 1.0", 8000)
    assert (pi5.threads, pi5.threads_batch) == (2, 4)  # generation peaks at ~2 on a Pi 5
    pi4 = profile_for("Raspberry Pi 4 Model B Rev 1.4", 4000)
    assert (pi4.threads, pi4.threads_batch) == (4, 4)
    generic = profile_for("", 16000, cores=2)
    assert (generic.threads, generic.threads_batch) == (2, 2)


def test_daemon_load_settings_take_flags_then_user_then_board(monkeypatch):
    from hublabio.board import profile_for
    from hublabio.config import DaemonSettings, update_settings
    from hublabio.daemon.service import load_settings

    pi5 = profile_for("Raspberry Pi 5 Model B Rev 1.0", 8000)
    assert (load_settings(DaemonSettings(), pi5).threads,
            load_settings(DaemonSettings(), pi5).threads_batch) == (2, 4)
    update_settings("inference", "threads", 3)
    assert load_settings(DaemonSettings(), pi5).threads == 3
    got = load_settings(DaemonSettings(threads=1, threads_batch=2, repack=False), pi5)
    assert (got.threads, got.threads_batch, got.repack) == (1, 2, False)


@pytest.mark.parametrize("ram_mb, slots, contexts", [(512, 1, 1), (1024, 2, 1), (3794, 2, 1),
                                                     (7812, 4, 2), (16384, 4, 2)])
def test_slots_and_adapter_contexts_grow_with_the_boards_memory(ram_mb, slots, contexts):
    board = Board("Generic Linux", "", ram_mb, 4, 512)
    assert (board.parallel, board.adapter_contexts) == (slots, contexts)
