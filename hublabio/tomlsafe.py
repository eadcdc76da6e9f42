"""TOML with limits, for every TOML file the device reads (model configs, settings, daemon
settings, package manifests and records): a size cap read without loading more than the cap,
a nesting depth, and numbers of bounded length. Python's own parser would otherwise raise
RecursionError on a 3000-deep array and ValueError on a 5000-digit integer, or load a 600 MB
manifest whole."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import BinaryIO

MAX_BYTES = 1 << 20   # a config or manifest over 1 MiB is refused
MAX_DEPTH = 16        # tables and arrays nested deeper than this are refused


class TomlLimitError(ValueError):
    """The document is over a limit; the message names which and where."""


def read_capped(source: Path | BinaryIO, limit: int = MAX_BYTES) -> bytes:
    """At most `limit` bytes of a file or stream; more is a TomlLimitError (nothing beyond
    limit + 1 bytes is read)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            data = f.read(limit + 1)
    else:
        data = source.read(limit + 1)
    if len(data) > limit:
        raise TomlLimitError(f"larger than {limit // 1024} KiB")
    return data


def loads(text: str, *, max_depth: int = MAX_DEPTH) -> dict:
    """tomllib.loads within the limits; a TOML syntax error stays a tomllib.TOMLDecodeError."""
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise TomlLimitError("nested too deeply to parse") from None
    except tomllib.TOMLDecodeError:
        raise
    except ValueError as exc:  # int() beyond sys.get_int_max_str_digits()
        raise TomlLimitError(f"a number is too long ({exc.args[0].split(':')[0]})") from None
    _check_depth(doc, max_depth)
    return doc


def _check_depth(doc: dict, max_depth: int) -> None:
    stack: list[tuple[object, str, int]] = [(doc, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > max_depth:
            raise TomlLimitError(f"{where or 'the document'}: nested deeper than {max_depth} "
                                 "levels")
        if isinstance(value, dict):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
