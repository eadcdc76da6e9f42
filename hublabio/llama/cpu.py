"""CPU policy, in one place: which weight buffer types llama.cpp may use on this CPU.

llama.cpp's CPU backend can copy some weight matrices into "extra" buffer types with an
interleaved layout for faster kernels: CPU_REPACK (AVX2 on x86, dotprod / i8mm on ARM, such as
the Pi 5) and, in a native build on an Intel CPU with AMX, the AMX buffer type. The AMX path
crashes (segfault in ggml_backend_amx_mul_mat, llama.cpp issue #20824), so:

- repack = "auto" (default): every extra buffer type except AMX;
- repack = true: every extra buffer type, AMX included (only for a llama.cpp known to be fixed);
- repack = false: none (weights stay in the mapped file pages).

`decide()` turns the setting and the CPU into a `RepackPolicy`; hublabio.llama.backend applies
it to llama.cpp before each model load, and hublabio.budget uses the same policy to count the
repacked copies (anonymous memory, not file pages) in the memory estimate.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# ggml-cpu/repack.cpp (llama.cpp in llama-cpp-python 0.3.36): tensor type -> the row count
# (ne[1]) a matrix must be a multiple of to get a repacked copy, per CPU feature set.
_X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
_X86_AVX512 = {"Q2_K": 8}
_ARM_DOTPROD = {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4}
# ggml-cpu/amx/common.h qtype_has_amx_kernels
AMX_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 "flags", ARM "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def has_amx(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_int8", "amx_tile", "amx_bf16"} & flags)


def parse_repack(value) -> str | bool:
    """"auto" | true | false, from TOML (bool or string) or a command line ("auto/on/off")."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "on", "yes", "1"):
        return True
    if text in ("false", "off", "no", "0"):
        return False
    raise ValueError(f"repack must be \"auto\", true or false, got {value!r}")


@dataclass(frozen=True)
class RepackPolicy:
    setting: str | bool           # what was asked for
    use_extra_bufts: bool         # llama_model_params.use_extra_bufts
    allow_amx: bool               # keep the AMX buffer type in the list llama.cpp chooses from
    row_multiples: tuple[tuple[str, int], ...]  # type -> rows multiple, for the estimate
    reason: str

    def repacked(self, type_name: str, rows: int) -> bool:
        """Whether llama.cpp makes an anonymous copy of a matrix of this type and row count."""
        if not self.use_extra_bufts:
            return False
        if self.allow_amx and type_name in AMX_TYPES:
            return True
        multiple = dict(self.row_multiples).get(type_name)
        return multiple is not None and rows % multiple == 0


def decide(setting="auto", *, machine: str | None = None,
           flags: frozenset[str] | None = None) -> RepackPolicy:
    setting = parse_repack(setting)
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    table: dict[str, int] = {}
    if machine in ("x86_64", "amd64"):
        if "avx2" in flags:
            table.update(_X86_AVX2)
        if "avx512f" in flags:
            table.update(_X86_AVX512)
    elif machine in ("aarch64", "arm64") and ({"asimddp", "i8mm"} & flags):
        table.update(_ARM_DOTPROD)  # Pi 5 (Cortex-A76); Pi 3/4/Zero 2 have no such kernels
    amx = has_amx(flags) and machine in ("x86_64", "amd64")
    if setting is False:
        return RepackPolicy(setting, False, False, (), "repack = false")
    if setting is True:
        why = "repack = true" + (" (AMX allowed: llama.cpp issue #20824)" if amx else "")
        return RepackPolicy(setting, True, amx, tuple(sorted(table.items())), why)
    why = "auto" + ("; AMX buffer type excluded (llama.cpp issue #20824)" if amx else "")
    return RepackPolicy(setting, True, False, tuple(sorted(table.items())), why)
