"""Protocol framing and messages (pure logic, no daemon)."""

from __future__ import annotations

import json
import re

import pytest

from hublabio import protocol
from hublabio.errors import BudgetError, BusyError, ConfigError, HublabError, ProtocolError


def test_request_roundtrip():
    line = protocol.encode(protocol.make_request("generate", "r1", prompt="héllo", options={"a": 1}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    req = protocol.decode_request(line)
    assert req.id == "r1" and req.op == "generate"
    assert req.params == {"prompt": "héllo", "options": {"a": 1}}


def test_new_ids_are_unique():
    ids = {protocol.new_id() for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize("line, fragment, rid", [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    (b'{"v": 1, "op": "hello"}', '"id"', None),
    (b'{"v": 2, "id": "x", "op": "hello"}', "version mismatch", "x"),
    (b'{"id": "x", "op": "hello"}', "v=None", "x"),
    (b'{"v": 1, "id": "x"}', '"op"', "x"),
    (b'\xff\xfe', "not UTF-8", None),
])
def test_bad_requests_name_the_problem(line, fragment, rid):
    with pytest.raises(protocol.RequestError) as ei:
        protocol.decode_request(line)
    assert fragment in str(ei.value)
    assert ei.value.request_id == rid
    assert ei.value.code == "protocol"


def test_version_mismatch_says_both_versions():
    with pytest.raises(protocol.RequestError) as ei:
        protocol.decode_request(b'{"v": 7, "id": "x", "op": "hello"}')
    assert "v=7" in str(ei.value) and f"v={protocol.VERSION}" in str(ei.value)


def test_events_encode_and_decode():
    tok = protocol.decode_event(protocol.encode(protocol.token("a", -0.5, "r")))
    assert tok == {"v": 1, "id": "r", "type": "token", "text": "a", "logprob": -0.5}
    nan = protocol.decode_event(protocol.encode(protocol.token("b", float("-inf"), "r")))
    assert nan["logprob"] is None
    res = protocol.decode_event(protocol.encode(protocol.result({"x": 1}, "r")))
    assert res["type"] in protocol.TERMINAL and res["data"] == {"x": 1}
    with pytest.raises(ProtocolError, match="unknown type"):
        protocol.decode_event(b'{"v": 1, "id": "r", "type": "bogus"}')
    with pytest.raises(ProtocolError, match="version mismatch"):
        protocol.decode_event(b'{"v": 0, "id": "r", "type": "token"}')


def test_budget_error_roundtrip_keeps_numbers():
    exc = BudgetError("needs 300 MiB, budget 100 MiB, in use 0 MiB.", needed_mb=300.0,
                      budget_mb=100.0, in_use_mb=0.0, suggestion="context_size 512 would fit.")
    ev = protocol.decode_event(protocol.encode(protocol.error_event(exc, "r")))
    assert ev["code"] == "budget"
    back = protocol.exception_from_event(ev)
    assert isinstance(back, BudgetError)
    assert (back.needed_mb, back.budget_mb, back.in_use_mb) == (300.0, 100.0, 0.0)
    assert back.suggestion == "context_size 512 would fit."
    assert str(back) == str(exc)


def test_config_error_roundtrip_and_unknown_codes():
    exc = ConfigError("/m/x.toml", "inference.top_k", "must be >= 0")
    back = protocol.exception_from_event(protocol.error_event(exc, "r"))
    assert isinstance(back, ConfigError) and back.path == "/m/x.toml" and back.key == "inference.top_k"
    assert isinstance(protocol.exception_from_event(protocol.error("busy", "full")), BusyError)
    other = protocol.exception_from_event(protocol.error("martian", "??"))
    assert type(other) is HublabError and other.code == "martian" and str(other) == "??"


def test_non_hublab_exception_becomes_internal_error():
    ev = protocol.error_event(KeyError("k"), "r")
    assert ev["code"] == "internal" and "KeyError" in ev["message"]


def test_line_splitter_handles_partial_and_multiple_lines():
    s = protocol.LineSplitter(limit=100)
    assert s.feed(b'{"a":') == []
    assert s.feed(b'1}\n{"b":2}\n\n  \n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.feed(b":3}\r\n") == [b'{"c":3}']
    assert s.pending == 0


def test_line_splitter_drops_over_long_line_and_recovers():
    s = protocol.LineSplitter(limit=10)
    out = s.feed(b"x" * 8)
    out += s.feed(b"y" * 8)   # over the limit: nothing buffered beyond it
    assert out == [] and s.pending == 16
    out = s.feed(b"zz\nok\n")
    assert isinstance(out[0], protocol.TooLong) and out[0].size == 18
    assert out[1:] == [b"ok"]
    out = s.feed(b"a" * 11 + b"\n")  # over-long line in a single chunk
    assert len(out) == 1 and isinstance(out[0], protocol.TooLong)


def test_encode_refuses_unserializable_objects():
    with pytest.raises(TypeError):
        protocol.encode({"x": object()})
    assert json.loads(protocol.encode({"p": __import__("pathlib").Path("/a")}))["p"] == "/a"


def test_version_mismatch_is_its_own_error():
    with pytest.raises(protocol.VersionMismatch):
        protocol.decode_event(b'{"v": 2, "id": "r", "type": "token"}')
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_event(b'{"v": 1, "id": "r", "type": "tok')
    assert not isinstance(ei.value, protocol.VersionMismatch)


@pytest.mark.parametrize("line,fragment", [
    ('{"v":1,"id":"a","op":"generate","options":' + "[" * 5000 + "]" * 5000 + "}",
     'field "options": nested deeper than 32 levels'),
    ('{"v":1,"id":"a","op":"generate","options":{"seed":' + "7" * 5000 + "}}",
     'field "seed": a number of 5000 characters'),
    ('{"v":1,"id":"a","op":"generate","options":{"temperature":1e999}}',
     'field "temperature": 1e999 is out of range'),
    ('{"v":1,"id":"a","op":"generate","options":{"top_p":NaN}}', 'NaN is not a JSON number')])
def test_hostile_json_is_a_protocol_error_naming_the_field(line, fragment):
    with pytest.raises(protocol.RequestError, match=re.escape(fragment)):
        protocol.decode_request(line)


def test_brackets_inside_strings_do_not_count_as_depth():
    req = protocol.decode_request('{"v":1,"id":"a","op":"ask","question":"' + "[" * 500 + '"}')
    assert req.params["question"] == "[" * 500
