"""train from scratch on a tiny random Llama: packing, tokenizer, recipes, and the end-to-end
path prepare -> train -> resume (same losses) -> finetune -> merge (same logits)."""

from __future__ import annotations

import json
import os
import random

import pytest

torch = pytest.importorskip("torch")
# One intra-op thread: on a shared 2-core machine torch's spinning OpenMP threads make a step
# several times slower than one thread (measured 12 s vs 40 s for a SmolLM2-sized step).
torch.set_num_threads(int(os.environ.get("HUBLAB_TORCH_THREADS", "1")))

from hublabio_tools import cli  # noqa: E402
from hublabio_tools.common import RECIPES_DIR, SEED_CHAT_TEMPLATE, load_recipe  # noqa: E402
from hublabio_tools.loop import (  # noqa: E402
    IGNORE, PackedBlocks, batch_indices, cosine_lambda, encode_segments, pack_documents,
)
from hublabio_tools.train import load_tokenizer, train_tokenizer  # noqa: E402

SUBJECTS = ["the cat", "a dog", "the robot", "my friend", "the teacher", "a bird", "the pi"]
VERBS = ["sees", "likes", "builds", "reads", "finds", "trains", "writes"]
OBJECTS = ["a book", "the code", "a song", "the data", "a tree", "the river", "a model"]


def write_corpus(path, n=90, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            words = " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                             for _ in range(rng.randint(2, 5)))
            row = ({"prompt": f"What does {rng.choice(SUBJECTS)} do ({i})?", "response": words}
                   if i % 3 == 0 else {"text": f"{words} ({i})"})
            handle.write(json.dumps(row) + "\n")
    return path


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


def test_every_recipe_loads_with_the_seed_sizes():
    from transformers import LlamaConfig, LlamaForCausalLM

    # The seed's shapes as written (its "0.5b" counts 0.25B parameters with untied embeddings).
    expected = {"hublabio-0.5b": (0.24e9, 0.25e9), "hublabio-1b": (1.1e9, 1.15e9),
                "hublabio-3b": (2.9e9, 3.0e9), "hublabio-7b": (5.9e9, 6.0e9)}
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert set(expected) | {"hublabio-tiny"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        if name not in expected:
            continue
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**recipe["model"]))
        count = sum(p.numel() for p in model.parameters())
        low, high = expected[name]
        assert low < count < high, (name, count)


def test_bad_recipe_names_file_and_key(tmp_path):
    from hublabio_tools.common import ToolError

    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_size = 64\nintermediate_size = 'big'\nnum_hidden_layers = 2\n"
                   "num_attention_heads = 4\n[train]\n")
    with pytest.raises(ToolError, match=r"bad.toml: \[model\] intermediate_size: expected int"):
        load_recipe(str(bad))


def test_packing_fills_blocks_and_masks_only_the_tail():
    docs = [[5, 6, 7], [8, 9], [10]]
    inputs, labels = pack_documents(docs, 4, bos=1, eos=2, pad=0)
    assert inputs.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9], [2, 1, 10, 2]]
    assert (labels == inputs).all()
    inputs, labels = pack_documents([[5, 6]], 3, bos=1, eos=2, pad=0)
    assert inputs.tolist() == [[1, 5, 6], [2, 0, 0]]
    assert labels.tolist() == [[1, 5, 6], [2, IGNORE, IGNORE]]
    blocks = PackedBlocks(inputs, labels)
    assert blocks.targets == [2, 0]


