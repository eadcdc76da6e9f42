"""The per-board table, computed (issue 12): for every board profile and each of Q4_0, Q4_K_M
and Q8_0, the largest of the seed's model sizes (tools/recipes hublabio-0.5b .. hublabio-7b)
whose memory estimate the board's budget admits with a context of at least --min-ctx tokens,
the largest context it admits, and the generation speed the board's memory bandwidth allows.

usage: .venv/bin/python bench/board_table.py [--min-ctx 2048] [--position 512]

- Memory: hublabio.budget.estimate_memory, the same count the daemon admits loads with, on the
  header `random-model` would write (tools/random_model.recipe_info: llama.cpp's quantizer
  picks each tensor's type; the recipe's own 32k vocabulary), one slot, with the repack policy
  llama.cpp applies on the board's CPU (hublabio.llama.cpu.decide: the Pi 5's Cortex-A76 has
  dotprod, so Q4_0/Q4_K/Q6_K/Q8_0 matrices get a repacked copy beside the mapped file; the
  Cortex-A53/A72 of the Pi Zero 2 W, 3 and 4 have none). The Pi 5 also gets a row with
  `repack = false`, which trades the faster kernels for memory.
- Budget: the board's RAM minus its profile's OS reserve (hublabio.board), as the daemon
  computes it when no budget is configured.
- Speed: the bandwidth limit, peak bandwidth / bytes one token reads (every weight once plus
  the KV cache of --position tokens; hublabio.budget.bytes_per_token). Peak bandwidth is the
  memory's spec: transfers per second x the 32-bit bus. Real decoding gets a fraction of it
  (STREAM copy reaches about 5.5 GB/s of a Pi 4's 12.8; this project's decoding reaches a
  third of the measured bandwidth on a 2-core x86, docs/BENCHMARKS.md), so read the figure as
  a ceiling, not a promise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from hublabio.board import profile_for
from hublabio.budget import bytes_per_token, estimate_memory, max_context_fitting
from hublabio.llama.cpu import decide

RECIPES = ("hublabio-7b", "hublabio-3b", "hublabio-1b", "hublabio-0.5b")  # largest first
TYPES = ("Q4_0", "Q4_K_M", "Q8_0")
DOTPROD = ("aarch64", frozenset({"asimd", "asimddp"}))   # Cortex-A76 (Pi 5)
NEON = ("aarch64", frozenset({"asimd"}))                  # Cortex-A53 / A72


@dataclass(frozen=True)
class BoardSpec:
    label: str
    model_string: str     # what its device tree says (picks the hublabio.board profile)
    ram_mb: int
    cpu: tuple[str, frozenset[str]]
    memory: str           # the RAM's spec
    peak_gbs: float       # MT/s x 4 bytes


BOARDS = (
    BoardSpec("Pi Zero 2 W (512 MB)", "Raspberry Pi Zero 2 W Rev 1.0", 512, NEON,
              "LPDDR2-900", 3.6),
    BoardSpec("Pi 3 (1 GB)", "Raspberry Pi 3 Model B Rev 1.2", 1024, NEON, "LPDDR2-900", 3.6),
    BoardSpec("Pi 4 (2 GB)", "Raspberry Pi 4 Model B Rev 1.4", 2048, NEON, "LPDDR4-3200", 12.8),
    BoardSpec("Pi 4 (4 GB)", "Raspberry Pi 4 Model B Rev 1.4", 4096, NEON, "LPDDR4-3200", 12.8),
    BoardSpec("Pi 4 (8 GB)", "Raspberry Pi 4 Model B Rev 1.4", 8192, NEON, "LPDDR4-3200", 12.8),
    BoardSpec("Pi 5 (2 GB)", "Raspberry Pi 5 Model B Rev 1.0", 2048, DOTPROD, "LPDDR4X-4267",
              17.1),
    BoardSpec("Pi 5 (4 GB)", "Raspberry Pi 5 Model B Rev 1.0", 4096, DOTPROD, "LPDDR4X-4267",
              17.1),
    BoardSpec("Pi 5 (8 GB)", "Raspberry Pi 5 Model B Rev 1.0", 8192, DOTPROD, "LPDDR4X-4267",
              17.1),
    BoardSpec("Pi 5 (16 GB)", "Raspberry Pi 5 Model B Rev 1.1", 16384, DOTPROD, "LPDDR4X-4267",
              17.1),
)


@dataclass(frozen=True)
class Pick:
    recipe: str | None    # None: not even the smallest fits
    n_ctx: int | None
    needs_mb: float | None
    tok_s: float | None


def model_infos(types=TYPES) -> dict[tuple[str, str], object]:
    from hublabio_tools.random_model import recipe_info

    return {(r, t): recipe_info(r, t) for r in RECIPES for t in types}


def largest_fitting(infos, ftype: str, budget: float, policy, *, min_ctx: int, position: int,
                    peak_gbs: float) -> Pick:
    for recipe in RECIPES:
        info = infos[(recipe, ftype)]
        ctx = max_context_fitting(info, budget, floor=min_ctx, repack=policy)
        if ctx is not None:
            needs = estimate_memory(info, ctx, repack=policy).total_mb
            tok_s = peak_gbs * 1e9 / bytes_per_token(info, min(position, ctx))
            return Pick(recipe, ctx, needs, tok_s)
    return Pick(None, None, None, None)


def rows(infos, *, min_ctx: int = 2048, position: int = 512) -> list[tuple[str, str, list[Pick]]]:
    """(board label, repack setting, one Pick per type) for every board (the Pi 5 twice)."""
    out = []
    for b in BOARDS:
        budget = b.ram_mb - profile_for(b.model_string, b.ram_mb).os_reserve_mb
        settings = ("auto", False) if b.cpu == DOTPROD else ("auto",)
        for setting in settings:
            policy = decide(setting, machine=b.cpu[0], flags=b.cpu[1])
            picks = [largest_fitting(infos, t, budget, policy, min_ctx=min_ctx,
                                     position=position, peak_gbs=b.peak_gbs) for t in TYPES]
            out.append((f"{b.label}, budget {budget} MiB, {b.memory} ({b.peak_gbs} GB/s)",
                        "off" if setting is False else "auto", picks))
    return out


def _cell(p: Pick) -> str:
    if p.recipe is None:
        return "none"
    size = p.recipe.removeprefix("hublabio-").upper()
    return f"{size} · {p.n_ctx} ctx · {p.needs_mb:.0f} MiB · ≤ {p.tok_s:.1f} tok/s"


def markdown(table) -> str:
    lines = ["| board | repack | " + " | ".join(TYPES) + " |",
             "| --- | --- | " + " | ".join("---" for _ in TYPES) + " |"]
    lines += [f"| {label} | {rp} | " + " | ".join(_cell(p) for p in picks) + " |"
              for label, rp, picks in table]
    return "\n".join(lines)


def memory_markdown(infos, n_ctx: int = 2048) -> str:
    """The estimate per size and type at `n_ctx` with repacking off and on a Pi 5."""
    off = decide(False, machine=DOTPROD[0], flags=DOTPROD[1])
    pi5 = decide("auto", machine=DOTPROD[0], flags=DOTPROD[1])
    lines = ["| model | parameters | " + " | ".join(f"{t} file / off / Pi 5 auto" for t in TYPES)
             + " |", "| --- | ---: | " + " | ".join("---:" for _ in TYPES) + " |"]
    for recipe in reversed(RECIPES):
        cells = []
        for t in TYPES:
            info = infos[(recipe, t)]
            cells.append(f"{info.tensor_bytes / 2**20:.0f} / "
                         f"{estimate_memory(info, n_ctx, repack=off).total_mb:.0f} / "
                         f"{estimate_memory(info, n_ctx, repack=pi5).total_mb:.0f}")
        info = infos[(recipe, TYPES[0])]
        lines.append(f"| {recipe} | {info.parameters / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-ctx", type=int, default=2048,
                    help="the smallest context a pick must admit (2048)")
    ap.add_argument("--position", type=int, default=512,
                    help="tokens of KV cache read per token in the speed figure (512)")
    args = ap.parse_args(argv)
    infos = model_infos()
    print(markdown(rows(infos, min_ctx=args.min_ctx, position=args.position)))
    print()
    print(memory_markdown(infos, args.min_ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
