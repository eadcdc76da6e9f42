"""The first load of an unknown GGUF runs in a short-lived child process.

llama.cpp checks a model's header with asserts that abort the whole process (a block_count of 0
or 600, an expert count past its limit, ...), and ggml asserts on values that only matter when a
batch is computed (a NaN norm epsilon), so no pre-check in Python can know them all. Before a
file is loaded in the daemon, `probe(path)` runs its first load in a child process, in two steps:

1. metadata, hyperparameters and every tensor's shape, with no weight read or allocated
   (llama.cpp's no_alloc): a broken header is refused fast;
2. the real load, a context of 16 tokens, one 2-token batch and one single-token decode: the
   code paths a first request takes. The weights are mmapped and not repacked, so the child
   copies none: what it reads stays in the page cache for the daemon's own load, and on a
   small board it does not need the model's memory twice while another model is resident.
   (Asserts inside repacked matmul kernels only are therefore not covered.)

It reports success, llama.cpp's refusal, or the abort, as a GGUFError naming the file. A file
that passed is remembered by (path, size, mtime), so it is probed once per daemon run. What it
costs (a second load; the weights it read stay in the page cache for the daemon's own load) is
in docs/BENCHMARKS.md (bench/bench_probe.py).

  python -m hublabio.llama.probe FILE   # exit 0 = runs, 1 = refused (message on stdout)
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
    """`check(path)` raises GGUFError unless llama.cpp can load the file and compute a batch.
    Both outcomes are remembered per (path, size, mtime): a refused file is refused again at
    once (and `problem(path)` tells `ai list` why) until it changes."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self._good: set[tuple] = set()
        self._bad: dict[tuple, GGUFError] = {}
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
            if key in self._bad:
                raise self._bad[key]
        try:
            probe(path, timeout_s=self.timeout_s)
        except GGUFError as err:
            with self._lock:
                self._bad[key] = err
            raise
        with self._lock:
            self._good.add(key)

    def problem(self, path: str | os.PathLike) -> str | None:
        """Why this file (as it is now) was refused, if it was."""
        try:
            key = _key(Path(path))
        except OSError:
            return None
        with self._lock:
            err = self._bad.get(key)
        return str(err) if err is not None else None


def probe(path: str | os.PathLike, *, timeout_s: float = TIMEOUT_S) -> None:
    """Raise GGUFError unless the file loads and computes a batch in a child process."""
    path = Path(path)
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb attach on abort
    try:
        proc = subprocess.run([sys.executable, "-m", "hublabio.llama.probe", str(path)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise GGUFError(path, f"llama.cpp did not finish loading this file and computing one "
                              f"batch in {timeout_s:.0f} s") from None
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        lines = [ln.strip() for ln in proc.stderr.splitlines() if "GGML_ASSERT" in ln
                 or "error" in ln.lower()]
        detail = lines[-1].split("llama.cpp/", 1)[-1] if lines else "no message"
        step = ("computing a first batch" if "loaded" in proc.stdout
                else "checking this file's header and tensors")
        raise GGUFError(path, f"llama.cpp aborted ({name}) while {step}: {detail}")
    message = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
    raise GGUFError(path, message[0] if message else f"the probe failed (exit {proc.returncode})")


def _anon_mb() -> float:
    """This process's anonymous (not file-backed) resident memory, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from hublabio.errors import HublabError
    from hublabio.llama.handles import Context, Model

    path = argv[0]
    try:
        Model(path, metadata_only=True).close()
        with Model(path, repack=False) as model:
            print("loaded", flush=True)  # an abort from here on is in the compute
            with Context(model, n_ctx=16, n_batch=8, threads=1) as ctx:
                token = model.bos if 0 <= model.bos < model.n_vocab else 0
                ctx.decode([token, token], 0)
                ctx.decode([token], 2)
                print(f"anon_mb {_anon_mb():.0f}", flush=True)  # for bench/bench_probe.py
    except HublabError as err:
        text = str(err)
        print(text.removeprefix(f"{getattr(err, 'path', '')}: "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
