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


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    rc = cli.main(["prepare-data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "missing.jsonl: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
