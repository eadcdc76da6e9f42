"""config.py: every error names the file and the key; bad files are skipped, good ones load."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from hublabio import config
from hublabio.config import (DaemonSettings, InferenceConfig, load_daemon_settings, load_experts,
                             load_model_config, load_model_dir, read_settings, update_settings,
                             validate_inference_override)
from hublabio.errors import ConfigError
from hublabio.paths import REPO_ROOT, settings_file


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
[model]
name = "tiny"
path = "tiny.gguf"
"""


def test_minimal_file_gets_defaults_and_relative_path(tmp_path):
    cfg = load_model_config(write(tmp_path / "sub" / "m.toml", GOOD))
    assert cfg.name == "tiny" and cfg.type == "gguf"
    assert cfg.path == tmp_path / "sub" / "tiny.gguf"
    assert cfg.inference == InferenceConfig()
    assert cfg.source == tmp_path / "sub" / "m.toml"
    assert cfg.expert is None and cfg.pinned is False
    # a missing model file is not a load error, but the config says so
    assert not cfg.exists and "not found" in cfg.missing
    (tmp_path / "sub" / "tiny.gguf").write_bytes(b"x")
    assert cfg.exists and cfg.missing is None


def test_full_file(tmp_path):
    cfg = load_model_config(write(tmp_path / "m.toml", """
        [model]
        name = "py"
        path = "/abs/base.gguf"
        adapter = "py.lora.gguf"
        adapter_scale = 0.5
        pinned = true
        [inference]
        max_tokens = 100
        temperature = 0
        top_p = 1
        top_k = 0
        repeat_penalty = 1.0
        context_size = 512
        threads = 2
        system_prompt = "Be terse."
        [expert]
        domain = "python"
        keywords = ["python", "pip"]
        threshold = 0.3
        """))
    assert cfg.path == Path("/abs/base.gguf")
    assert cfg.adapter == tmp_path / "py.lora.gguf"
    assert cfg.adapter_scale == 0.5 and cfg.pinned
    assert cfg.inference.temperature == 0.0 and isinstance(cfg.inference.temperature, float)
    assert cfg.inference.context_size == 512 and cfg.inference.system_prompt == "Be terse."
    assert cfg.expert.domain == "python" and cfg.expert.keywords == ["python", "pip"]
    assert cfg.expert.threshold == 0.3
    assert hash(cfg) == hash(load_model_config(tmp_path / "m.toml"))  # usable as a dict key
    assert "adapter file not found" in (cfg.missing or "") or "model file" in (cfg.missing or "")


def test_remote_model(tmp_path):
    cfg = load_model_config(write(tmp_path / "r.toml", """
        [model]
        name = "big"
        type = "remote"
        url = "http://192.168.1.5:8080/v1"
        remote_model = "llama3"
        """))
    assert cfg.type == "remote" and cfg.path is None and cfg.exists
    assert cfg.url == "http://192.168.1.5:8080/v1" and cfg.remote_model == "llama3"


