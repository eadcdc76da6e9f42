"""Verb options declared once, as dataclass fields, and everything derived from them.

A field declared with `option(default, help)` is an option: `add_options(parser, Cls)` adds
`--field-name` to argparse (its type from the default, `store_true` for a bool), and
`resolve(Cls, args, recipe=..., defaults=...)` gives each option's value with one precedence:
the flag when given, else the recipe's [train] value, else the verb's `defaults`, else the
field's default. A verb whose defaults differ from the field's (finetune's lr 2e-4 against
train's 3e-4) states them in one dict beside its parser; its --help shows them.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields
from typing import Any

from hublabio_tools.common import ToolError


def option(default, help: str, *, type=None, **argparse_kw) -> Any:
    """A dataclass field that is also a command-line option (see the module doc)."""
    return field(default=default, metadata={"help": help, "type": type, "kw": argparse_kw})


def options(cls) -> list:
    return [f for f in fields(cls) if "help" in f.metadata]


def option_names(*classes) -> list[str]:
    return [f.name for cls in classes for f in options(cls)]


def _default(f, defaults: dict | None):
    if defaults and f.name in defaults:
        return defaults[f.name]
    return None if f.default is MISSING else f.default


def add_options(parser: argparse.ArgumentParser, cls, *, defaults: dict | None = None,
                skip=(), from_recipe: bool = False) -> None:
    """One argparse option per `option` field of `cls` not in `skip`. With `from_recipe` the
    parsed value is None unless the flag is given, so `resolve` can apply the recipe."""
    for f in options(cls):
        if f.name in skip:
            continue
        default = _default(f, defaults)
        flag = "--" + f.name.replace("_", "-")
        shown = "the recipe's, else " if from_recipe else ""
        help_text = f"{f.metadata['help']} (default: {shown}{default})"
        if isinstance(default, bool) or f.metadata["type"] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true",
                                default=None if from_recipe else default, help=f.metadata["help"])
            continue
        kind = f.metadata["type"] or type(f.default if f.default is not None else default)
        parser.add_argument(flag, dest=f.name, type=kind, default=None if from_recipe else default,
                            help=help_text, **f.metadata["kw"])


def resolve(cls, args: argparse.Namespace, *, recipe: dict | None = None,
            defaults: dict | None = None, skip=(), where: str = "recipe [train]") -> dict:
    """{option: value} for `cls`'s options (see the module doc); a recipe key that is no option
    of `cls` (nor in `skip`, which the caller handles) is a ToolError naming it."""
    names = {f.name for f in options(cls)}
    for key in recipe or {}:
        if key not in names and key not in skip:
            raise ToolError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(names))}")
    out = {}
    for f in options(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            out[f.name] = given
        elif recipe and f.name in recipe:
            out[f.name] = recipe[f.name]
        else:
            out[f.name] = _default(f, defaults)
    return out
