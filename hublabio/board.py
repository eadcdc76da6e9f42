"""Which board we run on, how much RAM it has, and how much of it to leave to the OS.

`detect_board()` reads /proc/device-tree/model (Raspberry Pi boards write e.g.
"Raspberry Pi 4 Model B Rev 1.4") and the total RAM (/proc/meminfo, lowered by a cgroup memory
limit when one applies), then picks a profile: Pi Zero 2 W, Pi 3, Pi 4 (1/2/4/8 GB),
Pi 5 (2/4/8/16 GB), another Raspberry Pi, or generic Linux. Each profile has an OS reserve:
what the kernel, systemd, sshd and the shell need so the board never swaps itself to death.

`budget_mb(settings, board)`: a configured budget wins; otherwise RAM minus the reserve
(the configured `os_reserve_mb` if any, else the profile's).

Every input path is a parameter, so tests can feed fake device trees and meminfo files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
MEMINFO = Path("/proc/meminfo")
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")

# Nominal RAM sizes boards are sold with; MemTotal is a little below them (firmware, GPU split).
_RAM_TIERS_MB = (256, 512, 1024, 2048, 4096, 8192, 16384)

# (family, match on the device-tree model string, cores, {nominal RAM MB: OS reserve MB}).
# Reserves: Raspberry Pi OS Lite idles at ~70-100 MB on a Zero 2 W and ~150-250 MB on a Pi 4/5;
# bigger boards tend to run more (a desktop, containers), so they keep more back.
_PI_PROFILES = (
    ("Raspberry Pi Zero 2 W", re.compile(r"Raspberry Pi Zero 2"), 4, {512: 128}),
    ("Raspberry Pi 3", re.compile(r"Raspberry Pi 3"), 4, {512: 128, 1024: 192}),
    ("Raspberry Pi 4", re.compile(r"Raspberry Pi (4|400|Compute Module 4)"), 4,
     {1024: 224, 2048: 384, 4096: 512, 8192: 768}),
    ("Raspberry Pi 5", re.compile(r"Raspberry Pi (5|500|Compute Module 5)"), 4,
     {2048: 384, 4096: 512, 8192: 768, 16384: 1024}),
)


@dataclass(frozen=True)
class Board:
    name: str             # profile, e.g. "Raspberry Pi 4 (4 GB)" or "Generic Linux"
    model_string: str     # what the device tree says ("" when there is none)
    ram_mb: int           # usable RAM: MemTotal, or the cgroup limit when lower
    cores: int
    os_reserve_mb: int

    @property
    def is_raspberry_pi(self) -> bool:
        return self.model_string.startswith("Raspberry Pi")

    @property
    def threads(self) -> int:
        """Default llama.cpp threads for generation. Decoding is bound by memory bandwidth: on a
        Pi 5, sub-1B models peak at about 2 threads (published llama-bench runs), and more
        threads only spin. Elsewhere: every core."""
        if self.name.startswith("Raspberry Pi 5"):
            return min(2, self.cores)
        return self.cores

    @property
    def threads_batch(self) -> int:
        """Default llama.cpp threads for prompt processing (compute-bound): every core."""
        return self.cores

    @property
    def parallel(self) -> int:
        """Default slots per model (continuous batching): each holds its own KV cache, which
        the memory estimate counts, so small boards get fewer: 1 under 1 GB of RAM, 2 under
        4 GB, else 4."""
        return 1 if self.ram_mb < 1024 else 2 if self.ram_mb < 4096 else 4

    @property
    def adapter_contexts(self) -> int:
        """Default adapter sets a model keeps applied at once (`Engine.add_context`): TopK(2)
        over two experts with different LoRA adapters needs two. A context is added only when
        experts use another adapter set and the memory budget admits it. It costs a slot's KV
        cache and a compute buffer (40 MiB for SmolLM2 at n_ctx 1024) to save ~5 ms a switch,
        so boards under 4 GB keep one."""
        return 1 if self.ram_mb < 4096 else 2


def nominal_ram_mb(ram_mb: int) -> int:
    """The advertised size a board with this MemTotal was sold as (smallest tier >= it)."""
    for tier in _RAM_TIERS_MB:
        if ram_mb <= tier:
            return tier
    return ram_mb


def read_model_string(path: Path = DEVICE_TREE_MODEL) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return ""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def read_total_ram_mb(meminfo: Path = MEMINFO, cgroup_max: Path | None = CGROUP_MEMORY_MAX) -> int:
    """MemTotal in MiB, lowered to the cgroup v2 memory limit when one is set."""
    total = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024  # kB → MiB
                break
    except (OSError, ValueError, IndexError):
        total = None
    if total is None:
        try:
            import psutil

            total = psutil.virtual_memory().total // (1024 * 1024)
        except Exception:
            total = 0
    if cgroup_max is not None:
        try:
            text = Path(cgroup_max).read_text().strip()
            if text and text != "max":
                total = min(total, int(text) // (1024 * 1024)) if total else int(text) // 2**20
        except (OSError, ValueError):
            pass
    return total


def _generic_reserve(ram_mb: int) -> int:
    # A general-purpose Linux box: a quarter of RAM, at least 512 MiB, at most 4 GiB.
    return max(512, min(4096, ram_mb // 4)) if ram_mb >= 1024 else max(96, ram_mb // 4)


def profile_for(model_string: str, ram_mb: int, cores: int | None = None) -> Board:
    """The board profile for a device-tree model string and a MemTotal."""
    tier = nominal_ram_mb(ram_mb)
    for family, pattern, pi_cores, reserves in _PI_PROFILES:
        if pattern.search(model_string):
            # The nearest listed size at or below the board's (a 16 GB Pi 4 would use 8 GB's).
            sizes = sorted(reserves)
            size = max((s for s in sizes if s <= tier), default=sizes[0])
            label = f"{tier // 1024} GB" if tier >= 1024 else f"{tier} MB"
            name = family if len(sizes) == 1 else f"{family} ({label})"
            return Board(name, model_string, ram_mb, cores or pi_cores, reserves[size])
    if model_string.startswith("Raspberry Pi"):
        # Pi 1/2/Zero/Zero W and future boards: ~15% reserve, at least 96 MiB.
        return Board("Raspberry Pi (other)", model_string, ram_mb, cores or os.cpu_count() or 1,
                     max(96, tier * 15 // 100))
    return Board("Generic Linux", model_string, ram_mb, cores or os.cpu_count() or 1,
                 _generic_reserve(ram_mb))


def detect_board(device_tree_model_path: Path = DEVICE_TREE_MODEL, meminfo: Path = MEMINFO, *,
                 cgroup_max: Path | None = CGROUP_MEMORY_MAX, cores: int | None = None) -> Board:
    """Detect the board we run on (see the module docstring)."""
    model = read_model_string(device_tree_model_path)
    ram = read_total_ram_mb(meminfo, cgroup_max)
    if cores is None and not model.startswith("Raspberry Pi"):
        cores = os.cpu_count() or 1
    return profile_for(model, ram, cores)


def budget_mb(settings, board: Board) -> int:
    """Memory the models may use, in MiB: `settings.budget_mb` when set (> 0), else the
    board's RAM minus the OS reserve (`settings.os_reserve_mb` when set, else the profile's)."""
    configured = getattr(settings, "budget_mb", 0) or 0
    if configured > 0:
        return int(configured)
    reserve = getattr(settings, "os_reserve_mb", None)
    if reserve is None:
        reserve = board.os_reserve_mb
    return max(0, int(board.ram_mb - reserve))


__all__ = ["Board", "detect_board", "budget_mb", "profile_for", "nominal_ram_mb",
           "read_model_string", "read_total_ram_mb"]
