"""The parameter schema (hublabio.params) is the one source: the dataclasses carry its fields
and defaults, and every surface (model TOML, daemon TOML, `ai config`, socket options, HTTP
bodies, hublabd's flags) refuses the same out-of-range values with the same words. The cases
are generated from the schema, so a parameter added there is covered here."""

from __future__ import annotations

import dataclasses

import pytest

from hublabio import params
from hublabio.config import (
    DaemonSettings,
    InferenceConfig,
    load_daemon_settings,
    load_model_config,
    validate_inference_override,
)
from hublabio.errors import ConfigError, ProtocolError


def _fields(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def _schema(family, where=None) -> dict:
    return {p.name: p.default for p in family if where is None or where in p.where}


def test_the_dataclasses_are_the_schema():
    from hublabio.engine import SamplingOptions
    from hublabio.moe import MoESettings

    assert _fields(InferenceConfig) == _schema(params.INFERENCE, params.MODEL)
    assert _fields(SamplingOptions) == {**_schema(params.INFERENCE, params.REQUEST),
                                        "logprobs": True}
    assert _fields(MoESettings) == _schema(params.MOE)
    assert _fields(DaemonSettings) == {**_schema(params.DAEMON), "source": None}


def _out_of_range(family):
    for p in family:
        if p.type not in ("int", "float") or p.lo is None:
            continue
        step = 1 if p.type == "int" else 0.5
        bad = [p.lo - step if not p.lo_open else p.lo]
        if p.hi is not None:
            bad.append(p.hi + step)
        for v in bad:
            yield pytest.param(p, v, id=f"{p.name}={v}")


def _fragment(p) -> str:
    return "must be >= " if p.hi is None else "must be in "


@pytest.mark.parametrize("p, value", list(_out_of_range(params.INFERENCE)))
def test_every_inference_surface_refuses_the_same_values(tmp_path, isolated_state, p, value):
    from hublabio.daemon.http import HttpError, _options
    from hublabio.daemon.service import _check_options

    frag = _fragment(p)
    if params.MODEL in p.where:
        f = tmp_path / "m.toml"
        f.write_text(f'[model]\nname = "m"\npath = "m.gguf"\n[inference]\n{p.name} = {value}\n')
        with pytest.raises(ConfigError, match=rf"\[inference\] {p.name}: {frag}"):
            load_model_config(f)
    if params.USER in p.where:  # ai config KEY VALUE: text from the shell
        with pytest.raises(ConfigError, match=frag) as info:
            validate_inference_override(p.name, str(value))
        assert info.value.key == p.name
    if params.REQUEST in p.where:
        with pytest.raises(ProtocolError, match=rf"options\.{p.name}: {frag}"):
            _check_options({p.name: value})
    for field in p.openai:
        with pytest.raises(HttpError, match=frag) as info:
            _options({field: value})
        assert info.value.param == field  # the body field the client sent


@pytest.mark.parametrize("p, value", list(_out_of_range(params.DAEMON)))
def test_the_daemon_file_and_flags_refuse_the_same_values(tmp_path, capsys, p, value):
    from hublabio.daemon.main import build_parser

    f = tmp_path / "h.toml"
    f.write_text(f"[{p.section}]\n{p.key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"\[{p.section}\] {p.key}: {_fragment(p)}"):
        load_daemon_settings(f)
    if p.cli:
        with pytest.raises(SystemExit):
            build_parser().parse_args([p.cli, str(value)])
        assert f"argument {p.cli}: {_fragment(p)}" in capsys.readouterr().err


@pytest.mark.parametrize("p, value", list(_out_of_range(params.MOE)))
def test_moe_settings_refuse_out_of_range_values(isolated_state, p, value):
    from hublabio.moe import validate_moe_setting

    with pytest.raises(ConfigError, match=_fragment(p)):
        validate_moe_setting(p.name, str(value))


def test_text_values_convert_by_type():
    by = params.by_name(params.MOE)
    assert params.check(by["enabled"], "off", text=True) is False
    assert params.check(by["routing"], "Top-K", text=True) == "topk"
    assert params.check(by["k"], "3", text=True) == 3
    with pytest.raises(params.ParamError, match="must be one of"):
        params.check(by["synthesis"], "loudest", text=True)
    d = params.by_name(params.DAEMON)
    assert params.check(d["repack"], "off", text=True) is False
    assert params.check(d["repack"], "auto", text=True) == "auto"
    assert params.check(d["os_reserve_mb"], "auto") is None


def test_openai_fields_map_to_the_options():
    opts, came_from = params.openai_options({"max_completion_tokens": 9, "temperature": 0,
                                             "user": "x", "top_k": None})
    assert opts == {"max_tokens": 9, "temperature": 0}
    assert came_from == {"max_tokens": "max_completion_tokens", "temperature": "temperature"}


def test_remote_experts_forward_every_openai_option():
    from hublabio.remote import _FORWARD

    assert set(_FORWARD) == {p.name for p in params.INFERENCE if p.openai} - {"max_tokens"}


def test_every_synthesis_choice_is_implemented():
    from hublabio import synth

    assert synth.STRATEGIES == params.by_name(params.MOE)["synthesis"].choices
    for name in synth.STRATEGIES:
        assert callable(getattr(synth, name))  # synth.run dispatches to it


def test_architecture_doc_shows_the_schema():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    for family in (params.INFERENCE, params.MOE, params.DAEMON):
        for row in params.table_rows(family):
            assert row in doc, f"docs/ARCHITECTURE.md lacks the schema row {row}"


def test_the_shells_keys_come_from_the_schema():
    from hublabio.shell import commands, commands_moe

    user = params.names(params.INFERENCE, params.USER)
    assert commands.CONFIG_KEYS == (*user, "reset")
    for key in user:  # the command's help (its docstring) names each key
        assert key in commands.ai_config.__doc__
    assert set(commands_moe.MOE_KEYS) == {p.name for p in params.MOE}
