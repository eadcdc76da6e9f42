"""JSON with limits, for everything a client or another server sends (socket request lines,
HTTP bodies, a remote expert's answers, package journals).

Python's json module turns a 100 000-deep array into a RecursionError, a 5000-digit integer
into a ValueError from int(), and `1e999` or `NaN` into non-finite floats that later break
replies. Here each of those is a `JsonLimitError` naming the limit and the field it was found
in (or the byte offset when no field name is at hand). The caller caps the size before
decoding (MAX_LINE, MAX_BODY_BYTES, tomlsafe.read_capped)."""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 32         # arrays and objects nested deeper than this are refused
MAX_NUMBER_CHARS = 32  # a number written with more characters than this is refused

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_KEY_BEFORE = re.compile(r'"((?:[^"\\]|\\.){1,64})"\s*:[\s\[]*$')


class JsonLimitError(ValueError):
    """The document is over a limit; the message names which and where."""


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH):
    """json.loads within the limits. A syntax error stays a json.JSONDecodeError (and invalid
    UTF-8 a UnicodeDecodeError); a limit is a JsonLimitError."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if text.count("[") + text.count("{") > max_depth:  # only then can it be too deep
        _check_depth(text, max_depth)
    try:
        return json.loads(text, parse_int=lambda s: _number(s, int, text),
                          parse_float=lambda s: _number(s, float, text),
                          parse_constant=lambda s: _refuse_constant(s, text))
    except RecursionError:  # unreachable past _check_depth; kept so it can never escape
        raise JsonLimitError(f"nested deeper than {max_depth} levels") from None


def _check_depth(text: str, max_depth: int) -> None:
    # brackets inside strings do not count; blanking keeps every offset where it was
    blanked = _STRING.sub(lambda m: '"' + " " * (len(m.group()) - 2) + '"', text)
    depth = 0
    for m in _BRACKET.finditer(blanked):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise JsonLimitError(f"{_where(text, m.start())}nested deeper than "
                                     f"{max_depth} levels")
        else:
            depth -= 1


def _number(s: str, kind, text: str):
    if len(s) > MAX_NUMBER_CHARS:
        raise JsonLimitError(f"{_where_value(text, s)}a number of {len(s)} characters; at most "
                             f"{MAX_NUMBER_CHARS}")
    value = kind(s)
    if kind is float and not math.isfinite(value):
        raise JsonLimitError(f"{_where_value(text, s)}{s} is out of range for a number")
    return value


def _refuse_constant(s: str, text: str):
    raise JsonLimitError(f"{_where_value(text, s)}{s} is not a JSON number")


def _where_value(text: str, literal: str) -> str:
    at = text.find(literal)
    return _where(text, at) if at >= 0 else ""


def _where(text: str, at: int) -> str:
    """'field "name": ' for the key just before `at`, else 'at character N: '."""
    m = _KEY_BEFORE.search(text, max(0, at - 200), at)
    if m:
        return f'field "{m.group(1)}": '
    return f"at character {at}: "
