"""The fuzz and fault suite (issue 11): one real daemon (Unix socket + HTTP) takes bad GGUF
headers made from a valid one a field at a time, fuzzed request lines and HTTP requests,
planted journals, `pkg install`s and settings writers killed with SIGKILL, and concurrent
writers. Every case ends with `still_serving()`: a normal generate over the socket and /health
over HTTP answer, and `outside/` (the folder next to the models and state dirs that every
escape attempt aims at) is byte for byte what it was.

Elsewhere, one failure each: test_bad_gguf.py (llama.cpp aborts, the probe, an endless chat
template), test_daemon.py (slow readers, half-close, hostile JSON lines), test_http.py (HTTP
framing, a stream nobody reads), test_pkg.py (hostile packages, journals, records), test_config.py
and test_pkg.py (hostile TOML, concurrent settings writers), test_sockwrite.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import httpx
import pytest

from hublabio import pkg, protocol
from hublabio.client import Client

from test_pkg import listing, make_dir

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import make_daemon

KNOWN_CODES = set(protocol.ERROR_CLASSES) - {"internal"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_path):
    root = tmp_path_factory.mktemp("faults")
    models, outside = root / "models", root / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("must survive")
    (outside / "victim.gguf").write_bytes(b"GGUF" + bytes(100))
    (models / "model-config.toml").write_text(
        f'[model]\nname = "smol"\npath = "{smollm2_path}"\n[inference]\ncontext_size = 128\n'
        "max_tokens = 2\ntemperature = 0.0\nthreads = 1\n")
    handle = make_daemon(models, http="127.0.0.1:0", budget_mb=4096)
    host, port = handle.http_address
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=120) as http:
        yield {"daemon": handle, "models": models, "outside": outside, "http": http,
               "before": listing(outside), "root": root}
    handle.stop()


def still_serving(world) -> None:
    with Client(world["daemon"].socket_path, timeout=120) as c:
        out = c.call("generate", model="smol", prompt="Hi", options={"max_tokens": 1})
        assert out["completion_tokens"] == 1
    assert world["http"].get("/health").status_code == 200
    assert listing(world["outside"]) == world["before"]


# ---- GGUF headers, one field changed at a time -----------------------------------------------

def _mutants(path: Path) -> list[tuple[str, int, bytes]]:
    """(what, byte offset, new bytes) for every scalar metadata value and for the fields of the
    first tensors: each set to values at and beyond the edges of what a model can have."""
    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    out = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or len(f.types) != 1:
            continue
        part = f.parts[-1]
        at = part.ctypes.data - base
        kind = f.types[0]
        if kind in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32):
            for v in (0, 600, 0xFFFFFFFF):
                out.append((f"{f.name} = {v}", at, struct.pack("<I", v)))
        elif kind == gguf.GGUFValueType.FLOAT32:
            for v in (0.0, float("nan"), -1e38):
                out.append((f"{f.name} = {v}", at, struct.pack("<f", v)))
        elif kind == gguf.GGUFValueType.STRING:
            for what, part in (("key", f.parts[0]), ("value", f.parts[3])):
                out.append((f"{f.name} {what} length = 2**62", part.ctypes.data - base,
                            struct.pack("<Q", 1 << 62)))
    for t in reader.tensors[:3]:
        name_len, _name, n_dims, dims, ttype, offset = t.field.parts
        out += [(f"{t.name} n_dims = 0", n_dims.ctypes.data - base, struct.pack("<I", 0)),
                (f"{t.name} n_dims = 9", n_dims.ctypes.data - base, struct.pack("<I", 9)),
                (f"{t.name} dim0 = 0", dims.ctypes.data - base, struct.pack("<Q", 0)),
                (f"{t.name} dim0 = 2**40", dims.ctypes.data - base, struct.pack("<Q", 1 << 40)),
                (f"{t.name} type = 99", ttype.ctypes.data - base, struct.pack("<I", 99)),
                (f"{t.name} offset = 2**50", offset.ctypes.data - base, struct.pack("<Q", 1 << 50)),
                (f"{t.name} name length = 0", name_len.ctypes.data - base, struct.pack("<Q", 0))]
    return out


def test_gguf_headers_changed_one_field_at_a_time(world, smollm2_path, tmp_path):
    from hublabio_tools.gguf_float import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny.gguf", smollm2_path)
    original = tiny.read_bytes()
    models = world["models"]
    surprises = []
    with Client(world["daemon"].socket_path, timeout=300) as c:
        for i, (what, at, value) in enumerate(_mutants(tiny)):
            mutant = models / f"mutant{i}.gguf"
            data = bytearray(original)
            data[at:at + len(value)] = value
            mutant.write_bytes(data)
            (models / f"mutant{i}.toml").write_text(
                f'[model]\nname = "mutant{i}"\npath = "{mutant.name}"\n[inference]\n'
                "context_size = 64\nmax_tokens = 1\nthreads = 1\n")
            try:
                c.call("generate", model=f"mutant{i}", prompt="Hi")
                c.call("models.unload", name=f"mutant{i}")
            except Exception as exc:  # noqa: BLE001 - a clear refusal is the expected outcome
                if getattr(exc, "code", "internal") not in KNOWN_CODES:
                    surprises.append(f"{what}: {type(exc).__name__}: {exc}")
            rows = {r["name"]: r for r in c.call("models.list")["models"]}
            assert rows["smol"]["error"] is None  # one bad file never breaks the list
            (models / f"mutant{i}.toml").unlink()
            mutant.unlink()
            still_serving(world)
    assert surprises == []


# ---- the socket protocol ---------------------------------------------------------------------

_HOSTILE = [None, True, -1, 0, 2 ** 63, 1.5e308, "", "\ud800", "x" * 200_000, [], {},
            {"a": [[[[[[]]]]]]}, "../../outside/victim.gguf", "/etc/passwd", [1, "two", None],
            {"max_tokens": "lots"}, "smol\u0000", "\u202e", 3.7]
_BASES = [{"op": "hello"}, {"op": "info"}, {"op": "models.list"}, {"op": "stats"},
          {"op": "generate", "model": "smol", "prompt": "Hi", "options": {"max_tokens": 1}},
          {"op": "models.load", "name": "smol"}, {"op": "cancel", "target": "nothing"},
          {"op": "config.get"}]


def _fuzzed_line(rng: random.Random, i: int) -> bytes:
    msg = {"v": 1, "id": f"f{i}", **rng.choice(_BASES)}
    how = rng.randrange(4)
    if how == 0:  # a field gets a value of the wrong type or shape
        key = rng.choice([k for k in msg if k != "id"] + ["options"])
        msg[key] = rng.choice(_HOSTILE)
    elif how == 1 and isinstance(msg.get("options"), dict):  # an option does
        msg["options"][rng.choice(["max_tokens", "temperature", "top_k", "stop", "seed",
                                   "logit_bias", "context_size"])] = rng.choice(_HOSTILE)
    line = json.dumps(msg).encode()
    if how == 2:  # bytes flipped
        data = bytearray(line)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        line = bytes(data).replace(b"\n", b" ")
    elif how == 3:  # cut short
        line = line[:rng.randrange(1, len(line))]
    return line + b"\n"


def test_fuzzed_request_lines_get_clear_errors(world):
    rng = random.Random(11)
    codes: dict[str, int] = {}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(world["daemon"].socket_path))
        s.settimeout(60)
        f = s.makefile("rb")
        for i in range(300):
            line = _fuzzed_line(rng, i)
            s.sendall(line + protocol.encode(protocol.make_request("hello", f"ok{i}")))
            while True:  # everything up to the sentinel's answer is a well-formed event
                ev = protocol.decode_event(f.readline())
                if ev["type"] == "error":
                    assert ev["code"] in KNOWN_CODES, (line[:300], ev)
                    codes[ev["code"]] = codes.get(ev["code"], 0) + 1
                if ev["id"] == f"ok{i}":
                    assert ev["type"] == "result"
                    break
    print("protocol fuzz, error codes:", codes)
    assert codes.get("protocol", 0) > 50  # the fuzzer did reach the checks
    still_serving(world)


# ---- HTTP ------------------------------------------------------------------------------------

def _fuzzed_http(rng: random.Random) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                       "stream": rng.random() < 0.5})
    if rng.random() < 0.3:
        body = json.dumps({"messages": rng.choice(_HOSTILE), "max_tokens": rng.choice(_HOSTILE),
                           "model": rng.choice(_HOSTILE)})
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: x", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body.encode())]
    how = rng.randrange(6)
    if how == 0:
        head.append(rng.choice([b"Content-Length: 7", b"Transfer-Encoding: chunked",
                                b"Host: y", b"Content-Length: -1", b"X: " + b"a" * 20000]))
    elif how == 1:
        head[3] = b"Content-Length: %d" % rng.choice([0, 1, 10 ** 7, 2 ** 64])
    elif how == 2:
        head[0] = rng.choice([b"POST /v1/chat/completions HTTP/9.9", b"GET / HTTP/1.1",
                              b"POST", b"\x00\xff garbage", b"POST /v1/../../etc HTTP/1.1"])
    raw = b"\r\n".join(head) + b"\r\n\r\n" + body.encode()
    if how == 3:
        raw = raw[:rng.randrange(1, len(raw))]
    elif how == 4:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        raw = bytes(data)
    return raw


def test_fuzzed_http_requests_get_a_status_never_a_hang_or_a_500(world):
    rng = random.Random(7)
    host, port = world["daemon"].http_address
    statuses: dict[int, int] = {}
    for _ in range(120):
        raw = _fuzzed_http(rng)
        with socket.create_connection((host, port), timeout=60) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)  # all there is: an incomplete request must not hang
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 "), (raw[:200], data[:200])
        status = int(data[9:12])
        assert status < 500 or status == 505, (raw[:300], data[:300])  # 505: HTTP/9.9
        statuses[status] = statuses.get(status, 0) + 1
    print("HTTP fuzz, statuses:", statuses)
    assert statuses.get(400, 0) > 10 and statuses.get(200, 0) > 5
    still_serving(world)


# ---- packages: planted journals, killed installs ---------------------------------------------

@pytest.mark.parametrize("override", [
    {"files": ["../outside/victim.txt"]},
    {"remove_old": ["../outside/victim.gguf"]},
    {"staging": "../outside"},
    {"take_over": {"other": ["../outside/victim.txt"]}}])
def test_a_planted_journal_changes_nothing_and_the_daemon_serves(world, override):
    rec = world["models"] / ".packages"
    rec.mkdir(exist_ok=True)
    journal = {"name": "evil", "staging": ".pkg-staging-999999999-x", "files": ["demo.gguf"],
               "record": '[package]\nname = "evil"\nversion = "1"\n', "take_over": {},
               "remove_old": [], **override}
    path = rec / ".journal-evil.json"
    path.write_text(json.dumps(journal))
    try:
        with Client(world["daemon"].socket_path) as c:
            assert [r["name"] for r in c.call("models.list")["models"]] == ["smol"]
        still_serving(world)
        assert path.exists()  # refused, left for the administrator
    finally:
        path.unlink()


# Installs the package in argv[1] into argv[2] and SIGKILLs itself right after its commit
# moved the first file into place (os.replace calls once the journal exists: the journal's own,
# then one per file).
_KILLED_AFTER_ONE_FILE = """
import os, signal, sys
from hublabio import pkg
real, moved = os.replace, []
def replace(a, b):
    real(a, b)
    if pkg.has_journal(sys.argv[2]):
        moved.append(b)
        if len(moved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
pkg.os.replace = replace
pkg.install(sys.argv[1], sys.argv[2])
"""


def _version(i: int, n: int = 4) -> dict[str, bytes]:
    return {f"part{k}.toml": f'[model]\nname = "part{k}"\npath = "v{i}-{k}.gguf"\n'.encode()
            for k in range(n)}


def _versions_seen(world) -> set[str]:
    with Client(world["daemon"].socket_path) as c:
        rows = c.call("models.list")["models"]
    return {Path(r["path"]).name.split("-")[0] for r in rows if r["name"].startswith("part")}


def test_a_pkg_install_killed_mid_commit_is_never_served_half_done(world, tmp_path):
    """The installer is killed (SIGKILL) right after it moved the first file into place: the
    daemon, which is running all along, finishes the install before it answers."""
    models = world["models"]
    pkg.install(make_dir(tmp_path / "v1", name="parts", files=_version(1)), models)
    assert _versions_seen(world) == {"v1"}
    v2 = make_dir(tmp_path / "v2", name="parts", files=_version(2), version="2.0.0")
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_ONE_FILE, str(v2), str(models)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert pkg.has_journal(models)  # killed half-way: one file new, three old
    assert _versions_seen(world) == {"v2"}  # the daemon finished it before answering
    assert not pkg.has_journal(models)
    still_serving(world)
    pkg.remove("parts", models)


# The same install with every os.replace slowed to 30 ms, as with a package of many files; it
# says "journal" once its journal is written, so that the kill lands in the commit.
_SLOW_COMMIT = """
import os, sys, time
from hublabio import pkg
real = os.replace
def replace(a, b):
    real(a, b)
    if str(b).endswith(".journal-parts.json"):
        print("journal", flush=True)
    time.sleep(0.03)
pkg.os.replace = replace
pkg.install(sys.argv[1], sys.argv[2])
"""


def test_pkg_installs_killed_at_random_moments_leave_old_or_new(world, tmp_path):
    """The issue's case: 13 of 20 killed upgrades left a mix of versions that the daemon
    served. Here each upgrade is killed at a random moment of its commit."""
    models = world["models"]
    rng = random.Random(6)
    srcs = [make_dir(tmp_path / f"v{i}", name="parts", files=_version(i), version=f"{i}.0.0")
            for i in (1, 2)]
    pkg.install(srcs[0], models)
    half_done = 0
    for round_ in range(10):
        src = srcs[(round_ + 1) % 2]
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMMIT, str(src), str(models)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "journal\n"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        half_done += pkg.has_journal(models)
        seen = _versions_seen(world)
        assert len(seen) == 1, f"round {round_}: a mix of versions is served: {seen}"
    assert half_done >= 3  # most kills did land between the journal and the end
    still_serving(world)
    pkg.remove("parts", models)


# ---- settings: killed writers, concurrent writers --------------------------------------------

def test_settings_writers_killed_at_random_moments_leave_a_readable_file(world, isolated_state):
    rng = random.Random(3)
    env = dict(os.environ, HUBLAB_STATE_DIR=str(isolated_state))
    writer = ("from hublabio.config import update_settings\n"
              "for i in range(100000): update_settings('inference', 'max_tokens', i % 500 + 1)")
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", writer], env=env)
        time.sleep(rng.uniform(0.3, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with Client(world["daemon"].socket_path) as c:
            value = c.call("config.get")["overrides"]["max_tokens"]
        assert 1 <= value <= 500
    still_serving(world)


def test_concurrent_config_set_over_the_socket_loses_no_update(world):
    keys = ["max_tokens", "top_k", "context_size", "threads_batch"]
    errors = []

    def bump(key):
        try:
            with Client(world["daemon"].socket_path) as c:
                for i in range(12):
                    c.call("config.set", key=key, value=64 + i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with Client(world["daemon"].socket_path) as c:
        overrides = c.call("config.get")["overrides"]
        assert {k: overrides[k] for k in keys} == dict.fromkeys(keys, 75)
        c.call("config.reset")
    still_serving(world)


def test_a_kill_during_the_fuzz_left_no_temp_files_in_the_models_dir(world):
    assert not list(world["models"].glob(".*.tmp"))
    assert not list(world["models"].glob(pkg.STAGING_PREFIX + "*"))
    shutil.rmtree(world["models"] / ".packages", ignore_errors=True)
