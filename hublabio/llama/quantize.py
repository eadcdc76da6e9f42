"""llama.cpp's quantizer (llama_model_quantize), with an importance matrix and metadata
overrides. Workstation use (hublab-tools quantize runs it in a child process, since an assert
inside llama.cpp would abort the caller)."""

from __future__ import annotations

import ctypes
import os

import llama_cpp as C
import numpy as np

from hublabio.errors import LlamaError
from hublabio.llama import backend, log
from hublabio.llama.abi import set_fields


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, *, ftype: int, threads: int = 0,
                  allow_requantize: bool = False, imatrix: dict[str, np.ndarray] | None = None,
                  kv_overrides: list[tuple[str, int | str]] = ()) -> None:
    """Write `dst` as llama.cpp file type `ftype` (LLAMA_FTYPE_*). `imatrix` maps tensor names to
    float32 per-column importance; `kv_overrides` are metadata keys written into `dst`."""
    backend.init()
    params = C.llama_model_quantize_default_params()
    set_fields(params, ftype=ftype, nthread=int(threads), allow_requantize=bool(allow_requantize))
    keep = []  # every buffer the C struct points into stays alive until the call returns
    if imatrix:
        arr = (C.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            bname = name.encode()
            keep += [bname, values]
            set_fields(arr[i], name=bname, size=values.size,
                       data=values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        set_fields(arr[len(imatrix)], name=None)  # terminator
        set_fields(params, imatrix=ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data)))
        keep.append(arr)
    if kv_overrides:
        kvo = (C.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, val) in enumerate(kv_overrides):
            if isinstance(val, int):
                set_fields(kvo[i], key=key.encode()[:127], tag=C.LLAMA_KV_OVERRIDE_TYPE_INT)
                kvo[i].value.val_i64 = val
            else:
                set_fields(kvo[i], key=key.encode()[:127], tag=C.LLAMA_KV_OVERRIDE_TYPE_STR)
                kvo[i].value.val_str = str(val).encode()[:127]
        set_fields(kvo[len(kv_overrides)], key=b"")
        set_fields(params, kv_overrides=ctypes.cast(kvo, ctypes.POINTER(C.llama_model_kv_override)))
        keep.append(kvo)
    log.clear_errors()
    rc = C.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        detail = "\n".join(log.recent_errors(6)) or f"code {rc}"
        raise LlamaError(f"{src}: llama_model_quantize failed: {detail}")