@pytest.mark.parametrize("body, key, fragment", [
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ntemperature = "hot"\n',
     "[inference] temperature", "expected a number, got 'hot'"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ntemprature = 0.5\n',
     "[inference] temprature", "did you mean 'temperature'"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ntop_p = 1.5\n',
     "[inference] top_p", "must be in (0.0, 1.0], got 1.5"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ncontext_size = 32\n',
     "[inference] context_size", "must be in [64, 131072]"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ncontext_size = 2048.5\n',
     "[inference] context_size", "expected an integer"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\nmax_tokens = 999\ncontext_size = 512\n',
     "[inference] max_tokens", "exceeds context_size 512"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ntop_k = -1\n',
     "[inference] top_k", "must be >= 0"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\nthreads = true\n',
     "[inference] threads", "expected an integer, got True"),
    ('[model]\nname = "a"\npath = "a.gguf"\npined = true\n', "[model] pined",
     "did you mean 'pinned'"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inferance]\n', "[inferance]",
     "did you mean 'inference'"),
    ('[model]\nname = "a"\ntype = "Llama 3"\npath = "a.gguf"\n', "[model] type",
     "expected an architecture name (llama, mistral"),
    ('[model]\npath = "a.gguf"\n', "[model] name", "missing"),
    ('[model]\nname = "a"\n', "[model] path", "missing"),
    ('[model]\nname = "a"\ntype = "remote"\n', "[model] url", "missing"),
    ('[model]\nname = "a"\ntype = "remote"\nurl = "ftp://x"\n', "[model] url", "http://"),
    ('[model]\nname = "a"\npath = "a.gguf"\nurl = "http://x"\n', "[model] url", "remote"),
    ('[model]\nname = "a"\npath = "pkg:nomodule"\n', "[model] path", "pkg:<module>/"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[expert]\nkeywords = ["x", 3]\n',
     "[expert] keywords", "expected a list of strings"),
    ('[inference]\ntop_k = 3\n', "[model]", "missing section"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\nrepack = "sometimes"\n',
     "[inference] repack", 'expected "auto", true or false'),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\nthreads_batch = 999\n',
     "[inference] threads_batch", "must be in [0, 256]"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\nmmap = "no"\n',
     "[inference] mmap", "expected true or false"),
])
def test_errors_name_file_and_key(tmp_path, body, key, fragment):
    path = write(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    err = info.value
    assert err.key == key
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: {key}: ")
    assert fragment in str(err)


def test_toml_syntax_error_has_line(tmp_path):
    path = write(tmp_path / "bad.toml", '[model]\nname = "a"\npath = "a.gguf\n')
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value) and "TOML syntax error" in str(info.value)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_model_config(tmp_path / "nope.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        load_model_config(tmp_path / "dir.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00[model]")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_model_config(tmp_path / "bin.toml")


def test_model_dir_skips_bad_file_and_reports_duplicates(tmp_path):
    write(tmp_path / "model-config.toml", GOOD)
    write(tmp_path / "a-dup.toml", GOOD)  # same name as the default: error for this later file
    write(tmp_path / "b.toml", '[model]\nname = "b"\npath = "b.gguf"\n')
    write(tmp_path / "c-bad.toml", '[model]\nname = "c"\npath = "c.gguf"\n[inference]\ntop_p = 0\n')
    write(tmp_path / "package.toml", '[package]\nname = "whatever"\n')  # not a model
    write(tmp_path / "experts" / "x.toml", GOOD)  # not top level
    configs, errors = load_model_dir(tmp_path)
    assert [c.name for c in configs] == ["tiny", "b"]
    assert configs[0].source.name == "model-config.toml"
    assert sorted(Path(e.path).name for e in errors) == ["a-dup.toml", "c-bad.toml"]
    dup = next(e for e in errors if e.path.endswith("a-dup.toml"))
    assert "duplicate model name 'tiny'" in str(dup) and "model-config.toml" in str(dup)


def test_model_dir_missing_folder_is_empty(tmp_path):
    assert load_model_dir(tmp_path / "none") == ([], [])


def test_experts_need_expert_section(tmp_path):
    write(tmp_path / "experts" / "python.toml", """
        [model]
        name = "python"
        path = "../base.gguf"
        adapter = "python.lora.gguf"
        [expert]
        domain = "python"
        keywords = ["python", "pandas"]
        description = "Python programming"
        """)
    write(tmp_path / "experts" / "plain.toml", GOOD)
    experts, errors = load_experts(tmp_path)
    assert [e.expert.domain for e in experts] == ["python"]
    assert experts[0].path == tmp_path / "experts" / ".." / "base.gguf"
    assert experts[0].adapter == tmp_path / "experts" / "python.lora.gguf"
    assert len(errors) == 1 and errors[0].key == "[expert]" and "plain.toml" in errors[0].path


def test_pkg_path_resolves_inside_installed_package_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fakepkg_hublab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "w.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = load_model_config(write(tmp_path / "m.toml",
                                  '[model]\nname = "p"\npath = "pkg:fakepkg_hublab/w.gguf"\n'))
    assert cfg.path == pkg / "w.gguf" and cfg.exists
    assert cfg.path_spec == "pkg:fakepkg_hublab/w.gguf"
    assert "fakepkg_hublab" not in sys.modules

    cfg = load_model_config(write(tmp_path / "n.toml",
                                  '[model]\nname = "q"\npath = "pkg:not_installed_xyz/w.gguf"\n'))
    assert not cfg.exists and "package 'not_installed_xyz' is not installed" in cfg.missing


