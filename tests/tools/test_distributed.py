"""The same `train` under torchrun: 2 CPU processes (gloo DDP through accelerate) follow the loss
trajectory of 1 process with the same global batch (half the accumulation per process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
# One intra-op thread: on a shared 2-core machine torch's spinning OpenMP threads make a step
# several times slower than one thread (measured 12 s vs 40 s for a SmolLM2-sized step).
torch.set_num_threads(int(os.environ.get("HUBLAB_TORCH_THREADS", "1")))

from hublabio_tools import cli  # noqa: E402
from hublabio_tools.train import save_tokenizer, train_tokenizer  # noqa: E402

from test_train import write_corpus  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
            {r["step"]: r["tokens"] for r in rows if "tokens" in r})


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=60)
    data = tmp_path / "data"
    assert cli.main(["prepare-data", str(corpus), "--out", str(data)]) == 0
    tokenizer = tmp_path / "tokenizer"
    rows = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    save_tokenizer(train_tokenizer(rows, 400), tokenizer)
    common = ["--data", str(data), "--tokenizer", str(tokenizer), "--recipe", "hublabio-tiny",
              "--max-steps", "5", "--eval-every", "5", "--micro-batch", "2", "--seed", "3", "--quiet"]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "hublabio_tools.cli", "train", "--out", str(two), "--grad-accum", "1"] + common
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    one = tmp_path / "one"
    assert cli.main(["train", "--out", str(one), "--grad-accum", "2"] + common) == 0

    loss2, val2, tokens2 = losses(two)
    loss1, val1, tokens1 = losses(one)
    assert sorted(loss2) == sorted(loss1) == [1, 2, 3, 4, 5]
    # One metrics line per step: only the main process writes, and both saw the global batch.
    assert tokens2 == tokens1
    for step in loss1:
        assert loss2[step] == pytest.approx(loss1[step], rel=1e-4), step
    for step in val1:
        assert val2[step] == pytest.approx(val1[step], rel=1e-4), step
    assert loss1[5] < loss1[1]  # it learned something, so the comparison is not trivial
    assert (two / "model.safetensors").exists()


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from hublabio_tools.common import DISTRIBUTED_DIR

    kinds = {}
    for path in sorted(DISTRIBUTED_DIR.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type).rsplit(".", 1)[-1]
        if kinds[path.stem] == "DEEPSPEED":
            ds_file = config.deepspeed_config["deepspeed_config_file"]
            ds = json.loads((DISTRIBUTED_DIR.parent.parent / ds_file).read_text())
            assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
            assert ds["train_micro_batch_size_per_gpu"] == "auto"
        if kinds[path.stem] == "FSDP":
            assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert kinds == {"ddp": "MULTI_GPU", "ddp_cpu": "MULTI_CPU", "fsdp": "FSDP",
                     "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}


def test_finetune_two_processes_match_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=45)
    data = tmp_path / "data"
    assert cli.main(["prepare-data", str(corpus), "--out", str(data)]) == 0
    base = tmp_path / "base"
    assert cli.main(["train", "--data", str(data), "--out", str(base), "--max-steps", "2", "--quiet"]) == 0
    common = ["--base", str(base), "--data", str(data), "--rank", "4", "--alpha", "8", "--dropout", "0",
              "--lr", "5e-3", "--max-steps", "3", "--micro-batch", "2", "--eval-every", "3", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "hublabio_tools.cli", "finetune", "--out", str(two), "--grad-accum", "1"] + common
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    assert cli.main(["finetune", "--out", str(one), "--grad-accum", "2"] + common) == 0
    loss2, val2, tokens2 = losses(two)
    loss1, val1, tokens1 = losses(one)
    assert sorted(loss1) == sorted(loss2) == [1, 2, 3] and tokens1 == tokens2
    for step in loss1:
        assert loss2[step] == pytest.approx(loss1[step], rel=1e-4), step
    assert val2[3] == pytest.approx(val1[3], rel=1e-4) and val1[3] != val1[0]
    assert (two / "adapter_model.safetensors").exists()
