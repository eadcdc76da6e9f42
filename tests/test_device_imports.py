"""The device path must never import torch or transformers (they do not fit a Pi's budget)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import hublabio

REPO = Path(__file__).resolve().parent.parent


def _device_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(hublabio.__path__, "hublabio."))


def test_no_device_module_imports_torch_or_transformers():
    modules = _device_modules()
    assert "hublabio.engine" in modules and "hublabio.pool" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"device modules imported: {out.stdout.strip()}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    assert len(commands) == 2, "the README starts with exactly two set-up commands"
    run_cmd, test_cmd = commands
    assert run_cmd.endswith(".venv/bin/hublab")
    assert "pytest" in test_cmd
    assert "grep -m1 '^python3 -m venv .venv && .venv/bin/pip install -c constraints.txt' README.md" in ci
    assert test_cmd.startswith("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt")