def test_shipped_model_config_names_embedded_model(smollm2_path):
    cfg = load_model_config(REPO_ROOT / "models" / "model-config.toml")
    assert cfg.name == "smollm2-135m"
    assert cfg.path.resolve() == smollm2_path.resolve() and cfg.exists
    assert cfg.inference.system_prompt
    configs, errors = load_model_dir(REPO_ROOT / "models")
    assert errors == [] and "smollm2-135m" in [c.name for c in configs]


# --- daemon settings ------------------------------------------------------------------------

def test_shipped_daemon_settings_are_the_defaults():
    s = load_daemon_settings(REPO_ROOT / "etc" / "hublab.toml")
    assert s.source == REPO_ROOT / "etc" / "hublab.toml"
    from dataclasses import replace
    assert replace(s, source=None) == DaemonSettings()


def test_daemon_settings_values_and_paths(tmp_path):
    path = write(tmp_path / "etc" / "h.toml", """
        [daemon]
        socket = "run/h.sock"
        models_dir = "/srv/models"
        queue_size = 2
        idle_ttl_s = 30
        threads = 4
        [memory]
        budget_mb = 300
        os_reserve_mb = 128
        mmap = false
        mlock = true
        [http]
        listen = "0.0.0.0:8080"
        """)
    s = load_daemon_settings(path)
    assert s.socket == tmp_path / "etc" / "run" / "h.sock"
    assert s.models_dir == Path("/srv/models")
    assert (s.queue_size, s.idle_ttl_s, s.threads) == (2, 30.0, 4)
    assert (s.budget_mb, s.os_reserve_mb, s.mmap, s.mlock) == (300, 128, False, True)
    assert s.http == "0.0.0.0:8080"


def test_daemon_settings_missing_file(tmp_path):
    assert load_daemon_settings(None) == DaemonSettings()
    assert load_daemon_settings(tmp_path / "none.toml") == DaemonSettings()
    with pytest.raises(ConfigError, match="file not found"):
        load_daemon_settings(tmp_path / "none.toml", required=True)


@pytest.mark.parametrize("body, key, fragment", [
    ("[daemon]\nqueue_size = 0\n", "[daemon] queue_size", "must be in [1, 1024]"),
    ("[daemon]\nqueue = 3\n", "[daemon] queue", "did you mean 'queue_size'"),
    ("[memory]\nbudget_mb = \"lots\"\n", "[memory] budget_mb", "expected an integer, got 'lots'"),
    ("[memory]\nos_reserve_mb = -5\n", "[memory] os_reserve_mb", "must be >= 0"),
    ("[memory]\nos_reserve_mb = \"some\"\n", "[memory] os_reserve_mb", "\"auto\""),
    ("[memory]\nmlock = 1\n", "[memory] mlock", "expected true or false"),
    ("[http]\nlisten = \"8080\"\n", "[http] listen", "HOST:PORT"),
    ("[htp]\n", "[htp]", "did you mean 'http'"),
])
def test_daemon_settings_errors(tmp_path, body, key, fragment):
    path = write(tmp_path / "h.toml", body)
    with pytest.raises(ConfigError) as info:
        load_daemon_settings(path)
    assert info.value.key == key and info.value.path == str(path)
    assert fragment in str(info.value)


# --- user settings --------------------------------------------------------------------------

def test_user_settings_roundtrip(isolated_state):
    assert read_settings() == {}
    update_settings("inference", "temperature", "0.2")
    update_settings("inference", "context_size", "512")
    update_settings("moe", "strategy", "topk")
    assert settings_file().parent == isolated_state
    data = read_settings()
    assert data == {"inference": {"temperature": 0.2, "context_size": 512},
                    "moe": {"strategy": "topk"}}
    assert isinstance(data["inference"]["context_size"], int)
    update_settings("inference", "temperature", None)
    assert read_settings()["inference"] == {"context_size": 512}
    # no temp files left behind by the atomic writer
    assert sorted(p.name for p in isolated_state.iterdir()) == ["settings.toml"]


