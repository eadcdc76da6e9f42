"""`hublab --serial` over a pseudo-terminal pair: the shell opens the slave with pyserial, the
test plays the terminal on the master side (raw bytes, CRLF), with the real daemon and model."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
import tty

import pytest

from hublabio import paths


@pytest.fixture
def models_dir(tmp_path, smollm2_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "smollm2-135m"\ntype = "gguf"\npath = "{smollm2_path}"\n'
        f"[inference]\nmax_tokens = 16\ntemperature = 0.0\ncontext_size = 1024\n"
        f"threads = {int(os.environ.get('HUBLAB_TEST_THREADS', '2'))}\n")
    monkeypatch.setenv("HUBLAB_MODELS_DIR", str(models))
    return models


class SerialLine:
    """The far end of the serial line: what a terminal program would send and see."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        self.raw = b""
        self.seen = 0

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 120.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.raw, self.seen)
            if match:
                self.seen = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the line within {timeout} s; "
                                     f"got: {self.raw[self.seen:][-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def console(models_dir):
    line = SerialLine()
    proc = subprocess.Popen([sys.executable, "-m", "hublabio.shell.main",
                             "--serial", os.ttyname(line.slave), "--baud", "115200"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    line.proc = proc
    yield line
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)
    os.close(line.master)
    os.close(line.slave)


def test_serial_console_runs_commands_with_echo_editing_and_crlf(console):
    c = console
    c.expect(rb"HubLab IO shell .*\r\nhublab> ")

    # Typed characters are echoed; DEL erases (echoing "\b \b"); CR ends the line.
    c.send(b"ai lisx\x7ft\r")
    c.expect(rb"ai lisx\x08 \x08t\r\n")
    listing = c.expect(rb"(?s)NAME.*?\(\* = loaded[^)]*\)\r\n").group(0)
    assert b"smollm2-135m" in listing and b"FITS" in listing
    assert b"\n" not in listing.replace(b"\r\n", b"")  # every newline is CRLF
    c.expect(rb"hublab> ")

    # Up arrow recalls the previous line (echoed), Enter runs it again.
    c.send(b"\x1b[A")
    c.expect(rb"ai list")
    c.send(b"\r")
    c.expect(rb"(?s)NAME.*?\(\* = loaded[^)]*\)\r\n")
    c.expect(rb"hublab> ")

    # A question streams an answer; LF alone also ends a line.
    c.send(b"?What is the capital of France?\n")
    answer = c.expect(rb"(?s)AI: (\S.*?)\r\nhublab> ").group(1)
    assert len(answer.split()) >= 3
    assert b"\n" not in answer.replace(b"\r\n", b"")  # CRLF inside the answer too

    # Errors come back on the line too.
    c.send(b"ai load nosuch\r")
    c.expect(rb"Error: [^\r\n]*nosuch[^\r\n]*\r\n")
    c.expect(rb"hublab> ")

    # Ctrl-C at the prompt discards the typed line.
    c.send(b"ai li\x03")
    c.expect(rb"\^C\r\nhublab> ")
    c.send(b"exit\r")
    c.proc.wait(timeout=30)
    assert c.proc.returncode == 0
    assert "+ai list" in paths.history_file().read_text()


def test_serial_ctrl_c_cancels_a_running_answer(console):
    c = console
    c.expect(rb"hublab> ")
    c.send(b"ai config max_tokens 1500\r")
    c.expect(rb"max_tokens = 1500 \(saved\)")
    c.expect(rb"hublab> ")
    c.send(b"?Write a very long story about a dragon and a knight, at least 2000 words.\r")
    c.expect(rb"AI: \S+")
    time.sleep(0.05)
    sent = time.monotonic()
    c.send(b"\x03")
    c.expect(rb"\[cancelled\]\r\n", timeout=15)
    assert time.monotonic() - sent < 15
    c.expect(rb"hublab> ")

    # Still alive, and the daemon is free for the next question.
    c.send(b"ai config max_tokens 8\r")
    c.expect(rb"hublab> ")
    c.send(b"?Hi\r")
    c.expect(rb"AI: \S+")
    c.expect(rb"hublab> ")
    c.send(b"\x04")  # Ctrl-D on an empty line ends the session
    c.proc.wait(timeout=30)
    assert c.proc.returncode == 0
