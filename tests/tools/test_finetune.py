"""finetune / merge / train-expert: QLoRA guard, raw jsonl input, early stopping, and (slow) the
real SmolLM2 from its GGUF: loss goes down, and train-expert writes a valid device TOML."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
# One intra-op thread: on a shared 2-core machine torch's spinning OpenMP threads make a step
# several times slower than one thread (measured 12 s vs 40 s for a SmolLM2-sized step).
torch.set_num_threads(int(os.environ.get("HUBLAB_TORCH_THREADS", "1")))

from hublabio_tools import cli  # noqa: E402
from hublabio_tools.train import save_tokenizer, train_tokenizer  # noqa: E402

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("What colour is the sky?", "The sky is blue on a clear day."),
      ("How many legs has a cat?", "A cat has four legs."),
      ("What do bees make?", "Bees make honey and wax."),
      ("Where do fish live?", "Fish live in water: rivers, lakes and the sea."),
      ("What is ice?", "Ice is frozen water."),
      ("What is two plus two?", "Two plus two is four."),
      ("Which star is closest to Earth?", "The Sun is the closest star to Earth.")]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random tiny Llama checkpoint with a trained seed-format tokenizer (no training run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tinybase")
    tok = train_tokenizer([f"{q} {a}" for q, a in QA] * 10, 400)
    save_tokenizer(tok, root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(root))
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA * 2))
    return root, data


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_qlora_without_cuda_is_a_clear_message_not_a_crash(tiny_base, tmp_path, capsys):
    root, data = tiny_base
    rc = cli.main(["finetune", "--base", str(root), "--data", str(data), "--out", str(tmp_path / "a"),
                   "--qlora"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--qlora needs a CUDA GPU" in err and "drop --qlora" in err
    assert not (tmp_path / "a").exists()


def test_missing_base_is_named(tmp_path, capsys):
    rc = cli.main(["finetune", "--base", str(tmp_path / "none.gguf"), "--data", "x.jsonl",
                   "--out", str(tmp_path / "a")])
    assert rc == 1
    assert f"--base {tmp_path / 'none.gguf'}: no such file" in capsys.readouterr().err


def test_raw_jsonl_is_prepared_with_the_base_template_and_masks_prompts(tiny_base, tmp_path):
    from hublabio_tools.finetune import load_finetune_rows

    root, data = tiny_base
    train, valid = load_finetune_rows(str(data), str(root))
    assert len(train) + len(valid) == len(QA)  # the doubled copies were exact duplicates
    row = train[0]
    assert row["segments"][0][1] is False and row["segments"][0][0].startswith("<|user|>\n")
    assert row["segments"][1][1] is True and row["segments"][1][0].endswith("<|end|>\n")


def test_data_prepared_in_another_chat_format_is_refused_unless_forced(smollm2_path, tiny_base,
                                                                     tmp_path, capsys):
    from hublabio_tools.common import ToolError
    from hublabio_tools.finetune import load_finetune_rows

    _, data = tiny_base
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare-data", str(data), "--out", str(prepared)]) == 0  # no --model: seed
    with pytest.raises(ToolError, match=r"prepared in chat format 'seed', not in .*SmolLM2.*"
                                        r"Re-run prepare-data --model .*--force-format"):
        load_finetune_rows(str(prepared), str(smollm2_path))
    rc = cli.main(["finetune", "--base", str(smollm2_path), "--data", str(prepared),
                   "--out", str(tmp_path / "a")])
    assert rc == 1 and "--force-format" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    train, _ = load_finetune_rows(str(prepared), str(smollm2_path), force_format=True)
    assert train and "warning:" in capsys.readouterr().err
    ok = tmp_path / "matching"
    assert cli.main(["prepare-data", str(data), "--out", str(ok), "--model", str(smollm2_path)]) == 0
    train, _ = load_finetune_rows(str(ok), str(smollm2_path))
    assert train[0]["segments"][0][0].startswith("<|im_start|>")


def test_early_stopping_keeps_the_best_adapter(tiny_base, tmp_path):
    root, data = tiny_base
    out = tmp_path / "adapter"
    # A learning rate this high makes validation loss climb after the first steps.
    assert cli.main(["finetune", "--base", str(root), "--data", str(data), "--out", str(out),
                     "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "0.5", "--max-steps", "12",
                     "--micro-batch", "4", "--grad-accum", "1", "--eval-every", "1", "--patience", "2",
                     "--quiet"]) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps"] < 12
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}
    assert summary["best_val_loss"] == pytest.approx(min(vals.values()))
    best_step = min(vals, key=vals.get)
    assert best_step > 0 and summary["adapter_step"] == best_step
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_smollm2_gguf_finetune_lowers_the_loss(smollm2_path, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA))
    prepared = tmp_path / "data"
    assert cli.main(["prepare-data", str(data), "--out", str(prepared), "--model", str(smollm2_path),
                     "--val-fraction", "0"]) == 0
    # Validate on the training examples themselves: a few steps must fit them better.
    (prepared / "valid.jsonl").write_text((prepared / "train.jsonl").read_text())
    out = tmp_path / "adapter"
    assert cli.main(["finetune", "--base", str(smollm2_path), "--data", str(prepared), "--out", str(out),
                     "--rank", "8", "--alpha", "16", "--dropout", "0", "--lr", "1e-3", "--max-steps", "3",
                     "--micro-batch", "4", "--grad-accum", "1", "--max-len", "128", "--eval-every", "3",
                     "--quiet"]) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["best_val_loss"] < summary["first_val_loss"] - 0.05, summary
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]

    # merge finds the GGUF base from the adapter and writes a plain HF checkpoint.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hublabio_tools.finetune import load_base

    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(out), "--out", str(merged)]) == 0
    ids = torch.tensor([[1, 504, 2683, 314, 260, 3575, 47]])
    with torch.no_grad():
        base, _ = load_base(smollm2_path, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(ids).logits
    assert torch.allclose(adapted, folded, atol=1e-3)


@pytest.mark.slow
def test_train_expert_writes_a_device_toml(smollm2_path, tmp_path, capsys):
    from hublabio.config import load_model_config

    out = tmp_path / "models"
    # train-expert's own LoRA defaults (r 8, alpha 16, q/k/v/o, F16 GGUF): the device-sized adapter
    assert cli.main(["train-expert", "rust", "--out", str(out), "--max-steps", "1", "--micro-batch", "2",
                     "--grad-accum", "1", "--max-len", "256", "--eval-every", "1", "--quiet"]) == 0
    config = load_model_config(out / "experts" / "rust.toml", require_expert=True)
    assert config.name == "rust-expert" and config.expert.domain == "rust"
    assert "cargo" in config.expert.keywords and config.expert.threshold == 0.5
    assert config.adapter is not None and config.adapter.name == "rust.lora.gguf"
    evaluation = json.loads((out / "adapters" / "rust" / "eval.json").read_text())
    assert evaluation["val_loss_before"] > 0 and evaluation["val_loss_after"] <= evaluation["val_loss_before"]
    assert (out / "adapters" / "rust" / "adapter_model.safetensors").exists()
    peft_cfg = json.loads((out / "adapters" / "rust" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16
    assert sorted(peft_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    if evaluation["gguf_adapter"]:
        import gguf

        reader = gguf.GGUFReader(config.adapter)
        assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
        kinds = {t.name.split(".")[2] for t in reader.tensors}
        assert kinds == {"attn_q", "attn_k", "attn_v", "attn_output"}
        assert len(reader.tensors) == 30 * 4 * 2  # SmolLM2: 30 layers x 4 projections x (a, b)
        # 30 x 8 x (576+576 + 576+192 + 576+192 + 576+576) x 2 bytes = 1.76 MiB (+ header)
        assert config.adapter.stat().st_size < 2 * 2**20
    else:
        assert "hublab-tools convert-lora" in capsys.readouterr().out


@pytest.mark.slow
def test_train_expert_resumes_from_its_domains_checkpoint(smollm2_path, tmp_path, capsys):
    """A run that spans sessions: checkpoints in adapters/<domain>/, --resume continues there."""
    import hashlib

    out = tmp_path / "models"
    common = ["train-expert", "rust", "--out", str(out), "--micro-batch", "2", "--grad-accum",
              "1", "--max-len", "256", "--eval-every", "0", "--save-every", "1"]
    assert cli.main(common + ["--max-steps", "2", "--quiet"]) == 0
    checkpoints = out / "adapters" / "rust" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001", "step-0000002"]
    # only the adapter's tensors: r 8 on q,k,v,o of SmolLM2 is 0.92M parameters (3.7 MB F32),
    # not the 135M-parameter model
    weights = checkpoints / "step-0000002" / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    capsys.readouterr()
    assert cli.main(common + ["--max-steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    evaluation = json.loads((out / "adapters" / "rust" / "eval.json").read_text())
    assert evaluation["steps"] == 3
    data = Path(evaluation["data"])
    assert evaluation["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert cli.main(["train-expert", "rust", "python", "--out", str(out),
                     "--resume", str(checkpoints / "step-0000002")]) != 0
    assert "belongs to one domain" in capsys.readouterr().err


def test_train_expert_defaults_are_device_sized_and_finetune_keeps_the_seed():
    from hublabio_tools.experts import build_parser as expert_parser
    from hublabio_tools.finetune import build_parser as finetune_parser

    args = expert_parser().parse_args(["rust", "--out", "m"])
    assert (args.rank, args.alpha, args.targets, args.outtype) == (8, 16, "q_proj,k_proj,v_proj,o_proj", "f16")
    args = expert_parser().parse_args(["rust", "--out", "m", "--rank", "64", "--alpha", "128",
                                       "--targets", "q_proj,gate_proj", "--outtype", "f32"])
    assert (args.rank, args.alpha, args.targets, args.outtype) == (64, 128, "q_proj,gate_proj", "f32")
    seed = finetune_parser().parse_args(["--base", "b", "--data", "d", "--out", "o"])
    assert (seed.rank, seed.alpha, seed.targets) == (64, 128, None)  # None: all 7 projections
    assert re.search(r"--rank RANK\s+LoRA rank r \(default: 8\)", expert_parser().format_help())
    assert re.search(r"--rank RANK\s+LoRA rank r \(default: 64\)", finetune_parser().format_help())


def test_expert_from_adapter_writes_a_device_expert(smollm2_path, tmp_path, capsys):
    from integration.lora_fixture import make_lora_adapter

    from hublabio.config import load_experts
    from hublabio_tools.experts import load_domains

    adapter = make_lora_adapter(smollm2_path, tmp_path / "my-python.gguf", seed=2)
    models = tmp_path / "models"
    rc = cli.main(["expert-from-adapter", str(adapter), "python", "--out", str(models),
                   "--base", str(smollm2_path)])
    assert rc == 0, capsys.readouterr().err
    experts, errors = load_experts(models)
    assert errors == [] and len(experts) == 1
    (expert,) = experts
    assert expert.adapter == models / "experts" / "python.lora.gguf"
    assert expert.adapter.read_bytes() == adapter.read_bytes()
    assert expert.path == smollm2_path
    spec = load_domains()["python"]
    assert expert.inference.system_prompt == spec["system_prompt"]  # the device's own prompt
    assert expert.inference.temperature == spec["temperature"]
    assert "expert-from-adapter" in (models / "experts" / "python.toml").read_text()

    rc = cli.main(["expert-from-adapter", str(adapter), "rust", "--out", str(models),
                   "--base", str(smollm2_path), "--system-prompt", "You answer in Rust."])
    assert rc == 0
    rust = {e.expert.domain: e for e in load_experts(models)[0]}["rust"]
    assert rust.inference.system_prompt == "You answer in Rust."

    rc = cli.main(["expert-from-adapter", str(smollm2_path), "ai", "--out", str(models),
                   "--base", str(smollm2_path)])
    assert rc == 1 and "a full model, not a LoRA adapter" in capsys.readouterr().err
    rc = cli.main(["expert-from-adapter", str(adapter), "cooking", "--out", str(models)])
    assert rc == 1 and "unknown domain 'cooking'" in capsys.readouterr().err
    assert sorted(p.name for p in (models / "experts").iterdir()) == \
        ["python.lora.gguf", "python.toml", "rust.lora.gguf", "rust.toml"]
