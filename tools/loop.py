"""The training loop `train`, `finetune` and `train-expert` share, and the options it takes.

- Items: `encode_segments` (prompt/response rows -> ids + labels, prompts IGNOREd),
  `PackedBlocks` (train: fixed-length packed blocks), `PaddedExamples` (finetune: right-padded
  examples), `batch_indices` (per-epoch permutations; the step is the data position).
- `LoopConfig`: every loop option, declared once with its default and help; `verbargs` turns
  the fields into argparse options and applies a recipe's [train] table.
- `run_loop(accelerator, model, train_items, valid_items, cfg)`: AdamW (weight decay on matrices
  only), cosine schedule with warmup, gradient accumulation, clipping, token-mean loss over the
  global batch (1 process with accumulation == N processes), validation every `eval_every`
  steps with early stopping (`patience`), checkpoints (`save_every`, `stop_at_step`,
  `keep_checkpoints`) and exact `resume`; metrics.jsonl + TensorBoard (+ wandb).
- `make_accelerator(precision, grad_accum)`: accelerate's Accelerator (CPU DDP under torchrun).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hublabio.fsutil import atomic_write_text
from hublabio_tools.common import Progress, ToolError, pick_precision, write_json_atomic
from hublabio_tools.verbargs import option

IGNORE = -100


# ----------------------------------------------------------------------------- data
def encode_segments(rows: list[dict], tokenizer, max_len: int = 0) -> list[tuple[list, list]]:
    """(input_ids, labels) per row; labels are IGNORE on untrained (prompt) segments. A leading
    BOS is added when the tokenizer adds one by default and the text does not carry it."""
    flat = [seg[0] for row in rows for seg in row["segments"]]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    wants_bos = bos is not None and len(probe) > 1 and probe[0] == bos
    out, k = [], 0
    for row in rows:
        ids, labels = [], []
        for text, trained in row["segments"]:
            piece = encoded[k]
            k += 1
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if wants_bos and (not ids or ids[0] != bos):
            ids, labels = [bos] + ids, [IGNORE] + labels
        if max_len:
            ids, labels = ids[:max_len], labels[:max_len]
        out.append((ids, labels))
    return out


def pack_documents(docs: list[list[int]], seq_len: int, bos: int | None, eos: int, pad: int):
    """Concatenate <s> doc </s> ... and cut blocks of seq_len. Returns (inputs, labels) int64
    tensors [blocks, seq_len]; the tail block is padded with labels IGNORE."""
    import torch

    stream: list[int] = []
    for doc in docs:
        if bos is not None:
            stream.append(bos)
        stream.extend(doc)
        stream.append(eos)
    n_blocks = max(1, math.ceil(len(stream) / seq_len))
    inputs = torch.full((n_blocks * seq_len,), pad, dtype=torch.long)
    labels = torch.full((n_blocks * seq_len,), IGNORE, dtype=torch.long)
    inputs[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    labels[: len(stream)] = inputs[: len(stream)]
    return inputs.view(n_blocks, seq_len), labels.view(n_blocks, seq_len)


class PackedBlocks:
    """Items = fixed-length packed blocks; collate stacks them."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels
        self.targets = (labels[:, 1:] != IGNORE).sum(dim=1).tolist()

    def __len__(self):
        return self.inputs.shape[0]

    def collate(self, indices: list[int]) -> dict:
        import torch

        index = torch.tensor(indices, dtype=torch.long)
        inputs = self.inputs[index]
        # Causal attention over the whole block: padding only ever sits at the tail of the last
        # block, after every real token, and carries no loss.
        return {"input_ids": inputs, "labels": self.labels[index],
                "attention_mask": torch.ones_like(inputs)}


