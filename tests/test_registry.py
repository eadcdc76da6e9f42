"""The op registry: ops are declared on a module's OpTable, registered explicitly by the
Service, checked by their annotations, and a name registered twice is an error."""

from __future__ import annotations

import pytest

from hublabio.daemon import ops_core, ops_moe
from hublabio.daemon.registry import DuplicateOp, OpTable, Registry
from hublabio.errors import ProtocolError


def test_importing_a_module_registers_nothing_the_service_registers_each_once():
    reg = Registry()
    ops_core.ops.register(reg)
    assert "generate" in reg and "ask" not in reg  # ask is MoE-R's, with its own fallback
    ops_moe.ops.register(reg)
    assert {"ask", "moe.query", "hello"} <= set(reg)
    with pytest.raises(DuplicateOp, match=r"op 'hello' is registered twice: by "
                                          r"hublabio\.daemon\.ops_core\._hello and by "
                                          r"hublabio\.daemon\.ops_core\._hello"):
        ops_core.ops.register(reg)


def test_a_name_twice_in_two_modules_names_both():
    a, b = OpTable(), OpTable()

    @a.op("x")
    def first(svc, req):
        return {}

    @b.op("x", queued=True)
    def second(svc, req):
        return {}

    reg = Registry()
    a.register(reg)
    with pytest.raises(DuplicateOp, match="first and by .*second"):
        b.register(reg)
    assert reg.spec("x").fn is first and not reg.spec("x").queued


def test_parameters_are_checked_from_the_annotations():
    reg = Registry()
    t = OpTable()

    @t.op("t")
    def _t(svc, req, name: str, n: int = 1, extra: dict | None = None):
        return {}

    t.register(reg)
    spec = reg.spec("t")
    reg.check_params(spec, {"name": "a", "n": 2, "extra": None})
    for params, fragment in (({}, "missing parameter 'name'"),
                             ({"name": 5}, "'name' must be a string, got int"),
                             ({"name": "a", "n": True}, "'n' must be an integer, got bool"),
                             ({"name": "a", "zzz": 1}, "unknown parameter 'zzz'"),
                             ({"name": "\ud800"}, "lone surrogate")):
        with pytest.raises(ProtocolError, match=fragment):
            reg.check_params(spec, params)
    with pytest.raises(ProtocolError, match="unknown op 'nope'; known ops: t"):
        reg.spec("nope")
