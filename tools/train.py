"""hublab-tools train: train a Llama-architecture model from scratch with sequence packing.

usage: hublab-tools train --data DIR --recipe hublabio-tiny --out DIR [options]

--data is a prepare-data directory (train.jsonl, valid.jsonl) or a raw jsonl file (prepared in
memory with the seed chat format). The model shape comes from a recipe TOML (tools/recipes:
hublabio-tiny, hublabio-0.5b, hublabio-1b, hublabio-3b, hublabio-7b, or a path). The tokenizer is
trained on the training text (byte-level BPE, vocabulary up to the recipe's vocab_size) or reused
from a local directory (--tokenizer); nothing is downloaded. It is saved as a HF tokenizer with the
seed chat template and special tokens (<s> </s> <pad> <|system|> <|user|> <|assistant|> <|end|>).

Training: every document becomes <s> tokens </s>; documents are concatenated and cut into blocks
of seq_len tokens (sequence packing, plain causal attention across document boundaries, the EOS
token separates them). AdamW, cosine schedule with linear warmup, gradient accumulation, gradient
clipping, bf16/fp16 autocast where the hardware has it (fp32 on CPU unless --precision bf16),
optional gradient checkpointing. The loss of each optimizer step is the token mean over the whole
global batch, so 1 process with accumulation and N processes give the same trajectory.

Writes OUT/ (config.json, model.safetensors, tokenizer files), OUT/checkpoints/step-N (model,
optimizer, scheduler, RNG states and the step = data position; --resume continues exactly),
OUT/metrics.jsonl (one line per step and per evaluation), OUT/runs (TensorBoard), validation
perplexity every --eval-every steps. Runs unchanged under `accelerate launch` / `torchrun`
(DDP; FSDP / DeepSpeed through the configs in tools/distributed/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from hublabio_tools.common import (
    SEED_CHAT_TEMPLATE, SEED_SPECIAL_TOKENS, ToolError, load_recipe, main_guard, seed_everything,
    write_json_atomic,
)
from hublabio_tools.loop import (
    LoopConfig, PackedBlocks, encode_segments, make_accelerator, pack_documents, resolve_resume,
    run_loop,
)
from hublabio_tools.verbargs import add_options, resolve

# train's loop defaults where they differ from LoopConfig's (a recipe's [train] overrides them,
# a flag overrides both): pretraining from scratch decays weights and checks less often.
TRAIN_LOOP = {"micro_batch": 8, "weight_decay": 0.1, "eval_every": 100, "max_steps": 1000}
TRAIN_ONLY = ("seq_len",)  # [train] keys that are not loop options


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a HF fast tokenizer with the seed format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SEED_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id("<s>")
    # Encoding adds <s> like Llama tokenizers do (packing adds it explicitly per document).
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": SEED_SPECIAL_TOKENS[3:]})
    tokenizer.chat_template = SEED_CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """save_pretrained, plus the chat template inside tokenizer_config.json too (transformers 5
    writes chat_template.jinja; older readers and converters look in the config)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if tokenizer.chat_template and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
        write_json_atomic(config_path, config)


