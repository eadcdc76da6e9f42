"""The first load of an unknown GGUF runs in a short-lived child process.

llama.cpp checks a model's header with asserts that abort the whole process (a block_count of 0
or 600, an expert count past its limit, ...), and no pre-check in Python can know them all. So
before a file is loaded in the daemon, `probe(path)` loads it in a child process — metadata,
hyperparameters and every tensor's shape, with no weight read or allocated (llama.cpp's
no_alloc: about 0.25 s and 60 MB for SmolLM2 here) — and reports success, llama.cpp's refusal,
or the abort, as a GGUFError naming the file. A file that passed is remembered by
(path, size, mtime), so it is probed once per daemon run.

Not covered: asserts that fire only when a context is built or a batch is decoded.

  python -m hublabio.llama.probe FILE   # exit 0 = loads, 1 = refused (message on stdout)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hublabio.errors import GGUFError

TIMEOUT_S = 120.0


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


class Prober:
    """`check(path)` raises GGUFError unless llama.cpp can load the file's header and shapes."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self._good: set[tuple] = set()
        self._lock = threading.Lock()

    def check(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            key = _key(path)
        except OSError as err:
            raise GGUFError(path, f"cannot read: {err.strerror}") from None
        with self._lock:
            if key in self._good:
                return
        probe(path, timeout_s=self.timeout_s)
        with self._lock:
            self._good.add(key)


def probe(path: str | os.PathLike, *, timeout_s: float = TIMEOUT_S) -> None:
    path = Path(path)
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb attach on abort
    try:
        proc = subprocess.run([sys.executable, "-m", "hublabio.llama.probe", str(path)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise GGUFError(path, f"llama.cpp did not finish reading this file's header in "
                              f"{timeout_s:.0f} s") from None
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        lines = [ln.strip() for ln in proc.stderr.splitlines() if "GGML_ASSERT" in ln
                 or "error" in ln.lower()]
        detail = lines[-1].split("llama.cpp/", 1)[-1] if lines else "no message"
        raise GGUFError(path, f"llama.cpp aborted ({name}) while checking this file's header "
                              f"and tensors: {detail}")
    message = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
    raise GGUFError(path, message[0] if message else f"the probe failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from hublabio.errors import HublabError
    from hublabio.llama.handles import Model

    try:
        Model(argv[0], metadata_only=True).close()
    except HublabError as err:
        text = str(err)
        print(text.removeprefix(f"{getattr(err, 'path', '')}: "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
