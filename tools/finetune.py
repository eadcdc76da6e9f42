"""hublab-tools finetune: LoRA / QLoRA fine-tuning of a local HF checkpoint or a GGUF.

usage: hublab-tools finetune --base MODEL --data DIR|FILE.jsonl --out DIR [options]

MODEL is a local HF directory or a .gguf file (transformers de-quantizes it to float weights;
nothing is downloaded). --data is a prepare-data directory made with `--model MODEL`, or a raw
jsonl file that is prepared in memory with MODEL's chat template. The loss is on response
(assistant) tokens only; examples are padded per micro-batch, not to a fixed length.

Defaults are the seed's: LoRA r 64, alpha 128, dropout 0.05 on every attention and MLP projection
(q k v o gate up down), lr 2e-4 with a cosine schedule. --qlora loads the base in 4-bit NF4
through bitsandbytes; it needs a CUDA GPU (without one: a message and exit status 1).
Validation loss is measured before training and every --eval-every steps; training stops after
--patience evaluations without improvement, and OUT holds the best adapter:
adapter_config.json + adapter_model.safetensors + the tokenizer + finetune_summary.json.
Runs under `accelerate launch` / `torchrun` unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from hublabio_tools.common import ToolError, main_guard, write_json_atomic
from hublabio_tools.loop import LoopConfig, resolve_resume
from hublabio_tools.verbargs import add_options, option, option_names, resolve

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_RECORD = "hublab_base.json"


class QLoRAUnavailable(ToolError):
    pass


def check_qlora() -> None:
    """Raise QLoRAUnavailable (a user message) unless 4-bit QLoRA can run here."""
    import torch

    if not torch.cuda.is_available():
        raise QLoRAUnavailable(
            "--qlora needs a CUDA GPU: bitsandbytes 4-bit layers only run on CUDA, and this "
            "machine has none. Run plain LoRA instead (drop --qlora; it works on CPU), or run "
            "this command on a machine with an NVIDIA GPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QLoRAUnavailable("--qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def _split_base(base: str | Path) -> tuple[Path, dict]:
    path = Path(base)
    if not path.exists():
        raise ToolError(f"--base {base}: no such file or directory (a local HF dir or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ToolError(f"--base {base}: a file base must be a .gguf")
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").exists():
        raise ToolError(f"--base {base}: not a HF checkpoint (no config.json)")
    return path, {}


def load_base(base: str | Path, *, qlora: bool = False, device_index: int = 0, dtype=None):
    """(model, tokenizer) from a local HF dir or .gguf; never from a hub."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, extra = _split_base(base)
    kwargs = dict(extra, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    if qlora and extra:
        raise ToolError(f"--qlora needs an HF checkpoint base, not a GGUF ({base}): LoRA works on the GGUF, "
                        "or merge/convert it to an HF directory first")
    if extra:  # GGUF: always de-quantize to dense weights that LoRA can wrap and save
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device_index}
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kwargs)
    if extra:
        _forget_gguf_origin(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _forget_gguf_origin(model) -> None:
    """transformers keeps a GGUF 'quantizer' on a de-quantized model, and it refuses to save; the
    weights are plain dense tensors by now, so drop the marker (and its config entry)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return
    if not getattr(quantizer.quantization_config, "dequantize", True):
        raise ToolError("transformers kept this GGUF's weights packed; LoRA needs dense weights")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def lora_targets(model, requested: list[str] | None) -> list[str] | str:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    wanted = requested or DEFAULT_TARGETS
    present = [t for t in wanted if t in names]
    if requested and len(present) != len(requested):
        missing = sorted(set(requested) - set(present))
        raise ToolError(f"--targets: the model has no module named {', '.join(missing)}")
    return present or "all-linear"


def load_finetune_rows(data: str, base: str, force_format: bool = False
                       ) -> tuple[list[dict], list[dict]]:
    """Rows for fine-tuning `base`, in its own chat format (a prepared directory in another
    format is refused unless `force_format`)."""
    from hublabio_tools.data import load_chat_format, load_rows

    return load_rows(data, load_chat_format(base), hint=base, force_format=force_format)


@dataclass
class LoraOptions:
    rank: int = option(64, "LoRA rank r")
    alpha: float = option(128.0, "LoRA alpha")
    dropout: float = option(0.05, "LoRA dropout")
    targets: str | None = option(None, "comma-separated module names (unset: every attention "
                                       "and MLP projection)", type=str)


@dataclass
class FinetuneOptions:
    max_len: int = option(2048, "truncate examples to this many tokens")
    epochs: float = option(3.0, "passes over the training examples (unless --max-steps)")
    precision: str = option("auto", "auto | fp32 | bf16 | fp16",
                            choices=["auto", "fp32", "bf16", "fp16"])
    gradient_checkpointing: bool = option(False, "trade compute for memory")


# finetune's loop defaults where they differ from LoopConfig's: the seed's LoRA recipe.
# max_steps None = from --epochs.
FINETUNE_LOOP = {"lr": 2e-4, "micro_batch": 4, "grad_accum": 4, "min_lr_ratio": 0.0,
                 "patience": 3, "max_steps": None}
FINETUNE_LOOP_SKIP = ("keep_checkpoints", "stop_at_step")  # finetune keeps the best adapter


def add_finetune_options(p: argparse.ArgumentParser, *, lora_defaults: dict | None = None,
                         skip=()) -> None:
    """The LoRA, fine-tuning and loop options, declared once (train-expert adds them too, with
    device-sized LoRA defaults)."""
    add_options(p, LoraOptions, defaults=lora_defaults, skip=skip)
    add_options(p, FinetuneOptions, skip=skip)
    add_options(p, LoopConfig, defaults=FINETUNE_LOOP, skip=(*FINETUNE_LOOP_SKIP, *skip))


def finetune_option_names() -> list[str]:
    return [n for n in option_names(LoraOptions, FinetuneOptions, LoopConfig)
            if n not in FINETUNE_LOOP_SKIP]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="local HF checkpoint dir or .gguf file")
    p.add_argument("--data", required=True, help="prepare-data directory or raw jsonl")
    p.add_argument("--out", required=True, help="adapter output directory")
    p.add_argument("--force-format", action="store_true",
                   help="train on a prepare-data directory made in another chat format than the "
                        "base's (refused otherwise)")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base (CUDA + bitsandbytes)")
    add_finetune_options(p)
    return p


def finetune(args) -> dict:
    """Run a fine-tune from parsed arguments; returns the summary (also written to OUT)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from hublabio_tools.common import seed_everything
    from hublabio_tools.loop import PaddedExamples, encode_segments, make_accelerator, run_loop

    _split_base(args.base)  # a wrong --base or --resume is reported before anything else
    resolve_resume(LoopConfig(out=Path(args.out), resume=args.resume))
    if args.qlora:
        check_qlora()
    out = Path(args.out)
    accelerator = make_accelerator(args.precision, args.grad_accum)
    main_proc = accelerator.is_main_process
    train_rows, valid_rows = load_finetune_rows(args.data, args.base,
                                                getattr(args, "force_format", False))
    if not train_rows:
        raise ToolError(f"--data {args.data}: no training examples")
    seed_everything(args.seed)
    dtype = None if accelerator.device.type == "cuda" else torch.float32
    model, tokenizer = load_base(args.base, qlora=args.qlora, device_index=accelerator.local_process_index,
                                 dtype=dtype)
    model.config.use_cache = False
    if args.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    def items(rows):
        examples = [e for e in encode_segments(rows, tokenizer, args.max_len)
                    if any(x != -100 for x in e[1][1:])]
        return PaddedExamples(examples, tokenizer.pad_token_id) if examples else None

    train_items, valid_items = items(train_rows), items(valid_rows)
    if train_items is None:
        raise ToolError("no training example has response tokens within --max-len")
    targets = lora_targets(model, args.targets.split(",") if args.targets else None)
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    global_batch = args.micro_batch * args.grad_accum * accelerator.num_processes
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_items) / global_batch))
    if main_proc and not args.quiet:
        print(f"LoRA r={args.rank} alpha={args.alpha} on {targets}: {trainable / 1e6:.2f}M trainable of "
              f"{total / 1e6:.1f}M; {len(train_items)} train / {len(valid_items or [])} valid examples; "
              f"{max_steps} steps of {global_batch} examples", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    base_abs = str(Path(args.base).resolve())
    model.peft_config["default"].base_model_name_or_path = base_abs
    best = {"step": None}
    best_file = out / "best_adapter.json"
    if args.resume and best_file.exists() and (out / "adapter_model.safetensors").exists():
        best["step"] = json.loads(best_file.read_text())["step"]  # saved by an earlier session

    def save_adapter(step, val_loss, wrapped):
        state_dict = accelerator.get_state_dict(wrapped)
        if accelerator.is_main_process:
            accelerator.unwrap_model(wrapped).save_pretrained(str(out), state_dict=state_dict,
                                                              safe_serialization=True)
            write_json_atomic(best_file, {"step": step, "val_loss": val_loss})
        best["step"] = step
        accelerator.wait_for_everyone()

    loop = resolve(LoopConfig, args, defaults=FINETUNE_LOOP)
    cfg = LoopConfig(out=out, **{**loop, "max_steps": max_steps})
    result = run_loop(accelerator, model, train_items, valid_items, cfg,
                      on_improved=save_adapter if valid_items is not None else None, run_name="finetune")
    wrapped = result.pop("model")
    if best["step"] is None:  # no validation set: keep the final weights
        save_adapter(result["steps"], None, wrapped)
    summary = dict(result, base=base_abs, adapter_step=best["step"], trainable_parameters=trainable,
                   lora={"r": args.rank, "alpha": args.alpha, "dropout": args.dropout,
                         "targets": targets if isinstance(targets, str) else list(targets)},
                   train_examples=len(train_items), valid_examples=len(valid_items or []))
    if main_proc:
        tokenizer.save_pretrained(str(out))
        write_json_atomic(out / BASE_RECORD, {"base": base_abs})
        write_json_atomic(out / "finetune_summary.json", summary)
        before, after = summary["first_val_loss"], summary["best_val_loss"]
        if before is not None:
            print(f"validation loss {before:.4f} -> {after:.4f} (adapter from step {best['step']})")
        print(f"wrote {out} (adapter_config.json, adapter_model.safetensors, tokenizer)")
    accelerator.wait_for_everyone()
    return summary


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    finetune(args)
    return 0


# ----------------------------------------------------------------------------- merge
def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools merge", description=MERGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="peft adapter directory (from finetune)")
    p.add_argument("--base", help="base HF dir or .gguf (default: the one the adapter was trained on)")
    p.add_argument("--out", required=True, help="output HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


MERGE_DOC = """hublab-tools merge: fold a LoRA adapter into its base -> a merged HF checkpoint.

usage: hublab-tools merge --adapter DIR --out DIR [--base MODEL] [--dtype float32|bfloat16|float16]

Loads the base (local HF dir or .gguf, recorded by finetune in DIR/hublab_base.json), applies the
adapter, merges the LoRA deltas into the weights and writes OUT/config.json,
model.safetensors and the tokenizer (written to OUT.tmp first, then renamed). Convert the result
for the device with `hublab-tools convert OUT --out model.gguf`.
"""


def default_base(adapter: Path) -> str:
    record = adapter / BASE_RECORD
    if record.exists():
        return json.loads(record.read_text())["base"]
    config = adapter / "adapter_config.json"
    if not config.exists():
        raise ToolError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ToolError(f"{config}: no base_model_name_or_path; pass --base")
    return base


def merge(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "float32") -> Path:
    import torch
    from peft import PeftModel

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise ToolError(f"--adapter {adapter}: not a peft adapter (no adapter_config.json)")
    base = base or default_base(adapter)
    model, tokenizer = load_base(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.config.use_cache = True
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


@main_guard
def main_merge(argv: list[str] | None = None) -> int:
    args = build_merge_parser().parse_args(argv)
    out = merge(args.adapter, args.out, args.base, args.dtype)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer)")
    return 0


main_merge.__doc__ = MERGE_DOC
