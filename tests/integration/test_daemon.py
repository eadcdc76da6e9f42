"""hublabd end to end: the real SmolLM2 GGUF, a real daemon on a temp Unix socket, the real client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hublabio import protocol
from hublabio.client import Client, connect_or_start
from hublabio.config import DaemonSettings
from hublabio.daemon import notify, sockwrite
from hublabio.daemon.server import start_in_thread
from hublabio.errors import (
    BudgetError,
    BusyError,
    Cancelled,
    ConfigError,
    DaemonUnavailable,
    GGUFError,
    ModelNotFound,
    ProtocolError,
)

MODEL = "smol"
# One llama.cpp thread: on a shared, oversubscribed CI box ggml's spinning thread barrier makes
# two threads tens of times slower than one (measured 0.2 vs 25 tok/s under load 13 on 2 cores).
THREADS = int(os.environ.get("HUBLAB_TEST_THREADS", "1"))


def write_model_config(folder: Path, gguf: Path, *, name: str = MODEL, file: str = "model-config.toml",
                       max_tokens: int = 12, threads: int = THREADS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(f"""
[model]
name = "{name}"
path = "{gguf}"

[inference]
max_tokens = {max_tokens}
temperature = 0.0
context_size = 512
threads = {threads}
system_prompt = "You are a helpful assistant."
""")
    return path


_SHORT_DIRS: list[Path] = []


def short_dir() -> Path:
    """Unix socket paths are limited to 107 bytes: keep them out of pytest's long tmp paths."""
    path = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    _SHORT_DIRS.append(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _remove_short_dirs():
    yield
    while _SHORT_DIRS:
        shutil.rmtree(_SHORT_DIRS.pop(), ignore_errors=True)


def make_daemon(models: Path, **settings):
    sock = short_dir() / "d.sock"
    opts = {"models_dir": models, "idle_ttl_s": 0, "threads": THREADS, "budget_mb": 2048}
    opts.update(settings)
    return start_in_thread(DaemonSettings(**opts), sock)


@contextlib.contextmanager
def api_daemon(models: Path):
    """A daemon over `models` with the HTTP API on loopback; yields its /v1 base URL."""
    handle = make_daemon(models, http="127.0.0.1:0")
    try:
        host, port = handle.http_address
        yield f"http://{host}:{port}/v1"
    finally:
        handle.stop()


def openai_client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def models(smollm2_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_model_config(folder, smollm2_path)
    return folder


@pytest.fixture(scope="module")
def daemon(models):
    handle = make_daemon(models)
    yield handle
    handle.stop()
    assert not handle.socket_path.exists()


@pytest.fixture
def client(daemon):
    with Client(daemon.socket_path, timeout=120) as c:
        yield c


def wait_for(predicate, timeout=30.0, every=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_socket_mode_and_hello(daemon, client, models):
    assert (daemon.socket_path.stat().st_mode & 0o777) == 0o660
    hello = client.call("hello")
    assert hello["protocol"] == protocol.VERSION
    assert hello["models_dir"] == str(models)
    assert hello["budget_mb"] == 2048
    assert {"generate", "ask", "models.load", "models.list", "benchmark"} <= set(hello["ops"])


def test_streamed_answer(client):
    events = list(client.stream("generate", messages=[
        {"role": "user", "content": "What is the capital of France?"}]))
    tokens = [e for e in events if e["type"] == "token"]
    result = events[-1]
    assert result["type"] == "result"
    assert len(tokens) >= 2
    data = result["data"]
    assert data["text"] == "".join(t["text"] for t in tokens)
    assert "Paris" in data["text"]
    assert 0 < data["completion_tokens"] <= 12
    assert data["finish_reason"] in ("stop", "length")
    assert all(t["logprob"] is None or t["logprob"] <= 0 for t in tokens)
    assert data["model"] == MODEL and data["prompt_tokens"] > 5


def test_ask_uses_current_model(client):
    data = client.call("ask", question="Say hello.")
    assert isinstance(data.get("text"), str) and data["text"].strip()


def test_list_load_info_unload(client):
    listed = client.call("models.list")
    row = next(m for m in listed["models"] if m["name"] == MODEL)
    assert row["quantization"] == "Q4_1" and row["parameters"] == "135M"
    assert row["missing"] is None and row["size_mb"] > 50
    loaded = client.call("models.load", name=MODEL)
    assert loaded["parameters_human"] == "135M" and loaded["quantization"] == "Q4_1"
    assert loaded["context_size"] == 512 and loaded["memory_mb"] > 50
    info = client.call("info")
    assert info["model"] == MODEL and info["loaded"] is True
    assert 0 < info["used_mb"] <= info["budget_mb"]
    assert client.call("models.unload", name=MODEL)["unloaded"] == [MODEL]
    assert client.call("info")["loaded"] is False
    with pytest.raises(ModelNotFound, match="not loaded"):
        client.call("models.unload", name=MODEL)
    with pytest.raises(ModelNotFound, match="known: smol"):
        client.call("models.load", name="nope")


def test_cancel_mid_generation(client):
    stream = client.stream("generate", prompt="Once upon a time", options={"max_tokens": 300})
    got = 0
    for ev in stream:
        if ev["type"] == "token":
            got += 1
            if got == 3:
                stream.cancel()
    assert stream.result["finish_reason"] == "cancelled"
    assert stream.result["completion_tokens"] < 300
    # the connection is still good
    assert client.call("hello")["protocol"] == protocol.VERSION


def test_client_disconnect_cancels(daemon, client):
    before = client.call("stats")["cancelled"]
    gone = Client(daemon.socket_path)
    stream = gone.stream("generate", prompt="The history of Rome", options={"max_tokens": 400})
    assert next(e for e in stream if e["type"] == "token")
    gone._sock.close()  # vanish without a word
    stats = wait_for(lambda: (s := client.call("stats"))["cancelled"] > before and s)
    assert stats["completion_tokens"] > 0


def test_concurrent_clients(daemon):
    results, errors = [], []

    def one(i):
        try:
            with Client(daemon.socket_path, timeout=120) as c:
                results.append(c.call("generate", prompt=f"Count: {i},",
                                      options={"max_tokens": 6}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    with Client(daemon.socket_path) as c:  # light ops are answered while generations run
        assert c.call("stats")["budget_mb"] == 2048
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == 3 and all(r["completion_tokens"] >= 1 for r in results)


def test_malformed_lines_keep_the_connection(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.socket_path))
        s.sendall(b"{oops\n" + b'{"v": 9, "id": "a", "op": "hello"}\n'
                  + b"x" * (protocol.MAX_LINE + 10) + b"\n" + b'{"v": 1, "id": "b", "op": "hello"}\n')
        buf = b""
        while buf.count(b"\n") < 4:
            buf += s.recv(65536)
    events = [protocol.decode_event(line) for line in buf.splitlines()]
    assert [e["type"] for e in events] == ["error", "error", "error", "result"]
    assert "not valid JSON" in events[0]["message"] and events[0]["id"] is None
    assert "version mismatch" in events[1]["message"] and events[1]["id"] == "a"
    assert "byte limit" in events[2]["message"]
    assert events[3]["id"] == "b"


def test_bad_params_name_the_parameter(client):
    with pytest.raises(ProtocolError, match="unknown parameter 'colour'"):
        client.call("generate", prompt="x", colour="red")
    with pytest.raises(ProtocolError, match="options.temperature"):
        client.call("generate", prompt="x", options={"temperature": 9})
    with pytest.raises(ProtocolError, match="exactly one"):
        client.call("generate")


def test_config_set_persists_and_applies(client, isolated_state):
    with pytest.raises(ConfigError, match="top_k"):
        client.call("config.set", key="top_k", value="-3")
    with pytest.raises(ConfigError, match="unknown setting"):
        client.call("config.set", key="colour", value="1")
    out = client.call("config.set", key="max_tokens", value="3")
    assert out["value"] == 3
    assert "max_tokens = 3" in (isolated_state / "settings.toml").read_text()
    assert client.call("config.get")["settings"]["max_tokens"] == 3
    data = client.call("generate", prompt="One, two, three, four, five, six")
    assert data["completion_tokens"] <= 3
    assert "reloads" in client.call("config.set", key="context_size", value=256)["note"]
    client.call("generate", prompt="Hi")  # the model reloads lazily at the new context
    assert [r["n_ctx"] for r in client.call("info")["resident"]] == [256]


def test_benchmark(client):
    data = client.call("benchmark", pp=16, tg=4)
    assert data["pp"] == 16 and data["tg"] == 4
    assert data["pp_tps"] > 0 and data["tg_tps"] > 0 and data["model"] == MODEL


def one_at_a_time() -> None:
    """Generations queue behind the running one (batch_mode off), as the queue tests need."""
    from hublabio.config import update_settings

    update_settings("inference", "batch_mode", "off")


def test_busy_queue_answers_at_once(models):
    one_at_a_time()
    with make_daemon(models, queue_size=1) as d, Client(d.socket_path, timeout=120) as a, \
            Client(d.socket_path, timeout=120) as b, Client(d.socket_path, timeout=120) as c:
        running = a.stream("generate", prompt="A long story:", options={"max_tokens": 400})
        assert next(e for e in running if e["type"] == "token")
        waiting = b.stream("generate", prompt="Hi", options={"max_tokens": 2})
        wait_for(lambda: d.server.dispatcher.waiting == 1)
        t0 = time.monotonic()
        with pytest.raises(BusyError, match="queue_size=1"):
            c.call("generate", prompt="Hi", options={"max_tokens": 2})
        assert time.monotonic() - t0 < 2.0
        assert c.call("stats")["busy"] == 1  # light ops still answered
        running.cancel()
        assert [e for e in running][-1]["data"]["finish_reason"] == "cancelled"
        assert list(waiting)[-1]["data"]["completion_tokens"] >= 1


def test_cancel_while_queued(models):
    one_at_a_time()
    with make_daemon(models) as d, Client(d.socket_path, timeout=120) as a, \
            Client(d.socket_path, timeout=120) as b:
        running = a.stream("generate", prompt="A long story:", options={"max_tokens": 400})
        assert next(e for e in running if e["type"] == "token")
        queued = b.stream("generate", prompt="Hi")
        wait_for(lambda: d.server.dispatcher.waiting == 1)
        queued.cancel()
        with pytest.raises(Cancelled, match="waiting in the queue"):
            list(queued)
        running.close()


def test_budget_refusal_has_numbers(models):
    with make_daemon(models, budget_mb=20) as d, Client(d.socket_path, timeout=120) as c:
        with pytest.raises(BudgetError) as ei:
            c.call("models.load", name=MODEL)
        err = ei.value
        assert err.budget_mb == 20 and err.needed_mb > 20 and err.in_use_mb == 0
        assert "20" in str(err)
        with pytest.raises(BudgetError):
            c.call("generate", prompt="hi")
        assert c.call("hello")["budget_mb"] == 20  # still alive


def test_corrupt_gguf_is_an_error_event(models, smollm2_path, tmp_path):
    folder = tmp_path / "m"
    write_model_config(folder, smollm2_path)
    truncated = folder / "truncated.gguf"
    truncated.write_bytes(smollm2_path.read_bytes()[:4096])
    garbage = folder / "garbage.gguf"
    garbage.write_bytes(os.urandom(50_000))
    write_model_config(folder, truncated, name="broken", file="broken.toml")
    with make_daemon(folder) as d, Client(d.socket_path, timeout=120) as c:
        with pytest.raises(GGUFError, match="truncated.gguf"):
            c.call("models.load", name="broken")
        with pytest.raises(GGUFError, match="garbage.gguf"):
            c.call("models.load", path=str(garbage))
        with pytest.raises(GGUFError):
            c.call("generate", model="broken", prompt="hi")
        row = next(m for m in c.call("models.list")["models"] if m["name"] == "broken")
        assert row["error"] and "truncated.gguf" in row["error"]
        assert c.call("generate", prompt="Hello", options={"max_tokens": 2})["completion_tokens"] >= 1


def test_bad_toml_is_reported_and_the_rest_load(smollm2_path, tmp_path):
    folder = tmp_path / "m"
    write_model_config(folder, smollm2_path)
    (folder / "bad.toml").write_text('[model]\nname = "bad"\npath = "x.gguf"\ncolour = "red"\n')
    with make_daemon(folder) as d, Client(d.socket_path) as c:
        listed = c.call("models.list")
        assert [m["name"] for m in listed["models"]] == [MODEL]
        (err,) = listed["errors"]
        assert err["path"].endswith("bad.toml") and "colour" in err["key"]
        # a package installed later is seen without a restart (mtime check)
        write_model_config(folder, smollm2_path, name="second", file="second.toml")
        assert [m["name"] for m in c.call("models.list")["models"]] == [MODEL, "second"]
        (folder / "bad.toml").unlink()
        assert c.call("models.list")["errors"] == []


def test_missing_model_file_is_flagged(tmp_path):
    folder = tmp_path / "m"
    write_model_config(folder, tmp_path / "nowhere.gguf")
    with make_daemon(folder) as d, Client(d.socket_path) as c:
        (row,) = c.call("models.list")["models"]
        assert "not found" in row["missing"]
        with pytest.raises(ModelNotFound, match="nowhere.gguf"):
            c.call("ask", question="hi")


def test_second_daemon_on_same_socket_is_refused(daemon, models):
    with pytest.raises(DaemonUnavailable, match="already listening"):
        start_in_thread(DaemonSettings(models_dir=models, budget_mb=100), daemon.socket_path)
    assert Client(daemon.socket_path).call("hello")  # the first one is untouched


def test_connect_or_start(models, monkeypatch):
    sock = short_dir() / "auto.sock"
    with pytest.raises(DaemonUnavailable, match="no hublabd listening"):
        Client(sock)
    c, handle = connect_or_start(sock, models_dir=models, budget_mb=1000, threads=THREADS)
    try:
        assert handle is not None and c.call("hello")["budget_mb"] == 1000
        c2, h2 = connect_or_start(sock)  # now one listens: no second daemon
        assert h2 is None and c2.call("hello")
        c2.close()
    finally:
        c.close()
        handle.stop()
    assert not sock.exists()


# ---- systemd notify and the real process ------------------------------------------------------

def _recv_all(sock: socket.socket, until: str, timeout: float) -> list[str]:
    msgs: list[str] = []
    sock.settimeout(0.2)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msgs.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if any(until in m for m in msgs):
            break
    return msgs


def test_notify_abstract_socket_and_watchdog(monkeypatch):
    import asyncio

    name = f"hublab-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert notify.ready("up")
        assert notify.watchdog_interval() == pytest.approx(0.05)

        async def briefly():
            task = asyncio.ensure_future(notify.watchdog_loop())
            await asyncio.sleep(0.22)
            task.cancel()

        asyncio.run(briefly())
        msgs = _recv_all(s, "never", 0.5)
    assert msgs[0].startswith("READY=1\nSTATUS=up")
    assert sum(m == "WATCHDOG=1" for m in msgs) >= 3
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None  # the watchdog is another process's
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.ready() is False


def test_sigterm_subprocess_clean_exit(models, tmp_path):
    base = short_dir()
    sock, notify_path = base / "d.sock", base / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify_path))
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env.update(NOTIFY_SOCKET=str(notify_path), HUBLAB_STATE_DIR=str(tmp_path),
                   WATCHDOG_USEC="400000")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hublabio.daemon.main", "--models-dir", str(models),
             "--socket", str(sock), "--budget-mb", "900", "--threads", str(THREADS)],
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            msgs = _recv_all(ns, "READY=1", 60)
            assert any(m.startswith("READY=1") for m in msgs), msgs
            assert (sock.stat().st_mode & 0o777) == 0o660
            msgs = _recv_all(ns, "WATCHDOG=1", 5)
            assert "WATCHDOG=1" in msgs
            with Client(sock, timeout=120) as c:
                assert c.call("hello")["budget_mb"] == 900
                running = c.stream("generate", prompt="A long story:", options={"max_tokens": 400})
                assert next(e for e in running if e["type"] == "token")
                proc.send_signal(signal.SIGTERM)  # mid-answer: the answer is cancelled, not lost
                assert [e for e in running][-1]["data"]["finish_reason"] == "cancelled"
            assert proc.wait(30) == 0
            msgs = _recv_all(ns, "STOPPING=1", 2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = proc.stderr.read()
    assert any("STOPPING=1" in m for m in msgs)
    assert not sock.exists()
    assert "received SIGTERM" in stderr and "Traceback" not in stderr


def test_daemon_cli_reports_bad_config(tmp_path):
    bad = tmp_path / "hublab.toml"
    bad.write_text("[daemon]\nqueue_sise = 3\n")
    out = subprocess.run([sys.executable, "-m", "hublabio.daemon.main", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "hublab.toml" in out.stderr and "queue_sise" in out.stderr
    help_ = subprocess.run([sys.executable, "-m", "hublabio.daemon.main", "--help"],
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--budget-mb" in help_.stdout and "SIGTERM" in help_.stdout


def test_slow_reader_gets_every_event_in_order(models):
    """Events written from the worker thread wait for a full socket buffer instead of failing,
    and the loop's own replies (here a hello) still get through without mixing lines."""
    def _flood(svc, req, n: int):
        for i in range(n):
            yield protocol.info(f"{i:06d}" + "x" * 8000)
        return {"n": n}

    with make_daemon(models) as d, Client(d.socket_path, timeout=60) as c:
        d.service.ops.add("test.flood", _flood)
        flood = c.stream("test.flood", n=300)  # 2.4 MB: far more than a socket buffer
        hello = c.stream("hello")
        time.sleep(1.0)  # read nothing meanwhile
        infos = [e["text"][:6] for e in flood if e["type"] == "info"]
        assert infos == [f"{i:06d}" for i in range(300)]
        assert flood.result == {"n": 300}
        assert list(hello)[-1]["data"]["protocol"] == protocol.VERSION


def test_load_by_path_then_generate_by_its_name(models, smollm2_path):
    with make_daemon(models, model_paths="any") as d, Client(d.socket_path, timeout=120) as c:
        data = c.call("models.load", path=str(smollm2_path))
        assert data["name"] == smollm2_path.stem and data["quantization"] == "Q4_1"
        assert c.call("info")["model"] == smollm2_path.stem  # the current model now
        out = c.call("generate", model=smollm2_path.stem, prompt="Hi", options={"max_tokens": 2})
        assert out["model"] == smollm2_path.stem and out["completion_tokens"] >= 1
        with pytest.raises(ModelNotFound, match="no such file"):
            c.call("models.load", path="/nowhere/x.gguf")


def test_idle_model_is_unloaded(models):
    with make_daemon(models, idle_ttl_s=0.3) as d, Client(d.socket_path, timeout=120) as c:
        c.call("models.load", name=MODEL)
        assert c.call("info")["loaded"]
        wait_for(lambda: not c.call("info")["loaded"], timeout=20)
        assert c.call("stats")["used_mb"] == 0


def test_systemd_unit():
    import configparser

    unit_path = Path(__file__).resolve().parents[2] / "systemd" / "hublabd.service"
    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str
    unit.read_string(unit_path.read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert int(svc["WatchdogSec"]) == 30 and svc["NotifyAccess"] == "main"
    assert svc["User"] == svc["Group"] == "hublab"
    runtime = svc["RuntimeDirectory"]
    assert f"--socket /run/{runtime}/hublabd.sock" in svc["ExecStart"]
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze:  # only the missing ExecStart binary (not installed here) may be reported
        out = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True, text=True)
        problems = [ln for ln in (out.stdout + out.stderr).splitlines()
                    if ln.strip() and "is not executable" not in ln]
        assert not problems, problems


def test_client_that_leaves_too_much_unread_is_cut_off(models):
    """A client that never reads cannot hold the queue: once it leaves more than MAX_PENDING
    bytes unread its connection is cut and its request cancelled; the next request runs."""
    seen = {}

    def _endless(svc, req):
        n = 0
        while not req.cancel.is_set():
            n += 1
            yield protocol.info("y" * 8000)
        seen["stopped_after"] = n
        return {"n": n}

    with make_daemon(models) as d, Client(d.socket_path, timeout=120) as reader:
        d.service.ops.add("test.endless", _endless, queued=True)
        stuck = Client(d.socket_path)
        pending = stuck.stream("test.endless")  # and never read it
        wait_for(lambda: "stopped_after" in seen)
        assert seen["stopped_after"] * 8000 > sockwrite.MAX_PENDING  # cut off, not before
        out = reader.call("generate", prompt="Hi", options={"max_tokens": 2})
        assert out["completion_tokens"] >= 1
        assert not pending.done
        stuck.close()


def test_client_that_reads_nothing_for_the_stall_limit_is_cut_off(models, monkeypatch):
    monkeypatch.setattr(sockwrite, "WRITE_STALL_S", 1.0)
    seen = {}

    def _trickle(svc, req):
        yield protocol.info("z" * 600_000)  # more than the socket buffer holds
        t0 = time.monotonic()
        while not req.cancel.is_set() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        seen["cancelled"] = req.cancel.is_set()
        return {}

    with make_daemon(models) as d:
        d.service.ops.add("test.trickle", _trickle, queued=True)
        stuck = Client(d.socket_path)
        pending = stuck.stream("test.trickle")  # and never read it
        wait_for(lambda: "cancelled" in seen, timeout=20)
        assert seen["cancelled"] and not pending.done
        stuck.close()


def test_a_client_that_does_not_read_stalls_no_other_client(models):
    """Issue 11: 40 big light answers left unread by one client used to hold every light-op
    worker for WRITE_STALL_S (30 s): hello, stats and /health stalled for everybody."""
    def _big(svc, req):
        return {"blob": "b" * 400_000}

    with make_daemon(models) as d, Client(d.socket_path, timeout=60) as other:
        d.service.ops.add("test.big", _big)
        stuck = Client(d.socket_path)
        unread = [stuck.stream("test.big") for _ in range(40)]  # 16 MB it never reads
        time.sleep(0.5)
        t0 = time.monotonic()
        assert other.call("hello")["protocol"] == protocol.VERSION
        assert other.call("stats")["uptime_s"] >= 0
        assert time.monotonic() - t0 < 5.0
        assert not any(s.done for s in unread)
        stuck.close()


def test_a_half_closed_connection_still_gets_its_answer(models):
    """A client that sends its request and shuts down its sending side (`nc -N`, or a script's
    shutdown(SHUT_WR)) gets the whole answer; before, EOF cancelled it."""
    with make_daemon(models) as d, socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.socket_path))
        s.sendall(protocol.encode(protocol.make_request(
            "generate", "half", prompt="Hi", options={"max_tokens": 3})))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(60)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        events = [json.loads(line) for line in data.splitlines()]
        assert events[-1]["type"] == "result", events[-1]
        assert events[-1]["data"]["completion_tokens"] >= 1


def test_client_skips_a_torn_line_but_not_a_version_mismatch():
    """The client's side of framing, against a scripted peer on a real Unix socket."""
    sock_path = short_dir() / "peer.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    replies = []

    def peer():
        conn, _ = server.accept()
        with conn:
            for reply in replies:
                req = protocol.decode_request(conn.recv(65536).splitlines()[0])
                conn.sendall(reply(req.id))

    replies.append(lambda rid: b'"type":"token","text":"lost"}\n' + protocol.encode(
        protocol.token("ok", -0.1, rid)) + protocol.encode(protocol.result({"x": 1}, rid)))
    replies.append(lambda rid: b'{"v": 2, "id": "%s", "type": "result", "data": {}}\n' % rid.encode())
    t = threading.Thread(target=peer, daemon=True)
    t.start()
    with Client(sock_path, timeout=10) as c:
        events = list(c.stream("anything"))
        assert [e["type"] for e in events] == ["token", "result"] and events[0]["text"] == "ok"
        with pytest.raises(protocol.VersionMismatch, match="v=2"):
            c.call("anything")
    t.join(5)
    server.close()


def test_clients_name_paths_only_inside_the_models_dir(models, smollm2_path, tmp_path):
    (models / "linked.gguf").symlink_to(smollm2_path)  # points outside: refused too
    with make_daemon(models) as d, Client(d.socket_path, timeout=120) as c:
        for path in ("/etc/passwd", "/nowhere/x.gguf", str(smollm2_path), "../x.gguf",
                     str(models / "linked.gguf")):
            with pytest.raises(ModelNotFound) as err:
                c.call("models.load", path=path)
            msg = str(err.value)
            assert "inside the models directory" in msg
            # nothing about the file itself: not its first bytes, size or existence
            assert "b'" not in msg and "MiB" not in msg and "no such file" not in msg
            with pytest.raises(ModelNotFound, match="inside the models directory"):
                c.call("generate", model=path, prompt="Hi")
    (models / "linked.gguf").unlink()
    with make_daemon(models, model_paths="off") as d, Client(d.socket_path, timeout=120) as c:
        with pytest.raises(ModelNotFound, match="naming models by path is off"):
            c.call("models.load", path=str(models / "x.gguf"))


def test_hostile_json_lines_get_an_error_and_the_connection_stays(daemon):
    """Issue 11: very deep JSON or a 5000-digit number dropped the connection with no answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.socket_path))
        s.settimeout(30)
        f = s.makefile("rb")
        for bad in ('{"v":1,"id":"d","op":"hello","x":' + "[" * 100_000 + "]" * 100_000 + "}",
                    '{"v":1,"id":"n","op":"generate","options":{"seed":' + "9" * 5000 + "}}"):
            s.sendall(bad.encode() + b"\n")
            ev = json.loads(f.readline())
            assert ev["type"] == "error" and ev["code"] == "protocol", ev
            assert "nested deeper" in ev["message"] or "5000 characters" in ev["message"]
        s.sendall(protocol.encode(protocol.make_request("hello", "ok")))
        assert json.loads(f.readline())["data"]["protocol"] == protocol.VERSION
