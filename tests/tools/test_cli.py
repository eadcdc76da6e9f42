"""hublab-tools' verb table: --help stays torch-free, each training verb's help is its docstring."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hublabio_tools import cli


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_does_not_import_torch():
    result = _run_isolated(
        "import sys\nfrom hublabio_tools.cli import main\nrc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\nsys.exit(rc)")
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    for verb in ("prepare-data", "train", "finetune", "merge", "train-expert"):
        assert verb in result.stdout


def test_prepare_data_help_does_not_import_torch():
    result = _run_isolated(
        "import sys\nfrom hublabio_tools.cli import main\n"
        "try:\n    main(['prepare-data', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)")
    assert "TORCH False" in result.stdout, result.stderr
    assert "near-duplicates" in result.stdout  # the module docstring is the help


@pytest.mark.parametrize("verb,phrase", [
    ("train", "sequence packing"),
    ("finetune", "The loss is on response"),
    ("merge", "merged HF checkpoint"),
    ("train-expert", "domains.toml"),
])
def test_verb_help_is_its_docstring(verb, phrase, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    assert phrase in capsys.readouterr().out


def test_a_failure_exits_1_with_a_message(tmp_path, capsys):
    rc = cli.main(["prepare-data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "missing.jsonl: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_commands_in_the_shipped_expert_tomls_parse_as_written():
    """Issue 14: the comments said `train-expert --domain python`; argparse took --domain for
    --domains-file and the command failed with "cannot read". Every `hublab-tools ...` quoted in
    a shipped expert TOML must parse, naming its domain; abbreviations are refused."""
    import importlib
    import re
    import shlex

    from hublabio import paths
    from hublabio_tools.cli import VERBS

    found = 0
    for toml in sorted((paths.REPO_ROOT / "models" / "experts").glob("*.toml")):
        for cmd in re.findall(r"`(hublab-tools [^`]+)`", toml.read_text()):
            words = shlex.split(cmd)[1:]
            module = importlib.import_module(f"hublabio_tools.{VERBS[words[0]][0]}")
            args = module.build_parser().parse_args(words[1:])
            assert args.domains == [toml.stem], (toml.name, cmd)
            found += 1
    assert found == 5
    from hublabio_tools.experts import build_parser

    with pytest.raises(SystemExit):  # --domain is not an abbreviation of --domains-file
        build_parser().parse_args(["--domain", "python", "--out", "models"])


def test_train_expert_writes_what_the_shipped_experts_say():
    """Issue 14: train-expert's TOML dropped the shipped `temperature = 0.4`. The domains file
    and the shipped device TOMLs agree, and the TOML train-expert writes keeps it all."""
    import tomllib

    from hublabio import paths
    from hublabio_tools.experts import expert_toml, load_domains

    for domain, spec in load_domains().items():
        shipped = tomllib.loads((paths.REPO_ROOT / "models" / "experts" / f"{domain}.toml")
                                .read_text())
        written = expert_toml(domain, spec, "base.gguf", f"{domain}.lora.gguf")
        assert written["inference"]["temperature"] == shipped["inference"]["temperature"]
        assert written["inference"]["system_prompt"] == shipped["inference"]["system_prompt"]
        assert written["expert"] == {k: shipped["expert"][k] for k in written["expert"]}


def test_train_expert_says_what_it_holds_out_for_validation():
    from hublabio_tools.experts import build_parser

    assert build_parser().parse_args(["python", "--out", "m"]).val_fraction == 0.2
    assert build_parser().parse_args(["python", "--out", "m", "--val-fraction", "0"]) \
        .val_fraction == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["python", "--out", "m", "--val-fraction", "1.5"])
    assert "--val-fraction" in build_parser().format_help()


@pytest.mark.parametrize("argv", [
    ["prepare-data", "{missing}", "--out", "{tmp}/o"],
    ["train", "--data", "{missing}", "--out", "{tmp}/o"],
    ["finetune", "--base", "{missing}", "--data", "{missing}", "--out", "{tmp}/o"],
    ["train-expert", "nosuchdomain", "--out", "{tmp}/o"],
    ["train-router", "--data", "{missing}", "--out", "{tmp}/o"],
    ["convert", "{missing}", "--out", "{tmp}/o.gguf"],
    ["convert-lora", "{missing}", "--base", "{missing}", "--out", "{tmp}/o.gguf"],
    ["quantize", "{missing}", "Q4_0", "--out", "{tmp}/o.gguf"],
    ["eval", "{missing}", "{missing}"],
    ["card", "{missing}"],
    ["deploy", "{tmp}/pkg"],
    ["publish", "{missing}", "--repo", "{tmp}/repo"],
    ["expert-from-adapter", "{missing}", "python", "--out", "{tmp}/m"],
])
def test_every_verb_exits_1_on_a_failure_and_2_on_a_usage_error(argv, tmp_path, capsys):
    """One exit status per kind of failure, whichever verb (convert exited 1, train 2)."""
    fill = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    rc = cli.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.strip() and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        cli.main([argv[0], "--no-such-option"])
    assert usage.value.code == 2
