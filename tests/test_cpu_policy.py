"""hublabio.llama.cpu: the repack setting, AMX detection and what each policy allows."""

from __future__ import annotations

import pytest

from hublabio.llama.cpu import decide, has_amx, parse_repack

AMX_HOST = frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"})
EPYC = frozenset({"avx2", "avx512f"})


@pytest.mark.parametrize("value,expected", [
    ("auto", "auto"), (True, True), (False, False), ("on", True), ("off", False),
    ("true", True), ("FALSE", False), ("", "auto")])
def test_parse_repack(value, expected):
    assert parse_repack(value) == expected


def test_parse_repack_refuses_anything_else():
    with pytest.raises(ValueError, match="repack must be"):
        parse_repack("sometimes")


def test_amx_detection():
    assert has_amx(AMX_HOST) and not has_amx(EPYC) and not has_amx(frozenset())


def test_auto_keeps_every_repack_but_amx():
    auto = decide("auto", machine="x86_64", flags=AMX_HOST)
    assert auto.use_extra_bufts and not auto.allow_amx
    assert auto.repacked("Q4_K", 1024) and not auto.repacked("Q4_1", 1024)
    assert decide("auto", machine="x86_64", flags=EPYC).reason == "auto"


def test_true_forces_amx_and_false_turns_everything_off():
    assert decide(True, machine="x86_64", flags=AMX_HOST).allow_amx
    assert not decide(True, machine="x86_64", flags=EPYC).allow_amx  # nothing to allow
    off = decide(False, machine="x86_64", flags=AMX_HOST)
    assert not off.use_extra_bufts and not off.repacked("Q4_0", 64)


def test_pi_boards():
    pi5 = decide("auto", machine="aarch64", flags=frozenset({"asimd", "asimddp"}))
    assert pi5.repacked("Q4_0", 4) and pi5.repacked("Q8_0", 8) and not pi5.repacked("Q4_1", 8)
    pi4 = decide("auto", machine="aarch64", flags=frozenset({"asimd"}))
    assert not pi4.repacked("Q4_0", 64)


def test_apply_policy_keeps_every_extra_buffer_type_but_amx_under_auto():
    from hublabio.llama import backend

    offered = backend.extra_buffer_types()
    assert backend.apply_policy(decide("auto")) == [b for b in offered if b != "AMX"]
    assert backend.apply_policy(decide(False)) == []
    assert backend.apply_policy(decide(True)) == offered
    backend.apply_policy(decide("auto"))  # leave the process as every load expects it
