"""The real `hublab` (a subprocess) against the real daemon it starts in-process, with the real
SmolLM2 model: -c, piped stdin, persisted settings, and an interactive session in a pty."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from hublabio import paths


def write_models_dir(root: Path, model: Path, max_tokens: int = 16) -> Path:
    models = root / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        "[model]\n"
        'name = "smollm2-135m"\n'
        'type = "gguf"\n'
        f'path = "{model}"\n'
        "[inference]\n"
        f"max_tokens = {max_tokens}\n"
        "temperature = 0.0\n"
        "context_size = 1024\n"
        f"threads = {int(os.environ.get('HUBLAB_TEST_THREADS', '2'))}\n")
    return models


@pytest.fixture
def models_dir(tmp_path, smollm2_path, monkeypatch):
    models = write_models_dir(tmp_path, smollm2_path)
    monkeypatch.setenv("HUBLAB_MODELS_DIR", str(models))
    return models


def hublab(*args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hublabio.shell.main", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_one_question_streams_an_answer(models_dir):
    run = hublab("-c", "?What is the capital of France?")
    assert run.returncode == 0, run.stderr
    assert re.search(r"^AI: \S", run.stdout, re.M), run.stdout
    answer = run.stdout.split("AI: ", 1)[1]
    assert len(answer.split()) >= 3, run.stdout  # words from the model, not a placeholder
    assert "Error" not in run.stderr


def test_a_failing_command_exits_non_zero_with_a_clear_message(models_dir):
    run = hublab("-c", "ai load nosuch")
    assert run.returncode == 1
    assert run.stderr.startswith("Error: ")
    assert "nosuch" in run.stderr and "smollm2-135m" in run.stderr  # names what is known
    assert run.stdout == ""

    run = hublab("-c", "ai lod smollm2-135m")
    assert run.returncode == 1
    assert "Did you mean 'ai load'" in run.stderr


def test_piped_stdin_runs_each_line_and_reports_any_failure(models_dir):
    script = ("ai load smollm2-135m\n"
              "ai list\n"
              "# a comment, skipped\n"
              "\n"
              "ai info\n"
              "?What is the capital of France?\n")
    run = hublab(stdin=script)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Model loaded: 135M parameters, Q4_1 quantization" in out
    assert "Context size: 1024 tokens" in out
    assert re.search(r"Memory: \d+\.\d MiB", out)
    listed = [line for line in out.splitlines() if "smollm2-135m" in line and "MiB" in line]
    assert listed and listed[0].startswith("*"), out  # loaded marker
    assert re.search(r"Memory:\s+\d+\.\d MiB used / [\d.]+ [MG]iB budget", out)
    assert "AI: " in out

    # A failure in the middle: the other lines still run, the exit status says it failed.
    run = hublab(stdin="ai list\nai unload nosuch\nai info\n")
    assert run.returncode == 1
    assert "Error: " in run.stderr and "nosuch" in run.stderr
    assert "(* = loaded; FITS:" in run.stdout and "Tokens/sec:" in run.stdout


def test_ai_config_persists_across_a_restart(models_dir, isolated_state):
    run = hublab("-c", "ai config temperature 0.2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("temperature = 0.2 (saved)")
    assert "temperature = 0.2" in (isolated_state / "settings.toml").read_text()

    run = hublab("-c", "ai config")  # a new process, a new daemon
    assert run.returncode == 0, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("temperature"))
    assert "0.2" in line and "(set with ai config)" in line
    max_tokens = next(ln for ln in run.stdout.splitlines() if ln.startswith("max_tokens"))
    assert "16" in max_tokens and "set with" not in max_tokens

    run = hublab("-c", "ai config temperature hot")
    assert run.returncode == 1 and "temperature" in run.stderr


def test_ai_list_reports_a_bad_config_and_lists_the_good_ones(models_dir):
    (models_dir / "broken.toml").write_text('[model]\nname = "broken"\ntype = "gguf"\n'
                                            'path = "x.gguf"\ncolour = "red"\n')
    run = hublab("-c", "ai list")
    assert run.returncode == 0, run.stderr
    assert "smollm2-135m" in run.stdout
    skipped = [ln for ln in run.stdout.splitlines() if ln.strip().startswith("skipped:")]
    assert skipped and "broken.toml" in skipped[0] and "colour" in skipped[0], run.stdout


def test_ai_list_paths_shows_where_each_model_file_is(models_dir, smollm2_path):
    """Issue 14: the docs named ~/models/SmolLM2-...gguf, which does not exist, and no command
    said where the embedded model is."""
    run = hublab("-c", "ai list --paths")
    assert run.returncode == 0, run.stderr
    row = next(ln for ln in run.stdout.splitlines() if "smollm2-135m" in ln)
    assert str(smollm2_path) in row
    assert f"Models directory: {models_dir}" in run.stdout
    assert hublab("-c", "ai list --path").returncode != 0  # no abbreviation, a usage error


def test_benchmark_and_stats(models_dir):
    run = hublab(stdin="ai benchmark -p 16 -n 4\nai stats\n")
    assert run.returncode == 0, run.stderr
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("|")]
    assert rows[0].split("|")[1].strip() == "model"
    pp = next(r for r in rows if "pp16" in r)
    tg = next(r for r in rows if "tg4" in r)
    assert float(pp.split("|")[-2].split()[0]) > 0
    assert float(tg.split("|")[-2].split()[0]) > 0
    assert re.search(r"^requests:\s+\d+", run.stdout, re.M)
    assert "by_op.benchmark:" in run.stdout


def test_models_dir_and_budget_flags_configure_the_daemon_it_starts(tmp_path, smollm2_path):
    models = write_models_dir(tmp_path, smollm2_path)  # no HUBLAB_MODELS_DIR: the flag only
    run = hublab("--models-dir", str(models), "-c", "ai list")
    assert run.returncode == 0, run.stderr
    assert "smollm2-135m" in run.stdout

    row = next(line for line in run.stdout.splitlines() if "smollm2-135m" in line)
    assert row.split()[-1] == "yes", run.stdout  # FITS: the default budget holds it

    run = hublab("--models-dir", str(models), "--budget-mb", "50", "-c", "ai list")
    row = next(line for line in run.stdout.splitlines() if "smollm2-135m" in line)
    assert row.split()[-1] == "no" and "in the 50.0 MiB budget" in run.stdout, run.stdout

    run = hublab("--models-dir", str(models), "--budget-mb", "50", "-c", "ai load smollm2-135m")
    assert run.returncode == 1
    assert re.search(r"^Error: .*needs \d+ MiB, budget 50 MiB", run.stderr), run.stderr


def test_the_shell_uses_a_daemon_that_is_already_running(models_dir, tmp_path):
    from hublabio.client import connect_or_start

    socket_path = tmp_path / "d.sock"
    client, handle = connect_or_start(socket_path, models_dir=models_dir)
    assert handle is not None
    try:
        run = hublab("--socket", str(socket_path), "-c", "ai load smollm2-135m")
        assert run.returncode == 0, run.stderr
        assert "Model loaded:" in run.stdout
        # the model is loaded in *this* daemon, so the shell did not start its own
        models = client.call("models.list")["models"]
        assert [m["loaded"] for m in models if m["name"] == "smollm2-135m"] == [True]
    finally:
        client.close()
        handle.stop()


def test_help_lists_commands_without_needing_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBLAB_MODELS_DIR", str(tmp_path / "empty"))
    run = hublab("-c", "help")
    assert run.returncode == 0, run.stderr
    for name in ("?<question>", "ai list", "ai load", "ai benchmark", "history", "exit"):
        assert name in run.stdout


# ------------------------------------------------------------------ interactive, in a pty

ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-B]|\x1b[=>78]")


class Terminal:
    """The master side of a pty running `hublab` as its controlling terminal."""

    def __init__(self, args, env):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))

        def make_controlling_tty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, preexec_fn=make_controlling_tty)
        os.close(slave)
        self.raw = b""
        self.seen = 0  # index into the cleaned text already consumed by expect()

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                time.sleep(timeout)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text, self.seen)
            if match:
                self.seen = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the terminal within {timeout} s; "
                                     f"got: {self.text[self.seen:][-2000:]!r}")
            self._read(0.1)

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


@pytest.fixture
def terminal(models_dir):
    env = os.environ.copy()
    env.update(TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    term = Terminal([sys.executable, "-m", "hublabio.shell.main"], env)
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.proc.wait()


def test_interactive_session_history_completion_and_ctrl_c(terminal):
    t = terminal
    t.expect(r"hublab>")
    t.send("ai list\r")
    t.expect(r"\n {3}smollm2-135m +gguf")  # on disk, not loaded yet
    t.expect(r"hublab>")

    # Tab completes a command word; model names come from the daemon.
    t.send("ai lo\t")
    t.expect(r"ai load")
    t.send(" smol\t")
    t.expect(r"smollm2-135m")
    t.send("\r")
    t.expect(r"Model loaded: 135M parameters, Q4_1 quantization")
    t.expect(r"hublab>")
    t.send("ai list\r")
    t.expect(r"\n\* +smollm2-135m +gguf")  # now marked loaded
    t.expect(r"hublab>")

    # Ctrl-C at the prompt clears the line being typed.
    t.send("ai li")
    time.sleep(0.3)
    t.send("\x03")
    time.sleep(0.3)
    t.send("ai info\r")
    t.expect(r"Quantization:\s+Q4_1")
    t.expect(r"hublab>")

    # Ctrl-C during a long answer cancels it and keeps the shell.
    t.send("ai config max_tokens 1500\r")
    t.expect(r"max_tokens = 1500 \(saved\)")
    t.expect(r"hublab>")
    t.send("?Write a very long story about a dragon and a knight, at least 2000 words.\r")
    t.expect(r"AI: \S+")
    started = time.monotonic()
    time.sleep(0.05)
    t.send("\x03")
    t.expect(r"\[cancelled\]", timeout=15)
    assert time.monotonic() - started < 15
    t.expect(r"hublab>")
    assert t.proc.poll() is None  # the shell survived

    # The daemon is free again: the next answer is not refused as busy.
    t.send("ai config max_tokens 8\r")
    t.expect(r"hublab>")
    t.send("?Hi\r")
    t.expect(r"AI: \S+")
    t.expect(r"hublab>")

    t.send("history\r")
    t.expect(r"\d+\s+ai list")
    t.expect(r"hublab>")
    t.send("\x04")  # Ctrl-D leaves
    assert t.close() == 0

    history = paths.history_file().read_text()
    assert "+ai list" in history and "+ai load smollm2-135m" in history
    assert "+?Write a very long story" in history
    assert "+ai li\n" not in history  # the line cleared by Ctrl-C was not run or stored


def test_interactive_exit_command(terminal):
    terminal.expect(r"hublab>")
    terminal.send("exit\r")
    assert terminal.close() == 0
