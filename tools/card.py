"""hublab-tools card: write a model card (README.md) from measured numbers.

Usage: hublab-tools card DIR|FILE.gguf ... [--eval-text FILE] [--ctx N] [--chunks N]
                         [--context N] [--out README.md] [--name NAME] [--license ID]
                         [--base-model ID] [--threads N]

For every GGUF model given (a folder means its *.gguf, skipping imatrix files and LoRA adapters):
the real file size, parameters and quantization from its header, and with --eval-text the
perplexity measured by `hublab-tools eval` (same text, --ctx and --chunks for every file, so the
numbers compare). Then, per board (Pi Zero 2 W 512 MB, Pi 3 1 GB, Pi 4 2/4/8 GB, Pi 5 4/8/16 GB,
a 32 GB server), the file to use: the device's own memory estimate (hublabio.budget) at
--context tokens against the board's budget (RAM minus the OS reserve of its hublabio.board
profile); among the files that fit, the lowest perplexity (or, unmeasured, the largest file).
License and base model come from the GGUF metadata unless given.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hublabio.board import profile_for
from hublabio.budget import estimate_memory, max_context_fitting
from hublabio.errors import GGUFError, HublabError
from hublabio.gguf_info import ModelInfo, read_gguf_info

# (label, device-tree model string, RAM in MiB) - the boards a card gives advice for
BOARDS = [
    ("Raspberry Pi Zero 2 W (512 MB)", "Raspberry Pi Zero 2 W Rev 1.0", 512),
    ("Raspberry Pi 3 (1 GB)", "Raspberry Pi 3 Model B Rev 1.2", 1024),
    ("Raspberry Pi 4 (2 GB)", "Raspberry Pi 4 Model B Rev 1.4", 2048),
    ("Raspberry Pi 4 (4 GB)", "Raspberry Pi 4 Model B Rev 1.4", 4096),
    ("Raspberry Pi 4 (8 GB)", "Raspberry Pi 4 Model B Rev 1.4", 8192),
    ("Raspberry Pi 5 (4 GB)", "Raspberry Pi 5 Model B Rev 1.0", 4096),
    ("Raspberry Pi 5 (8 GB)", "Raspberry Pi 5 Model B Rev 1.0", 8192),
    ("Raspberry Pi 5 (16 GB)", "Raspberry Pi 5 Model B Rev 1.1", 16384),
    ("Server (32 GB)", "", 32768),
]


@dataclass
class Entry:
    path: Path
    info: ModelInfo
    ppl: float | None = None
    ppl_err: float | None = None


@dataclass
class Advice:
    board: str
    budget_mb: int
    entry: Entry | None
    needs_mb: float | None
    max_context: int | None
    note: str = ""


def find_models(inputs) -> list[Path]:
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            candidates = sorted(item.glob("*.gguf"))
        elif item.is_file():
            candidates = [item]
        else:
            raise HublabError(f"{item}: no such file or folder")
        for p in candidates:
            if p.name.endswith(".imatrix.gguf"):
                continue
            if p.resolve() not in {o.resolve() for o in out}:
                out.append(p)
    return out


def _is_imatrix(path: Path) -> bool:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.type")
        return field is not None and field.contents() == "imatrix"
    except (ValueError, OSError, IndexError):
        return False


def board_budget(model_string: str, ram_mb: int) -> int:
    return ram_mb - profile_for(model_string, ram_mb).os_reserve_mb


FLOAT_TYPES = {"F32", "F16", "BF16"}
HEADROOM = 0.75   # a recommended file leaves a quarter of the budget for the OS, experts, spikes
PPL_TIE = 1.01    # within 1% of the best perplexity, the smaller (faster) file wins


def recommend(entries: list[Entry], context: int, boards=BOARDS) -> list[Advice]:
    """Per board: among files whose estimate at `context` fits 75% of the budget (else the whole
    budget, noted as tight), quantized files before F32/F16/BF16 (no quality gain over Q8_0 and
    twice the memory traffic per token); then the smallest file within 1% of the best measured
    perplexity, or, unmeasured, the largest file."""
    advice = []
    for label, model_string, ram in boards:
        budget = board_budget(model_string, ram)
        needs = {id(e): estimate_memory(e.info, context).total_mb for e in entries}
        note = ""
        fits = [e for e in entries if needs[id(e)] <= HEADROOM * budget]
        if not fits:
            fits = [e for e in entries if needs[id(e)] <= budget]
            note = "tight: under a quarter of the budget left" if fits else ""
        quantized = [e for e in fits if e.info.quantization.upper() not in FLOAT_TYPES]
        fits = quantized or fits
        if fits:
            if all(e.ppl is not None for e in fits):
                best = min(e.ppl for e in fits)
                pick = min((e for e in fits if e.ppl <= best * PPL_TIE),
                           key=lambda e: e.info.file_size)
            else:
                pick = max(fits, key=lambda e: e.info.file_size)
            advice.append(Advice(label, budget, pick, needs[id(pick)],
                                 max_context_fitting(pick.info, budget), note))
            continue
        smallest = min(entries, key=lambda e: e.info.file_size)
        ctx = max_context_fitting(smallest.info, budget, floor=256)
        if ctx:
            need = estimate_memory(smallest.info, ctx).total_mb
            advice.append(Advice(label, budget, smallest, need, ctx,
                                 note=f"only with a context of {ctx} tokens"))
        else:
            advice.append(Advice(label, budget, None, None, None, note="no file fits"))
    return advice


def _mib(n_bytes: int) -> str:
    mb = n_bytes / 2**20
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.1f} MiB"


def render_card(entries: list[Entry], advice: list[Advice], *, name: str, license: str | None,
                base_model: str | None, context: int, eval_desc: str | None) -> str:
    first = entries[0].info
    lines = ["---"]
    if license:
        lines.append(f"license: {license}")
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "  - gguf", "  - llama.cpp", "  - hublab-io", "---", "", f"# {name}", ""]
    lines.append(f"{first.architecture} model, {first.parameters_human} parameters, "
                 f"{first.layers} layers, trained context {first.context_length} tokens.")
    if base_model:
        lines.append(f"Base model: {base_model}.")
    if license:
        lines.append(f"License: {license}.")
    lines += ["", "## Files", ""]
    has_ppl = any(e.ppl is not None for e in entries)
    head = "| File | Quantization | Size | Bits/weight |" + (" Perplexity |" if has_ppl else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in sorted(entries, key=lambda e: -e.info.file_size):
        bpw = 8 * e.info.tensor_bytes / max(e.info.parameters, 1)
        row = (f"| {e.path.name} | {e.info.quantization} | {_mib(e.info.file_size)} "
               f"({e.info.file_size} bytes) | {bpw:.2f} |")
        if has_ppl:
            row += (f" {e.ppl:.3f} ± {e.ppl_err:.3f} |" if e.ppl is not None else " - |")
        lines.append(row)
    if eval_desc:
        lines += ["", f"Perplexity: {eval_desc} (lower is better; `hublab-tools eval`)."]
    lines += ["", "## Which file for which board", "",
              f"Memory is the device's own estimate (weights + KV cache + compute buffers) at a "
              f"context of {context} tokens; budget = board RAM minus its OS reserve. The pick "
              "fits in 75% of the budget, prefers quantized files over F32/F16 (same quality as "
              "Q8_0 at twice the memory traffic per token) and, among files within 1% of the "
              "best measured perplexity, the smallest. Largest context: the most tokens that "
              "file fits in the whole budget.", "",
              "| Board | Budget | Recommended file | Needs | Largest context |", "|---|---|---|---|---|"]
    for a in advice:
        if a.entry is None:
            lines.append(f"| {a.board} | {a.budget_mb} MiB | none ({a.note}) | - | - |")
            continue
        note = f" ({a.note})" if a.note else ""
        lines.append(f"| {a.board} | {a.budget_mb} MiB | {a.entry.path.name}{note} | "
                     f"{a.needs_mb:.0f} MiB | {a.max_context or '-'} |")
    lines += ["", "## Use it on a HubLab IO device", "", "```",
              f"hublab-tools deploy {_slug(name)}-pkg --models {entries[0].path.name} --tar",
              f"hublab -c \"pkg install {_slug(name)}-pkg.tar.gz\"",
              "hublab -c \"ai list\"", "```", ""]
    return "\n".join(lines)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def make_card(inputs, *, eval_text: Path | None = None, ctx: int = 512, chunks: int | None = None,
              context: int = 2048, name: str | None = None, license: str | None = None,
              base_model: str | None = None, threads: int = 2, progress=None) -> str:
    paths = find_models(inputs)
    entries = []
    for p in paths:
        try:
            info = read_gguf_info(p)
        except GGUFError:
            if _is_imatrix(p):
                continue
            raise
        if info.general_type != "model":
            continue
        entries.append(Entry(p, info))
    if not entries:
        raise HublabError("no GGUF models found in " + ", ".join(map(str, inputs)))
    eval_desc = None
    if eval_text is not None:
        from hublabio_tools.evaluate import perplexity

        text = Path(eval_text).read_text(encoding="utf-8")
        for e in entries:
            r = perplexity(e.path, text, n_ctx=ctx, n_chunks=chunks, threads=threads)
            e.ppl, e.ppl_err = r.ppl, r.stderr
            if progress:
                progress(e)
        eval_desc = (f"{Path(eval_text).name}, {r.chunks} chunks of {ctx} tokens, second half of "
                     f"each chunk scored ({r.tokens_scored} tokens)")
    meta = entries[0].info.metadata
    license = license or meta.get("general.license")
    base_model = base_model or meta.get("general.base_model.0.repo_url") or meta.get(
        "general.base_model.0.name")
    name = name or meta.get("general.name") or entries[0].path.stem
    return render_card(entries, recommend(entries, context), name=name, license=license,
                       base_model=base_model, context=context, eval_desc=eval_desc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools card", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="GGUF files or folders holding them")
    ap.add_argument("--eval-text", type=Path, help="text file to measure perplexity on")
    ap.add_argument("--ctx", type=int, default=512, help="eval chunk size (default 512)")
    ap.add_argument("--chunks", type=int, default=0, help="eval chunks (default all)")
    ap.add_argument("--context", type=int, default=2048,
                    help="context the board advice is computed for (default 2048)")
    ap.add_argument("--out", type=Path, help="default: README.md beside the first file")
    ap.add_argument("--name")
    ap.add_argument("--license")
    ap.add_argument("--base-model")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args(argv)
    try:
        text = make_card(args.inputs, eval_text=args.eval_text, ctx=args.ctx,
                         chunks=args.chunks or None, context=args.context, name=args.name,
                         license=args.license, base_model=args.base_model, threads=args.threads,
                         progress=lambda e: print(f"{e.path.name}: PPL {e.ppl:.3f}",
                                                  file=sys.stderr))
    except (HublabError, OSError, RuntimeError) as err:
        print(f"hublab-tools card: {err}", file=sys.stderr)
        return 1
    first = find_models(args.inputs)[0]
    out = args.out or first.parent / "README.md"
    from hublabio.fsutil import atomic_write_text

    atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
