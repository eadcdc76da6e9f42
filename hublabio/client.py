"""The only way into the daemon for the shell and the tests: a blocking Unix-socket client.

    with Client() as c:
        c.call("models.list")                       # -> result data (dict)
        for ev in c.stream("ask", question="Hi"):   # token/info events, then the result
            ...

Errors come back as the matching HublabError subclass (BudgetError with its numbers,
ModelNotFound, BusyError, ...). `Stream.close()` (or leaving `with client.stream(...) as s:`)
cancels the request and drops its remaining events, so the connection stays usable.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from pathlib import Path

from hublabio import paths, protocol
from hublabio.errors import DaemonUnavailable, HublabError, ProtocolError

DEFAULT_TIMEOUT = 300.0  # seconds without any event before giving up (loading a big model)


class Client:
    def __init__(self, socket_path: str | os.PathLike | None = None, timeout: float | None = DEFAULT_TIMEOUT):
        self.socket_path = Path(socket_path or paths.socket_path())
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonUnavailable(
                f"no hublabd listening on {self.socket_path} ({exc.strerror}); start it with "
                "`hublabd` (or `systemctl start hublabd`), or run `hublab`, which starts one "
                "in-process") from None
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None
        self._splitter = protocol.LineSplitter(limit=protocol.MAX_LINE * 4)
        self._inbox: dict[str, collections.deque] = {}
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False

    # ---- low level -----------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        data = protocol.encode(msg)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise DaemonUnavailable(f"lost the connection to {self.socket_path}: "
                                        f"{exc.strerror or exc}") from None

    def _read_into_inbox(self) -> None:
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise DaemonUnavailable(f"no answer from the daemon on {self.socket_path} within "
                                    f"{self.timeout:.0f} s") from None
        except OSError as exc:
            raise DaemonUnavailable(f"lost the connection to {self.socket_path}: "
                                    f"{exc.strerror or exc}") from None
        if not data:
            raise DaemonUnavailable(f"the daemon closed the connection ({self.socket_path}); "
                                    "it may have stopped: see `journalctl -u hublabd`")
        for line in self._splitter.feed(data):
            if isinstance(line, protocol.TooLong):
                raise ProtocolError(f"daemon sent a line of {line.size} bytes, over the limit")
            try:
                ev = protocol.decode_event(line)
            except protocol.VersionMismatch:
                raise
            except ProtocolError:
                # a torn line: bytes lost when Ctrl-C interrupted a read; the next line is whole
                continue
            box = self._inbox.get(ev.get("id"))
            if box is not None:
                box.append(ev)
            elif ev.get("id") is None and ev.get("type") == "error":
                raise protocol.exception_from_event(ev)
            # events of requests nobody waits for (e.g. a cancel's acknowledgement) are dropped

    def _next_event(self, request_id: str) -> dict:
        box = self._inbox.get(request_id)
        if box is None:
            raise ProtocolError(f"request {request_id} is closed")
        while not box:
            with self._read_lock:
                if box:
                    break
                self._read_into_inbox()
        return box.popleft()

    # ---- API -----------------------------------------------------------------------------
    def stream(self, op: str, /, **params) -> "Stream":
        """Send a request and iterate over its events: token/info events, then the result
        event (yielded last). An error event is raised as its HublabError."""
        rid = protocol.new_id()
        self._inbox[rid] = collections.deque()
        try:
            self.send(protocol.make_request(op, rid, **params))
        except BaseException:
            self._inbox.pop(rid, None)
            raise
        return Stream(self, rid)

    def call(self, op: str, /, **params) -> dict:
        """Run an op and return its result data (info/token events are skipped)."""
        for ev in self.stream(op, **params):
            if ev["type"] == "result":
                return ev["data"]
        raise ProtocolError(f"no result for op {op!r}")

    def cancel(self, request_id: str) -> None:
        """Ask the daemon to cancel a request (its stream then ends with finish_reason
        "cancelled", or a Cancelled error when it was still queued)."""
        self.send(protocol.make_request("cancel", None, target=request_id))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Stream:
    """The events of one request, as an iterator: token/info events, then the result event.
    `cancel()` asks the daemon to stop (the stream then ends normally with finish_reason
    "cancelled"); `close()` (also on `with` exit and garbage collection) cancels and drops the
    remaining events at once."""

    def __init__(self, client: Client, request_id: str):
        self.client = client
        self.id = request_id
        self.done = False
        self.result: dict | None = None

    @property
    def request_id(self) -> str:
        return self.id

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> dict:
        if self.done:
            raise StopIteration
        ev = self.client._next_event(self.id)
        if ev["type"] in protocol.TERMINAL:
            self._finish()
            if ev["type"] == "error":
                raise protocol.exception_from_event(ev)
            self.result = ev["data"]
        return ev

    def cancel(self) -> None:
        if not self.done:
            self.client.cancel(self.id)

    def close(self) -> None:
        if self.done:
            return
        self._finish()
        try:
            self.client.cancel(self.id)
        except HublabError:
            pass

    def _finish(self) -> None:
        self.done = True
        self.client._inbox.pop(self.id, None)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self.done and not self.client._closed:
                self.close()
        except Exception:  # noqa: BLE001 - best effort at garbage collection
            pass


def connect_or_start(socket_path: str | os.PathLike | None = None, **daemon_overrides):
    """(Client, handle) for the daemon on `socket_path`; when none listens there, start one in
    this process (hublabio.daemon.server.start_in_thread) and return its handle too (else None).
    `daemon_overrides` are DaemonSettings fields (models_dir, budget_mb, threads, ...)."""
    path = Path(socket_path or paths.socket_path())
    try:
        return Client(path), None
    except DaemonUnavailable:
        pass
    from dataclasses import replace

    from hublabio.config import load_daemon_settings
    from hublabio.daemon.server import start_in_thread

    settings = load_daemon_settings(paths.daemon_config_file())
    overrides = {k: v for k, v in daemon_overrides.items() if v is not None}
    if "models_dir" in overrides:
        overrides["models_dir"] = Path(overrides["models_dir"])
    # this daemon serves the shell's own user: `ai load ~/any/file.gguf` may name any file
    overrides.setdefault("model_paths", "any")
    settings = replace(settings, socket=path, **overrides)
    handle = start_in_thread(settings, path)
    try:
        return Client(handle.socket_path), handle
    except BaseException:
        handle.stop()
        raise