class PaddedExamples:
    """Items = variable-length examples; collate right-pads to the longest of the micro-batch."""

    def __init__(self, examples: list[tuple[list, list]], pad: int):
        self.examples, self.pad = examples, pad
        self.targets = [sum(1 for x in labels[1:] if x != IGNORE) for _, labels in examples]

    def __len__(self):
        return len(self.examples)

    def collate(self, indices: list[int]) -> dict:
        import torch

        width = max(len(self.examples[i][0]) for i in indices)
        ids = torch.full((len(indices), width), self.pad, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            seq, lab = self.examples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_indices(n_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the global batch of optimizer step `step` (0-based): a stream of per-epoch
    permutations (seed + epoch), read global_batch at a time. The step is the data position."""
    import torch

    start = step * global_batch
    out: list[int] = []
    epoch, offset = divmod(start, n_items)
    while len(out) < global_batch:
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[offset: offset + global_batch - len(out)]
        out += take
        epoch, offset = epoch + 1, 0
    return out


# ----------------------------------------------------------------------------- loop
@dataclass
class LoopConfig:
    """The loop's options. Each verb states where its defaults differ (train.TRAIN_LOOP,
    finetune.FINETUNE_LOOP); --help shows the verb's."""

    out: Path
    micro_batch: int = option(4, "examples (train: packed blocks) per process per forward pass")
    grad_accum: int = option(1, "micro-batches per optimizer step and process")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr times this")
    warmup_steps: int = option(0, "linear warmup steps")
    max_steps: int = option(100, "optimizer steps (finetune: unset = from --epochs; train: "
                                  "--epochs replaces the recipe's)")
    eval_every: int = option(50, "validation loss every N steps (0: never)")
    save_every: int = option(0, "resumable checkpoint every N steps (0: only with --stop-at-step)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    weight_decay: float = option(0.0, "AdamW weight decay of the weight matrices")
    seed: int = option(0, "seed of the initialization, the data order and dropout")
    keep_checkpoints: int = option(2, "checkpoints kept in OUT/checkpoints")
    patience: int = option(0, "evaluations without improvement before stopping (0: never)")
    stop_at_step: int = option(0, "end this session after step N with a checkpoint (the schedule "
                                  "keeps --max-steps; continue with --resume)")
    resume: str | None = option(None, "continue from OUT/checkpoints' latest (or the given "
                                      "checkpoint dir)", type=str, nargs="?", const="latest")
    tensorboard: bool = True
    wandb: bool = option(False, "also log to Weights & Biases")
    quiet: bool = option(False, "no progress output")


def cosine_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def token_ce(model, batch) -> tuple:
    """Summed next-token cross entropy and the number of predicted tokens. When most positions
    carry no loss (prompts in fine-tuning), only the positions that predict a target go through
    the output layer (`logits_to_keep`), which saves the vocabulary-wide logits of the rest."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keep = (labels != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = None
    if keep.numel() < 0.75 * labels.shape[1]:
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
            labels = labels[:, keep]
        except TypeError:  # an architecture without logits_to_keep
            logits = None
    if logits is None:
        logits = model(**inputs).logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def evaluate(accelerator, model, items, micro_batch: int) -> float | None:
    """Token-mean validation loss over all items (sharded across processes)."""
    import torch

    if items is None or len(items) == 0:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    with torch.no_grad():
        for i in range(0, len(mine), micro_batch):
            batch = {k: v.to(accelerator.device) for k, v in items.collate(mine[i:i + micro_batch]).items()}
            loss, count = token_ce(model, batch)
            total += torch.stack([loss.double(), count.double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(accelerator, cfg: LoopConfig, step: int, state: dict) -> Path:
    final = cfg.out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in _checkpoints(cfg.out)[: -cfg.keep_checkpoints or None]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _trainable_only(models, weights, output_dir) -> None:
    """save_state pre-hook: keep only the parameters that train (a LoRA's, not the frozen base,
    which --base reloads): an r 8 SmolLM2 adapter checkpoint is ~11 MB instead of 524 MB."""
    for model, state in zip(models, weights):
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def _check_trainable_saved(path: Path, model) -> None:
    """The checkpoint of a frozen-base run must hold every trainable tensor (strict=False
    loading would otherwise leave one at its initial value without a word)."""
    from safetensors import safe_open

    files = sorted(path.glob("model*.safetensors"))
    saved: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            saved.update(st.keys())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if files and missing:
        raise ToolError(f"--resume {path}: the checkpoint lacks {len(missing)} trainable "
                        f"tensor(s), e.g. {missing[0]} (another adapter shape or targets?)")


def resolve_resume(cfg: LoopConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = _checkpoints(cfg.out)
        if not found:
            raise ToolError(f"--resume: no checkpoint in {cfg.out / 'checkpoints'}")
        return found[-1]
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").exists():
        raise ToolError(f"--resume {path}: not a checkpoint (no trainer_state.json)")
    return path


class MetricsLog:
    """metrics.jsonl + TensorBoard (+ wandb) on the main process."""

    def __init__(self, accelerator, cfg: LoopConfig, run_name: str, resumed_step: int | None):
        self.main = accelerator.is_main_process
        self.path = cfg.out / "metrics.jsonl"
        self.tb = self.wandb = None
        if not self.main:
            return
        if resumed_step is None:  # a fresh run starts a fresh log
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if json.loads(line)["step"] <= resumed_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(cfg.out / "runs"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ToolError("--wandb: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project="hublabio", name=run_name, dir=str(cfg.out))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self.tb:
                    self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def run_loop(accelerator, model, train_items, valid_items, cfg: LoopConfig,
             on_improved: Callable[[int, float, object], None] | None = None, run_name: str = "train") -> dict:
    """The training loop of `train`, `finetune` and `train-expert`. Returns a summary dict."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ToolError("internal: the Accelerator was made with another gradient accumulation")
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # no dataloader is prepared, so DeepSpeed is told the micro-batch
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    # The scheduler is stepped by hand (once per optimizer step, whatever the process count).
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    frozen_base = any(not p.requires_grad for p in model.parameters())
    if frozen_base and deepspeed is None:
        accelerator.register_save_state_pre_hook(_trainable_only)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    state = {"step": 0, "tokens": 0, "best_val": None, "evals_without_gain": 0}
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        if frozen_base and deepspeed is None:
            _check_trainable_saved(resume_from, model)
            accelerator.load_state(str(resume_from), strict=False)
        else:
            accelerator.load_state(str(resume_from))
        state.update(json.loads((resume_from / "trainer_state.json").read_text()))
        if not cfg.quiet and accelerator.is_main_process:
            print(f"resumed from {resume_from} at step {state['step']}", file=sys.stderr)
    log = MetricsLog(accelerator, cfg, run_name, state["step"] if resume_from is not None else None)
    first_val = None
    if state["step"] == 0 and valid_items is not None and len(valid_items):
        first_val = evaluate(accelerator, model, valid_items, cfg.micro_batch)
        log.write({"step": 0, "val_loss": first_val, "val_ppl": math.exp(min(first_val, 50))})
        state["best_val"] = first_val
        if on_improved:
            on_improved(0, first_val, model)
    progress = Progress(cfg.max_steps, run_name, enabled=accelerator.is_main_process and not cfg.quiet)
    model.train()
    stopped_early = False
    last_val = None
    tick = time.monotonic()
    while state["step"] < cfg.max_steps:
        step = state["step"]
        indices = batch_indices(len(train_items), step, global_batch, cfg.seed)
        micro = [indices[i:i + cfg.micro_batch] for i in range(0, global_batch, cfg.micro_batch)]
        n_targets = sum(train_items.targets[i] for i in indices)
        mine = micro[rank::world]
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for chunk in mine:
            batch = {key: v.to(accelerator.device) for key, v in train_items.collate(chunk).items()}
            # accumulate(): no gradient sync (DDP/FSDP) or optimizer step (DeepSpeed) until the
            # last micro-batch of this optimizer step.
            with accelerator.accumulate(model):
                loss, _ = token_ce(model, batch)
                # backward divides by grad_accum and the processes average their gradients:
                # undo both so the gradient is that of the token mean over the global batch.
                accelerator.backward(loss * (world * cfg.grad_accum / max(n_targets, 1)))
            loss_sum += loss.detach().double()
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss = accelerator.reduce(loss_sum, reduction="sum").item() / max(n_targets, 1)
        state["step"] = step = step + 1
        state["tokens"] += n_targets
        now = time.monotonic()
        record = {"step": step, "loss": total_loss, "lr": lr, "tokens": state["tokens"],
                  "tokens_per_s": n_targets / max(now - tick, 1e-9)}
        tick = now
        log.write(record)
        progress.update(step, f"loss {total_loss:.4f} lr {lr:.2e}")
        stop = bool(cfg.stop_at_step and step >= cfg.stop_at_step and step < cfg.max_steps)
        if valid_items is not None and len(valid_items) and cfg.eval_every and (
                step % cfg.eval_every == 0 or step == cfg.max_steps):
            last_val = evaluate(accelerator, model, valid_items, cfg.micro_batch)
            log.write({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
            if state["best_val"] is None or last_val < state["best_val"]:
                state["best_val"], state["evals_without_gain"] = last_val, 0
                if on_improved:
                    on_improved(step, last_val, model)
            else:
                state["evals_without_gain"] += 1
                if cfg.patience and state["evals_without_gain"] >= cfg.patience:
                    stopped_early = True
        if (cfg.save_every and step % cfg.save_every == 0) or stop:
            _save_checkpoint(accelerator, cfg, step, state)
        if stopped_early or stop:
            break
    log.close()
    return {"steps": state["step"], "tokens": state["tokens"], "first_val_loss": first_val,
            "last_val_loss": last_val, "best_val_loss": state["best_val"],
            "stopped_early": stopped_early, "finished": state["step"] >= cfg.max_steps or stopped_early,
            "model": model}


def make_accelerator(precision: str, grad_accum: int = 1):
    """An Accelerator; several processes without CUDA (torchrun / accelerate launch --cpu) get
    the CPU DDP backend (gloo)."""
    import os

    import torch
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    multi_cpu = not torch.cuda.is_available() and world > 1
    if world == 1:
        # One process may run several verbs (train-expert --all, tests) with different precisions;
        # accelerate keeps its state in a singleton that would refuse the change.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=pick_precision(precision), cpu=multi_cpu,
                       gradient_accumulation_steps=grad_accum)


# ----------------------------------------------------------------------------- verb