def test_batch_order_is_a_seeded_stream_of_epochs():
    first = [batch_indices(10, step, 4, seed=7) for step in range(5)]
    assert first == [batch_indices(10, step, 4, seed=7) for step in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batch_indices(3, 0, 7, seed=0)[:3] != [] and len(batch_indices(3, 0, 7, seed=0)) == 7


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    f = cosine_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_trained_tokenizer_round_trips_with_chat_template(tmp_path):
    from hublabio_tools.train import save_tokenizer

    tok = train_tokenizer(["the cat sees a tree. " * 5, "a dog reads the code."] * 20, 300)
    save_tokenizer(tok, tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok("the cat <|end|>")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|end|>") in ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "the cat"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == SEED_CHAT_TEMPLATE and config["eos_token"] == "</s>"


def test_response_only_labels():
    tok = train_tokenizer(["question answer words here"] * 30, 280)
    rows = [{"segments": [["<|user|>\nquestion<|end|>\n<|assistant|>\n", False], ["answer<|end|>\n", True]]}]
    [(ids, labels)] = encode_segments(rows, tok)
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(trained) == "answer<|end|>\n"
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """prepare -> train (uninterrupted) -> train (stopped at step 3, then resumed)."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus.jsonl")
    data = root / "data"
    assert cli.main(["prepare-data", str(corpus), "--out", str(data), "--seed", "1"]) == 0
    common = ["--data", str(data), "--recipe", "hublabio-tiny", "--max-steps", "6",
              "--eval-every", "3", "--micro-batch", "2", "--grad-accum", "2", "--quiet"]
    full = root / "full"
    assert cli.main(["train", "--out", str(full)] + common) == 0
    split = root / "split"
    assert cli.main(["train", "--out", str(split), "--stop-at-step", "3"] + common) == 0
    return root, data, full, split


def test_train_writes_a_loadable_model_and_logs(pipeline):
    from transformers import AutoModelForCausalLM

    root, data, full, _ = pipeline
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_summary.json"):
        assert (full / name).exists(), name
    assert list((full / "runs").glob("events.out.tfevents.*"))
    losses, evals = metrics(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(2.718281828 ** evals[-1]["val_loss"], rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(full))
    assert model.config.model_type == "llama"


def test_resume_continues_exactly(pipeline):
    root, data, full, split = pipeline
    assert not (split / "model.safetensors").exists()  # stopped: no final model yet
    checkpoint = split / "checkpoints" / "step-0000003"
    assert (checkpoint / "trainer_state.json").exists()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert cli.main(["train", "--data", str(data), "--recipe", "hublabio-tiny", "--out", str(split),
                     "--max-steps", "6", "--eval-every", "3", "--micro-batch", "2",
                     "--grad-accum", "2", "--quiet", "--resume"]) == 0
    expected, _ = metrics(full)
    got, _ = metrics(split)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    lines = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one line per step


def test_finetune_then_merge_gives_the_same_logits(pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, data, full, _ = pipeline
    adapter = root / "adapter"
    assert cli.main(["finetune", "--base", str(full), "--data", str(data), "--out", str(adapter),
                     "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "5e-3", "--max-steps", "4",
                     "--micro-batch", "4", "--grad-accum", "1", "--eval-every", "2", "--quiet"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "hublab_base.json"):
        assert (adapter / name).exists(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    summary = json.loads((adapter / "finetune_summary.json").read_text())
    assert summary["best_val_loss"] < summary["first_val_loss"]

    merged = root / "merged"
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").exists() and not (merged.parent / "merged.tmp").exists()
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(full)), str(adapter)).eval()
    base_logits = AutoModelForCausalLM.from_pretrained(str(full)).eval()(ids).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(ids).logits
    with torch.no_grad():
        adapted = peft_model(ids).logits
    assert torch.allclose(adapted, merged_logits, atol=1e-4)
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4)  # the adapter changed something


def test_gradient_checkpointing_and_bf16_follow_the_fp32_run(pipeline, tmp_path):
    root, data, full, _ = pipeline
    common = ["--data", str(data), "--tokenizer", str(full / "tokenizer"), "--max-steps", "3",
              "--eval-every", "3", "--micro-batch", "2", "--quiet"]
    runs = {}
    for name, extra in (("fp32", []), ("gc", ["--gradient-checkpointing"]), ("bf16", ["--precision", "bf16"])):
        assert cli.main(["train", "--out", str(tmp_path / name)] + common + extra) == 0
        runs[name] = metrics(tmp_path / name)[0]
    for step in (1, 2, 3):
        assert runs["gc"][step] == pytest.approx(runs["fp32"][step], abs=1e-5)   # recomputation only
        assert runs["bf16"][step] == pytest.approx(runs["fp32"][step], abs=2e-2)  # autocast rounding


def test_loss_on_kept_positions_equals_the_full_loss():
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from hublabio_tools.loop import token_ce as _token_ce

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 8:11] = ids[0, 8:11]   # a response span per row; the rest is prompt or padding
    labels[1, 5:7] = ids[1, 5:7]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        loss, count = _token_ce(model, batch)
        logits = model(input_ids=ids).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    assert int(count) == 5
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_frozen_base_checkpoints_keep_only_trainable_tensors(tmp_path):
    """The save hook drops frozen tensors; resume refuses a checkpoint lacking a trainable one."""
    import torch
    from safetensors.torch import save_file

    from hublabio_tools.common import ToolError
    from hublabio_tools.loop import _check_trainable_saved, _trainable_only

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    state = model.state_dict()
    _trainable_only([model], [state], str(tmp_path))
    assert sorted(state) == ["1.bias", "1.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    _check_trainable_saved(tmp_path, model)  # complete: no error
    save_file({"1.weight": state["1.weight"].contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ToolError, match="lacks 1 trainable tensor.*1.bias"):
        _check_trainable_saved(tmp_path, model)
