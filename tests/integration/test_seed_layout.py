"""A models directory laid out exactly as the seed's deployment guide writes it: its
model-config.toml byte for byte (type = "llama", path = "/models/model-q4_k_m.gguf"), bare
expert GGUFs in experts/ (one of them a LoRA adapter), and a seed-format router.onnx (a tiny
transformer classifier, tests/integration/seed_router_fixture.py) in router/ with its tokenizer
and domains.json in router/final/. The real `hublab` shell drives the real daemon over it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hublabio.bare_experts import domain_of
from hublabio.config import load_experts, load_model_dir

from .lora_fixture import make_lora_adapter

# The seed's guide, "Deploying to HubLab IO", step 2, byte for byte.
SEED_MODEL_CONFIG = """[model]
name = "hublabio-custom"
path = "/models/model-q4_k_m.gguf"
type = "llama"

[inference]
max_tokens = 512
temperature = 0.7
top_p = 0.9
top_k = 40
context_size = 4096

[expert]
domain = "general"
keywords = []
threshold = 0.5
"""


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory, smollm2_path, seed_router):
    """The SD card's models/ folder. The GGUFs are links to SmolLM2 (a llama-architecture
    model), so every expert shares one resident base, as on the device."""
    models = tmp_path_factory.mktemp("sdcard") / "models"
    (models / "experts").mkdir(parents=True)
    (models / "model-config.toml").write_text(SEED_MODEL_CONFIG)
    os.symlink(smollm2_path, models / "model-q4_k_m.gguf")
    for domain in ("python", "rust", "system"):
        os.symlink(smollm2_path, models / "experts" / f"expert-{domain}-q4_k_m.gguf")
    make_lora_adapter(smollm2_path, models / "experts" / "expert-ai-f16.gguf", seed=3)
    shutil.copytree(seed_router[0], models / "router")
    return models


def hublab(models: Path, *lines: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HUBLAB_MODELS_DIR": str(models)}
    return subprocess.run([sys.executable, "-m", "hublabio.shell.main"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_domain_from_the_seeds_file_names():
    assert domain_of("expert-python-q4_k_m.gguf") == "python"
    assert domain_of("rust-q4_k_m.gguf") == "rust"
    assert domain_of("expert_system_Q8_0.gguf") == "system"
    assert domain_of("ai.lora.gguf") == "ai"
    assert domain_of("general.gguf") == "general"
    assert domain_of("my model.gguf") is None


def test_the_seed_config_loads_and_its_path_is_found_in_the_models_dir(seed_models):
    configs, errors = load_model_dir(seed_models)
    assert errors == []
    (cfg,) = configs
    assert (cfg.name, cfg.type, cfg.architecture) == ("hublabio-custom", "gguf", "llama")
    assert cfg.path == seed_models / "model-q4_k_m.gguf" and cfg.exists
    assert cfg.inference.context_size == 4096 and cfg.expert.domain == "general"


def test_bare_gguf_files_become_experts_with_the_domain_defaults(seed_models, smollm2_path):
    experts, errors = load_experts(seed_models)
    assert errors == []
    by_domain = {e.expert.domain: e for e in experts}
    assert sorted(by_domain) == ["ai", "general", "python", "rust", "system"]
    assert by_domain["general"].name == "hublabio-custom"  # model-config.toml's [expert]
    python = by_domain["python"]
    assert python.path == seed_models / "experts" / "expert-python-q4_k_m.gguf"
    assert "pandas" in python.expert.keywords and python.expert.threshold == 0.5
    assert python.inference.system_prompt.startswith("You are the Python expert of HubLab IO")
    assert python.inference.temperature == 0.4
    assert python.inference.context_size == 4096  # model-config.toml's, as the board's
    ai = by_domain["ai"]  # a LoRA adapter: attached to model-config.toml's base
    assert ai.adapter == seed_models / "experts" / "expert-ai-f16.gguf"
    assert ai.path == seed_models / "model-q4_k_m.gguf"
    assert ai.inference.context_size == 4096  # the base's [inference], the domain's prompt
    assert ai.inference.system_prompt.startswith("You are the AI")


def test_bad_bare_files_are_named_and_a_toml_beside_one_configures_it(tmp_path, smollm2_path):
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    (models / "experts" / "notes about it.gguf").write_bytes(b"GGUF")
    (models / "experts" / "rust-q4_0.gguf").write_bytes(b"not a model")
    os.symlink(smollm2_path, models / "experts" / "python-q4_k_m.gguf")
    (models / "experts" / "python-q4_k_m.toml").write_text(
        '[model]\nname = "my-python"\npath = "python-q4_k_m.gguf"\n'
        '[expert]\ndomain = "python"\nkeywords = ["snake"]\n')
    make_lora_adapter(smollm2_path, models / "experts" / "ai.lora.gguf", seed=1)
    experts, errors = load_experts(models)
    assert [(e.name, e.expert.keywords) for e in experts] == [("my-python", ["snake"])]
    messages = sorted(str(e) for e in errors)
    assert any("ai.lora.gguf" in m and "needs a local base model" in m for m in messages)
    assert any("notes about it.gguf" in m and "no domain in the file name" in m
               for m in messages)
    assert any("rust-q4_0.gguf" in m and "not usable as an expert" in m for m in messages)


def test_the_seed_walkthrough_in_the_shell(seed_models):
    run = hublab(seed_models,
                 "ai config max_tokens 12", "ai config temperature 0",
                 "ai list",
                 "ai load /models/model-q4_k_m.gguf",
                 'moe route "How do I use pandas?"',
                 "moe experts",
                 'moe query "How do I use pandas?"',
                 "ai info")
    out = run.stdout
    assert run.returncode == 0, run.stderr + out
    assert re.search(r"^\s*\*?\s*hublabio-custom\b", out, re.M), out
    assert re.search(r"Model loaded: 135M parameters, Q4_1", out), out
    route = out[out.index('Query: "How do I use pandas?"'):]
    first = re.search(r"→ Expert: (\w+) \(confidence: ([0-9.]+)\)", route)
    assert first.group(1) == "python" and float(first.group(2)) > 0.5, route
    assert "routing by keywords" not in out  # the transformer router ran
    for domain in ("python", "rust", "system", "ai", "general"):
        assert re.search(rf"^\s*{domain}\b", out, re.M), out
    assert "expert-ai-f16.gguf" in out  # the adapter expert over the base
    assert "[Router] Selected expert: python" in out
    assert re.search(r"^AI: \S", out, re.M), out
    assert re.search(r"^Tokens/sec:\s+[0-9.]+", out, re.M), out
    assert re.search(r"^Model:\s+hublabio-custom", out, re.M), out
    assert re.search(r"^Loaded:\s+yes", out, re.M), out  # the experts shared the loaded base


def test_a_type_that_is_not_the_files_architecture_is_refused_by_name(tmp_path, smollm2_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        SEED_MODEL_CONFIG.replace('type = "llama"', 'type = "qwen2"'))
    os.symlink(smollm2_path, models / "model-q4_k_m.gguf")
    run = hublab(models, "ai list")
    assert re.search(r"\[model\] type: 'qwen2', but .*model-q4_k_m\.gguf is a 'llama' model",
                     run.stdout + run.stderr), run.stdout + run.stderr
    run = hublab(models, "ai load hublabio-custom")
    assert run.returncode != 0
    assert re.search(r"model-config\.toml: \[model\] type: 'qwen2', but .* set type = 'llama'",
                     run.stderr), run.stderr


def test_the_daemon_sees_an_edited_model_config_expert_without_a_restart(tmp_path,
                                                                          smollm2_path):
    """model-config.toml's [expert] and [inference] feed the experts, so editing it must
    refresh the daemon's cached MoE as editing experts/ does."""
    from hublabio.client import Client

    from .test_daemon import make_daemon

    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    config = models / "model-config.toml"
    config.write_text(SEED_MODEL_CONFIG)
    os.symlink(smollm2_path, models / "model-q4_k_m.gguf")
    os.symlink(smollm2_path, models / "experts" / "expert-python-q4_k_m.gguf")
    with make_daemon(models) as d, Client(d.socket_path, timeout=60) as c:
        domains = {r["domain"] for r in c.call("moe.experts")["experts"]}
        assert domains == {"general", "python"}
        config.write_text(SEED_MODEL_CONFIG.replace('domain = "general"', 'domain = "ai"'))
        os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
        domains = {r["domain"] for r in c.call("moe.experts")["experts"]}
        assert domains == {"ai", "python"}