def test_update_settings_rejects_bad_value_and_keeps_file(isolated_state):
    update_settings("inference", "top_k", 20)
    before = settings_file().read_text()
    with pytest.raises(ConfigError) as info:
        update_settings("inference", "top_k", "many")
    assert info.value.key == "top_k" and "expected an integer, got 'many'" in str(info.value)
    assert settings_file().read_text() == before
    with pytest.raises(ConfigError, match="unknown section"):
        update_settings("sampling", "x", 1)


@pytest.mark.parametrize("key, value, expected", [
    ("temperature", "0.5", 0.5), ("temperature", 1, 1.0), ("top_k", "40", 40),
    ("context_size", 4096.0, 4096), ("threads", " 2 ", 2), ("repeat_penalty", "1.2", 1.2),
    ("max_tokens", 64, 64), ("top_p", "1", 1.0),
])
def test_validate_override_coerces(key, value, expected):
    got = validate_inference_override(key, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key, value, fragment", [
    ("temperature", "hot", "expected a number, got 'hot'"),
    ("temperature", "3", "must be in [0.0, 2.0]"),
    ("context_size", "10", "must be in [64, 131072]"),
    ("top_k", "1.5", "expected an integer"),
    ("temprature", "0.5", "did you mean 'temperature'"),
    ("system_prompt", "hi", "unknown setting"),
])
def test_validate_override_errors(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        validate_inference_override(key, value)
    assert info.value.key == key and fragment in str(info.value)


def test_hand_edited_settings_file_error_names_key(isolated_state):
    settings_file().write_text("[inference]\ntop_p = 7\n")
    with pytest.raises(ConfigError) as info:
        read_settings()
    assert info.value.key == "[inference] top_p" and info.value.path == str(settings_file())


def test_overrides_apply_and_cap_max_tokens(tmp_path):
    cfg = load_model_config(write(tmp_path / "m.toml", GOOD))
    eff = config.effective_inference(cfg, {"inference": {"context_size": 128, "temperature": 0.1}})
    assert eff.context_size == 128 and eff.temperature == 0.1 and eff.max_tokens == 128
    assert cfg.inference.context_size == 2048  # the original is untouched


def test_load_settings_in_a_model_toml_and_the_daemon_file(tmp_path):
    cfg = load_model_config(write(tmp_path / "m.toml", '[model]\nname = "a"\npath = "a.gguf"\n'
                                  '[inference]\nthreads = 2\nthreads_batch = 4\nrepack = false\n'
                                  'mmap = false\nmlock = true\n'))
    inf = cfg.inference
    assert (inf.threads, inf.threads_batch, inf.repack, inf.mmap, inf.mlock) == (2, 4, False,
                                                                                False, True)
    default = load_model_config(write(tmp_path / "d.toml", '[model]\nname = "b"\npath = "a.gguf"\n'))
    assert (default.inference.repack, default.inference.mmap) == ("auto", None)
    daemon = load_daemon_settings(write(tmp_path / "h.toml",
                                        '[daemon]\nthreads_batch = 3\nrepack = true\n'))
    assert (daemon.threads_batch, daemon.repack) == (3, True)


def test_hublabd_flags_for_threads_and_repack(tmp_path):
    from hublabio.daemon.main import build_parser, settings_from_args

    args = build_parser().parse_args(["--config", str(write(tmp_path / "h.toml", "")),
                                      "--threads", "2", "--threads-batch", "4",
                                      "--repack", "off"])
    got = settings_from_args(args)
    assert (got.threads, got.threads_batch, got.repack) == (2, 4, False)



@pytest.mark.parametrize("flag, value, fragment", [
    ("--queue-size", "0", "must be in [1, 1024], got 0"),  # the TOML's range, not a laxer one
    ("--threads", "-1", "must be in [0, 256], got -1"),
    ("--budget-mb", "lots", "expected an integer, got 'lots'"),
    ("--repack", "maybe", "expected on or off or auto"),
    ("--http", "host:99999", "expected HOST:PORT"),
    ("--cors-origin", "ftp://x", "an origin like"),
])
def test_hublabd_flags_are_checked_by_the_schema(capsys, flag, value, fragment):
    from hublabio.daemon.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and fragment in err


@pytest.mark.parametrize("body,fragment", [
    ('[model]\nname = "a"\npath = "a.gguf"\nx = ' + "[" * 3000 + "]" * 3000 + "\n",
     "nested too deeply"),
    ('[model]\nname = "a"\npath = "a.gguf"\nx = ' + "[" * 40 + "]" * 40 + "\n",
     "nested deeper than 16"),
    ('[model]\nname = "a"\npath = "a.gguf"\n[inference]\ntop_k = ' + "9" * 5000 + "\n",
     "a number is too long"),
    ('[model]\nname = "a"\npath = "a.gguf"\n# ' + "x" * (1 << 20) + "\n", "larger than 1024 KiB"),
])
def test_hostile_toml_is_a_config_error_not_a_crash(tmp_path, body, fragment):
    path = write(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_model_config(path)
    assert str(info.value).startswith(str(path))
    # the other files of the folder still load, and settings/daemon files get the same check
    write(tmp_path / "good.toml", '[model]\nname = "ok"\npath = "a.gguf"\n')
    configs, errors = load_model_dir(tmp_path)
    assert [c.name for c in configs] == ["ok"] and len(errors) == 1
    with pytest.raises(ConfigError, match=fragment):
        load_daemon_settings(write(tmp_path / "h.toml", body.replace("[model]", "[daemon]")
                                   .replace('name = "a"\npath = "a.gguf"\n', "")), required=True)


def _bump(key_and_rounds):
    key, rounds = key_and_rounds
    from hublabio.config import read_settings, update_settings

    for i in range(rounds):
        update_settings("inference", key, i + 1)
    return read_settings()["inference"][key]


def test_concurrent_settings_writers_lose_no_update():
    """Two processes and two threads each write their own key, 25 times: every key ends at its
    last value (without the lock, one writer's read-modify-write overwrote the other's)."""
    import multiprocessing
    import threading

    from hublabio.config import read_settings

    keys = ["max_tokens", "top_k", "threads", "threads_batch"]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as procs:
        pending = procs.map_async(_bump, [(k, 25) for k in keys[:2]])
        threads = [threading.Thread(target=_bump, args=((k, 25),)) for k in keys[2:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert pending.get(60) == [25, 25]
    assert {k: read_settings()["inference"][k] for k in keys} == dict.fromkeys(keys, 25)


def test_a_folder_or_a_symlink_loop_named_toml_is_reported_not_skipped(tmp_path):
    write(tmp_path / "good.toml", '[model]\nname = "ok"\npath = "a.gguf"\n')
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "loop.toml").symlink_to(tmp_path / "loop.toml")
    configs, errors = load_model_dir(tmp_path)
    assert [c.name for c in configs] == ["ok"]
    messages = sorted(str(e) for e in errors)
    assert len(messages) == 2
    assert "dir.toml: is a directory" in messages[0]
    assert "loop.toml: cannot read" in messages[1]


def test_a_damaged_settings_file_says_how_to_reset_and_reset_keeps_it(isolated_state):
    from hublabio.config import reset_settings

    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[inference\ntemperature = 0.5\n")
    for action in (read_settings, lambda: update_settings("inference", "top_k", 5)):
        with pytest.raises(ConfigError, match="ai config reset"):
            action()
    kept = reset_settings()
    assert kept.read_text() == "[inference\ntemperature = 0.5\n" and not path.exists()
    update_settings("inference", "top_k", 5)
    assert read_settings() == {"inference": {"top_k": 5}}
    assert reset_settings() is not None and reset_settings() is None


def test_cors_origins_from_the_file_and_the_flag(tmp_path):
    from hublabio.daemon.main import build_parser, settings_from_args

    path = write(tmp_path / "h.toml", '[http]\ncors_origins = ["http://localhost:3000", "*"]\n')
    assert load_daemon_settings(path).cors_origins == ("http://localhost:3000", "*")
    bad = write(tmp_path / "bad.toml", '[http]\ncors_origins = ["localhost:3000"]\n')
    with pytest.raises(ConfigError, match=r"\[http\] cors_origins.*an origin like"):
        load_daemon_settings(bad)
    args = build_parser().parse_args(["--config", str(path), "--cors-origin", "https://a.b:8"])
    assert settings_from_args(args).cors_origins == ("https://a.b:8",)
    assert DaemonSettings().cors_origins == ()