def load_tokenizer(path: str | Path):
    """A tokenizer from a local HF directory or a .gguf file; never from a hub."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ToolError(f"tokenizer {path}: no such file or directory (a local HF dir or .gguf)")
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepare-data directory or raw jsonl file")
    p.add_argument("--recipe", default="hublabio-tiny", help="recipe name or TOML path")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="reuse a local tokenizer (HF dir or .gguf) instead of training one")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the recipe's)")
    p.add_argument("--seq-len", type=int, help="packed block length (default: the recipe's, else 512)")
    p.add_argument("--epochs", type=float, help="passes over the packed training blocks "
                                                "(instead of --max-steps)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_options(p, LoopConfig, defaults=TRAIN_LOOP, from_recipe=True)
    return p


def load_training_rows(data: str) -> tuple[list[dict], list[dict]]:
    """Rows for training from scratch, in the seed's chat format."""
    from hublabio_tools.data import SEED_FORMAT, load_rows

    return load_rows(data, SEED_FORMAT)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe)
    rt = recipe["train"]
    out = Path(args.out)
    loop = resolve(LoopConfig, args, recipe=rt, defaults=TRAIN_LOOP, skip=TRAIN_ONLY,
                   where=f"recipe {recipe['name']} [train]")
    resolve_resume(LoopConfig(out=out, resume=loop["resume"]))  # a bad --resume fails first

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    micro_batch, grad_accum = loop["micro_batch"], loop["grad_accum"]
    accelerator = make_accelerator(args.precision, grad_accum)
    main_proc = accelerator.is_main_process
    train_rows, valid_rows = load_training_rows(args.data)
    if not train_rows:
        raise ToolError(f"--data {args.data}: no training examples")
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = out / "tokenizer"
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif loop["resume"] and tok_dir.exists():
        tokenizer = load_tokenizer(tok_dir)
    else:
        if main_proc:
            vocab = args.vocab_size or recipe["model"].get("vocab_size", 32000)
            save_tokenizer(train_tokenizer([r["text"] for r in train_rows], vocab), tok_dir)
        accelerator.wait_for_everyone()
        tokenizer = load_tokenizer(tok_dir)
    if tokenizer.eos_token_id is None:
        raise ToolError("the tokenizer has no EOS token: packing needs one to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    seq_len = args.seq_len or rt.get("seq_len", 512)
    docs = [ids for ids, _ in encode_segments(train_rows, tokenizer)]
    train_items = PackedBlocks(*pack_documents(docs, seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id, pad))
    valid_items = None
    if valid_rows:
        vdocs = [ids for ids, _ in encode_segments(valid_rows, tokenizer)]
        valid_items = PackedBlocks(*pack_documents(vdocs, seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id, pad))

    global_batch = micro_batch * grad_accum * accelerator.num_processes
    max_steps = loop["max_steps"]
    if args.max_steps is None and args.epochs is not None:  # --epochs beats the recipe's steps
        max_steps = max(1, math.ceil(args.epochs * len(train_items) / global_batch))

    model_cfg = dict(recipe["model"])
    model_cfg["vocab_size"] = len(tokenizer)
    model_cfg.setdefault("max_position_embeddings", max(seq_len, 2048))
    config = LlamaConfig(**model_cfg, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                         attention_dropout=0.0, use_cache=False)
    seed_everything(loop["seed"])
    torch.manual_seed(loop["seed"])
    model = LlamaForCausalLM(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    if main_proc and not loop["quiet"]:
        print(f"model {recipe['name']}: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
              f"{len(train_items)} packed blocks of {seq_len} ({sum(train_items.targets)} target tokens), "
              f"global batch {global_batch} blocks, {max_steps} steps, "
              f"{accelerator.num_processes} process(es), precision {accelerator.mixed_precision}",
              file=sys.stderr)

    cfg = LoopConfig(out=out, **{**loop, "max_steps": max_steps})
    result = run_loop(accelerator, model, train_items, valid_items, cfg, run_name=f"train {recipe['name']}")
    model = result.pop("model")
    if not result["finished"]:
        if main_proc:
            print(f"stopped at step {result['steps']} of {max_steps}; continue with --resume", file=sys.stderr)
        return 0
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if main_proc:
        unwrapped.config.use_cache = True
        unwrapped.generation_config.eos_token_id = _stop_ids(tokenizer)
        unwrapped.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        save_tokenizer(tokenizer, out)
        summary = {k: v for k, v in result.items()} | {
            "recipe": recipe["name"], "parameters": n_params, "seq_len": seq_len,
            "val_ppl": math.exp(result["last_val_loss"]) if result["last_val_loss"] is not None else None}
        write_json_atomic(out / "train_summary.json", summary)
        ppl = f", validation perplexity {summary['val_ppl']:.2f}" if summary["val_ppl"] else ""
        print(f"wrote {out} (config.json, model.safetensors, tokenizer){ppl}")
    accelerator.wait_for_everyone()
    return 0


def _stop_ids(tokenizer) -> list[int] | int:
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids and end >= 0:
        ids.append(end)
    return ids if len(ids) > 1 else ids[0]
