"""One log policy for llama.cpp in this process.

llama.cpp logs through a single process-wide callback. hublabio installs this one when the
backend starts (hublabio.llama.backend.init): nothing reaches stderr unless HUBLAB_LLAMA_LOG=1
), recent warnings and errors are kept for error messages (`recent_errors`), and
the "model buffer size" lines of a load are captured, so a loaded model can say which buffer
types (CPU_Mapped, CPU_REPACK, AMX, ...) hold its weights.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import threading

import llama_cpp as C

GGML_LOG_INFO, GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 2, 3, 4, 5  # ggml.h ggml_log_level

_BUFFER_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB")

_lock = threading.Lock()
_tail: collections.deque[str] = collections.deque(maxlen=200)
_echo = os.environ.get("HUBLAB_LLAMA_LOG", "") not in ("", "0")
_last_level = GGML_LOG_INFO
_capture: dict[str, float] | None = None


@C.llama_log_callback
def _callback(level, text, user_data):  # runs on llama.cpp's threads; must never raise
    global _last_level
    try:
        msg = text.decode("utf-8", "replace") if text else ""
        if level != GGML_LOG_CONT:
            _last_level = level
        with _lock:
            if _last_level in (GGML_LOG_WARN, GGML_LOG_ERROR):
                _tail.append(msg)
            if _capture is not None:
                m = _BUFFER_LINE.search(msg)
                if m:
                    _capture[m.group(1)] = _capture.get(m.group(1), 0.0) + float(m.group(2))
        if _echo:
            print(msg, end="", file=sys.stderr)
    except Exception:  # noqa: BLE001 - an exception must not cross into C
        pass


def install() -> None:
    C.llama_log_set(_callback, ctypes.c_void_p(0))


def recent_errors(n: int = 8) -> list[str]:
    with _lock:
        lines = [line.strip(" =\n") for line in _tail]
    return [line for line in lines if line][-n:]


def clear_errors() -> None:
    with _lock:
        _tail.clear()


class capture_buffers:
    """`with capture_buffers() as bufs: load()` fills bufs with {buffer type: MiB} of the weights.
    Loads are serialized by the backend's lock, so one capture is active at a time."""

    def __enter__(self) -> dict[str, float]:
        global _capture
        with _lock:
            _capture = {}
            return _capture

    def __exit__(self, *exc) -> None:
        global _capture
        with _lock:
            _capture = None
