"""Experts from bare GGUF files: the seed's SD-card layout.

The seed's deployment guide copies experts as files with no TOML beside them:

    models/experts/expert-python-q4_k_m.gguf   (or python-q4_k_m.gguf, or python.gguf)

Each such file that no expert TOML names (as its `path` or `adapter`) becomes an expert:
- the domain is the file name without an `expert-` prefix and a quantization suffix
  (`-q4_k_m`, `-q8_0`, `-f16`, `.lora`...);
- keywords, threshold, temperature, description and system prompt are that domain's defaults
  in hublabio/domains.toml (the seed's five); another domain gets its own name as keyword;
- [inference] is the models directory's default model's (model-config.toml: the board's
  context size and sampling), with the domain's temperature and system prompt;
- a full model is loaded as its own model; a LoRA adapter (`general.type = adapter`) attaches to
  the default model, so it shares the loaded base.
A TOML beside the file (naming it) configures it instead. A file whose header cannot be read, or
whose name gives no domain, is reported as a ConfigError and skipped.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from hublabio.config import ExpertConfig, InferenceConfig, ModelConfig
from hublabio.errors import ConfigError, GGUFError

DOMAINS_FILE = Path(__file__).with_name("domains.toml")
_QUANT = r"(?:i?q\d[a-z0-9_]*|f16|f32|bf16|lora)"
_NAME_RE = re.compile(rf"^(?:expert[-_])?(?P<domain>[a-z][a-z0-9]*?)(?:[-_.]{_QUANT})*$")


def domain_of(filename: str) -> str | None:
    """`expert-python-q4_k_m.gguf` -> "python"; `rust-q8_0.gguf` -> "rust"; `ai.gguf` -> "ai";
    None when the name gives no domain."""
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    m = _NAME_RE.match(stem.lower())
    return m.group("domain") if m else None


@lru_cache(maxsize=1)
def domain_defaults() -> dict[str, dict]:
    """hublabio/domains.toml: {domain: {description, threshold, temperature, keywords,
    system_prompt}} (also what `hublab-tools train-expert` trains with)."""
    with open(DOMAINS_FILE, "rb") as f:
        return tomllib.load(f)


def _named_files(configs: list[ModelConfig]) -> set[Path]:
    named = set()
    for cfg in configs:
        for p in (cfg.path, cfg.adapter):
            if p is not None:
                named.add(Path(p).absolute())
    return named


def bare_experts(experts_dir: Path, named_by: list[ModelConfig],
                 base: ModelConfig | None) -> tuple[list[ModelConfig], list[ConfigError]]:
    """Experts for the *.gguf files in `experts_dir` that no config in `named_by` names.
    `base`: the model an adapter file attaches to (None: adapters are reported, not loaded)."""
    from hublabio.gguf_info import read_gguf_info

    named = _named_files(named_by)
    local_base = base is not None and base.type == "gguf" and base.path is not None
    found: list[ModelConfig] = []
    errors: list[ConfigError] = []
    for f in sorted(experts_dir.glob("*.gguf")):
        if f.absolute() in named:
            continue
        domain = domain_of(f.name)
        if domain is None:
            errors.append(ConfigError(f, None, "no domain in the file name: name a bare expert "
                                      "expert-<domain>-<quant>.gguf, or put a TOML beside it"))
            continue
        try:
            info = read_gguf_info(f)
        except GGUFError as exc:
            errors.append(ConfigError(f, None, f"not usable as an expert: {exc}"))
            continue
        spec = domain_defaults().get(domain, {})
        inference = replace(
            base.inference if local_base else InferenceConfig(),
            temperature=spec.get("temperature", InferenceConfig().temperature),
            system_prompt=spec.get("system_prompt")
            or f"You are the {domain} expert of HubLab IO. If you are not sure, say so.")
        if info.general_type == "adapter":
            if not local_base:
                errors.append(ConfigError(f, None, "a LoRA adapter needs a local base model: "
                                          "the models directory has no model-config.toml "
                                          "with a GGUF path"))
                continue
            path, adapter = base.path, f.absolute()
        else:
            path, adapter = f.absolute(), None
        expert = ExpertConfig(domain=domain, keywords=list(spec.get("keywords", [domain])),
                              threshold=float(spec.get("threshold", 0.5)),
                              description=spec.get("description", f"{domain} (bare GGUF)"))
        found.append(ModelConfig(name=f.stem, type="gguf", path=path, adapter=adapter,
                                 inference=inference, expert=expert, source=f.absolute(),
                                 path_spec=str(f)))
    return found, errors

