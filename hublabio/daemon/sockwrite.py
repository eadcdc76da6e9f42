"""Writes to a client's socket that never block the writer.

Every op thread and the event loop write a client's events through one `SocketWriter`. What the
socket takes at once goes out at once (a token reaches the client without waking the event
loop); the rest waits in this connection's own buffer, which the event loop sends as the client
reads. So a client that does not read holds back only its own stream, never another client's,
never the llama.cpp thread, never a worker thread. It is cut off (the socket shut down, which
cancels its requests) once it leaves more than MAX_PENDING bytes unread or reads nothing for
WRITE_STALL_S while something waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time

MAX_PENDING = 4 << 20  # bytes a client may leave unread before it is cut off
WRITE_STALL_S = 30.0   # seconds a client may read nothing while output waits for it
_CHECK_EVERY_S = 1.0


class ClientGone(ConnectionResetError):
    """The client disconnected or was cut off; the message says which."""


class SocketWriter:
    """Non-blocking, thread-safe writes to one connected socket (see the module doc). The
    socket is a duplicate of the transport's: the event loop keeps reading the original."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._progress_at = 0.0
        self._watching = False  # the loop is waiting for room (loop thread only)
        self._waiters: list[asyncio.Future] = []  # drain() callers (loop thread only)
        self.gone: str | None = None  # why writing stopped, once it has

    # ---- any thread ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send `data` or queue what the socket cannot take now. Raises ClientGone."""
        with self._lock:
            if self.gone:
                raise ClientGone(self.gone)
            if self._pending:
                self._pending += data
                if len(self._pending) > MAX_PENDING:
                    self._cut_locked(f"client left more than {MAX_PENDING >> 20} MiB of output "
                                     "unread")
                    raise ClientGone(self.gone)
                return
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._cut_locked(f"client disconnected ({exc.strerror or exc})")
                raise ClientGone(self.gone) from None
            if sent == len(data):
                return
            self._pending += memoryview(data)[sent:]
            self._progress_at = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(self._watch)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                self._cut_locked("the daemon is shutting down")
                raise ClientGone(self.gone) from None

    def hung_up(self) -> bool:
        """Has the connection been closed in both directions (the peer closed its socket, or it
        was cut off)? A peer that only shut down its writing side has not hung up."""
        if self.gone:
            return True
        try:
            p = select.poll()
            p.register(self._sock, select.POLLHUP | select.POLLERR)
            return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0))
        except (OSError, ValueError):
            return True

    def _cut_locked(self, reason: str) -> None:
        self.gone = reason
        self._pending.clear()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF: the requests cancel
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._settle)

    # ---- event loop thread ---------------------------------------------------------------
    def _watch(self) -> None:
        if self._watching or self.gone:
            return
        self._watching = True
        self._loop.add_writer(self._sock.fileno(), self._on_room)
        self._loop.call_later(_CHECK_EVERY_S, self._check_stall)

    def _on_room(self) -> None:
        with self._lock:
            if self.gone:
                return
            try:
                sent = self._sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self._cut_locked(f"client disconnected ({exc.strerror or exc})")
                return
            if sent:
                del self._pending[:sent]
                self._progress_at = time.monotonic()
            if self._pending:
                return
        self._settle()

    def _check_stall(self) -> None:
        with self._lock:
            if self.gone or not self._pending:
                return
            if time.monotonic() - self._progress_at > WRITE_STALL_S:
                self._cut_locked(f"client read nothing for {WRITE_STALL_S:.0f} s")
                return
        self._loop.call_later(_CHECK_EVERY_S, self._check_stall)

    def _settle(self) -> None:
        """Nothing is waiting any more (all sent, or cut off): stop watching, wake drain()."""
        if self._watching:
            self._watching = False
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(self._sock.fileno())
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        """Wait until everything written so far has gone out. Raises ClientGone."""
        while True:
            with self._lock:
                if self.gone:
                    raise ClientGone(self.gone)
                if not self._pending:
                    return
                fut = self._loop.create_future()
                self._waiters.append(fut)
            await fut

    def close(self) -> None:
        """Close the duplicate socket (the transport's stays open). Loop thread."""
        with self._lock:
            if not self.gone:
                self.gone = "closed"
            self._pending.clear()
        self._settle()
        self._sock.close()
