"""Process-wide llama.cpp state: one locked backend init, the log policy, the CPU policy applied
to the buffer types llama.cpp may choose from, and thread pools.

llama.cpp chooses the buffer type of each weight from a list: ACCEL, host, then the CPU
backend's "extra" types (AMX, CPU_REPACK, ...), then plain CPU. The extra list is a
NULL-terminated array owned by ggml-cpu (`ggml_backend_dev_get_extra_bufts`), read when a model
is loaded. `apply_policy()` rewrites that array before each load, under `load_lock`, from the
list seen at start-up: without AMX unless the policy allows it. No tensor then lands in an AMX
buffer, so the AMX kernels (llama.cpp issue #20824) never run, while CPU_REPACK still serves the
types it supports.
"""

from __future__ import annotations

import ctypes
import threading

import llama_cpp as C

from hublabio.errors import LlamaError
from hublabio.llama import log
from hublabio.llama.cpu import RepackPolicy

GGML_BACKEND_DEVICE_TYPE_CPU = 0

load_lock = threading.RLock()  # model loads (and the extra-buffer list they read) one at a time
_init_lock = threading.Lock()
_ready = False
_ggml = None
_extra: ctypes.Array | None = None        # the live array inside ggml-cpu
_extra_all: list[int] = []                # its entries as found at start-up
_extra_names: dict[int, str] = {}


def init() -> None:
    """Start llama.cpp's backend once per process and install the log policy."""
    global _ready
    with _init_lock:
        if not _ready:
            log.install()
            C.llama_backend_init()
            _find_extra_bufts()
            _ready = True


def ggml():
    """libggml with the prototypes this layer uses."""
    global _ggml
    if _ggml is None:
        from llama_cpp._ggml import libggml as lib

        p, cp = ctypes.c_void_p, ctypes.c_char_p
        for name, res, args in (
                ("ggml_backend_dev_by_type", p, [ctypes.c_int]),
                ("ggml_backend_dev_backend_reg", p, [p]),
                ("ggml_backend_reg_get_proc_address", p, [p, cp]),
                ("ggml_backend_buft_name", cp, [p]),
                ("ggml_op_name", cp, [ctypes.c_int]),
                ("ggml_nbytes", ctypes.c_size_t, [p]),
                ("ggml_backend_buffer_is_host", ctypes.c_bool, [p]),
                ("ggml_backend_tensor_get", None, [p, p, ctypes.c_size_t, ctypes.c_size_t])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _ggml = lib
    return _ggml


def _find_extra_bufts() -> None:
    global _extra, _extra_all
    lib = ggml()
    dev = lib.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        raise LlamaError("llama.cpp has no CPU backend")
    reg = lib.ggml_backend_dev_backend_reg(dev)
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return  # a build without extra buffer types: nothing to choose
    fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = fn(dev)
    if not arr:  # no extra buffer types at all (a build without repack kernels)
        return
    entries = []
    while arr and arr[len(entries)]:
        entries.append(arr[len(entries)])
    _extra = ctypes.cast(arr, ctypes.POINTER(ctypes.c_void_p * (len(entries) + 1))).contents
    _extra_all = entries
    for e in entries:
        _extra_names[e] = (lib.ggml_backend_buft_name(e) or b"?").decode()


def extra_buffer_types() -> list[str]:
    """The extra buffer types this llama.cpp build offers on this CPU (AMX, CPU_REPACK, ...)."""
    init()
    return [_extra_names[e] for e in _extra_all]


def apply_policy(policy: RepackPolicy) -> list[str]:
    """Set the extra buffer types the next model load may use; returns their names.
    Call with `load_lock` held, right before llama_model_load_from_file."""
    init()
    keep = [e for e in _extra_all if policy.allow_amx or _extra_names[e] != "AMX"]
    if _extra is not None:
        for i in range(len(_extra)):
            _extra[i] = keep[i] if i < len(keep) else None
    return [_extra_names[e] for e in keep] if policy.use_extra_bufts else []
