"""The shell over a serial line (a Pi's UART or USB gadget port) with pyserial.

Same prompt and commands as the terminal shell. The far end is a dumb terminal (minicom,
screen, picocom), so this module does the line editing itself: echo, backspace/DEL, Ctrl-U
(erase line), Ctrl-C (discard the line; during an answer: cancel it), Ctrl-D on an empty line
(leave), CR, LF or CRLF end a line, up/down arrows recall history. Output uses CRLF.

A reader thread owns the port's input: it queues bytes for the line editor and, while a
command runs, turns Ctrl-C into a KeyboardInterrupt in the main thread (which cancels the
answer exactly as Ctrl-C does in a terminal).
"""

from __future__ import annotations

import codecs
import queue
import signal
import threading
from pathlib import Path

from hublabio.shell.commands import (
    ExitShell,
    Output,
    ShellContext,
    execute,
    read_history_file,
)

PROMPT = "hublab> "
CTRL_C, CTRL_D, CTRL_U, BS, DEL, ESC = "\x03", "\x04", "\x15", "\x08", "\x7f", "\x1b"


class SerialConsole:
    def __init__(self, port, ctx: ShellContext, history_path: Path | None = None):
        self.port = port
        self.ctx = ctx
        self.history_path = history_path
        self.history: list[str] = read_history_file(history_path) if history_path else []
        self.ctx.history = lambda: list(self.history)
        self.ctx.out = Output(self._send, newline="\r\n")
        self._input: queue.Queue[str | None] = queue.Queue()
        self._busy = threading.Event()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    # ------------------------------------------------------------------ port I/O
    def _send(self, text: str) -> None:
        self.port.write(text.encode("utf-8"))
        self.port.flush()

    def _reader(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while not self._stop.is_set():
                data = self.port.read(max(1, getattr(self.port, "in_waiting", 0) or 1))
                if not data:
                    continue
                for ch in decoder.decode(data):
                    if ch == CTRL_C and self._busy.is_set():
                        signal.pthread_kill(self._main, signal.SIGINT)
                    else:
                        self._input.put(ch)
        except Exception:
            pass  # port closed or gone: end of input
        finally:
            self._input.put(None)

    # ------------------------------------------------------------------ line editor
    def read_line(self) -> str | None:
        """One edited line, or None at end of input (Ctrl-D on an empty line, port closed)."""
        buf: list[str] = []
        pos_in_history = len(self.history)
        self._send(PROMPT)
        last_cr = False
        while True:
            ch = self._input.get()
            if ch is None:
                return None
            if ch == "\n" and last_cr:  # CRLF: the CR already ended the line
                last_cr = False
                continue
            last_cr = ch == "\r"
            if ch in "\r\n":
                self._send("\r\n")
                return "".join(buf)
            if ch in (BS, DEL):
                if buf:
                    buf.pop()
                    self._send("\b \b")
            elif ch == CTRL_C:
                self._send("^C\r\n" + PROMPT)
                buf.clear()
            elif ch == CTRL_D:
                if not buf:
                    self._send("\r\n")
                    return None
            elif ch == CTRL_U:
                self._send("\b \b" * len(buf))
                buf.clear()
            elif ch == ESC:
                seq = self._escape()
                if seq in ("[A", "[B") and self.history:
                    step = -1 if seq == "[A" else 1
                    pos_in_history = max(0, min(len(self.history), pos_in_history + step))
                    text = self.history[pos_in_history] if pos_in_history < len(self.history) else ""
                    self._send("\b \b" * len(buf) + text)
                    buf = list(text)
            elif ch >= " ":
                buf.append(ch)
                self._send(ch)

    def _escape(self) -> str:
        """Read the rest of an ANSI escape sequence (ESC [ A etc.)."""
        seq = ""
        while True:
            try:
                ch = self._input.get(timeout=0.05)
            except queue.Empty:
                return seq
            if ch is None:
                self._input.put(None)
                return seq
            seq += ch
            if (len(seq) >= 2 and seq[0] == "[" and ch.isalpha()) or seq[0] != "[" or ch == "~":
                return seq

    def _remember(self, line: str) -> None:
        if not line.strip() or (self.history and self.history[-1] == line):
            return
        self.history.append(line)
        if self.history_path is not None:
            from prompt_toolkit.history import FileHistory

            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            FileHistory(str(self.history_path)).store_string(line)

    # ------------------------------------------------------------------ loop
    def run(self, banner: str | None = None) -> int:
        if threading.current_thread() is threading.main_thread():
            # Started from a service or a background job, SIGINT may be ignored; Ctrl-C on the
            # line relies on it to interrupt a running command.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        reader = threading.Thread(target=self._reader, name="serial-reader", daemon=True)
        reader.start()
        if banner:
            self.ctx.out.line(banner)
        try:
            while True:
                try:
                    line = self.read_line()
                except KeyboardInterrupt:
                    continue
                if line is None:
                    break
                self._remember(line)
                self._busy.set()
                try:
                    execute(self.ctx, line)
                except ExitShell:
                    break
                except KeyboardInterrupt:
                    # Ctrl-C landed just before the command started or after it ended.
                    self.ctx.out.line("[interrupted]")
                finally:
                    self._busy.clear()
        finally:
            self._stop.set()
        return 0


def open_port(device: str, baud: int):
    """Open a serial device (or a pyserial URL such as `loop://`) for the console."""
    import serial

    try:
        return serial.serial_for_url(device, baudrate=baud, timeout=0.1)
    except (serial.SerialException, ValueError) as exc:
        from hublabio.errors import HublabError

        raise HublabError(f"cannot open serial port {device} at {baud} baud: {exc}") from None
