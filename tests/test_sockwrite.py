"""SocketWriter over a real socket pair: writes never block, order is kept, a reader that
takes nothing is cut off at the cap or the stall limit, and a half-close is not a hang-up."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from hublabio.daemon import sockwrite
from hublabio.daemon.sockwrite import ClientGone, SocketWriter


def _run(coro):
    return asyncio.run(coro)


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def test_writes_from_threads_never_block_and_arrive_in_order():
    async def main():
        ours, theirs = socket.socketpair()
        out = SocketWriter(ours, asyncio.get_running_loop())
        lines = [b"%06d %s\n" % (i, b"x" * 2000) for i in range(600)]  # > the socket buffer

        def produce():
            for line in lines:
                out.write(line)  # returns at once even while nobody reads

        t = threading.Thread(target=produce)
        t.start()
        await asyncio.get_running_loop().run_in_executor(None, t.join, 5)
        assert not t.is_alive()
        reader = asyncio.get_running_loop().run_in_executor(None, _read_all, theirs)
        await out.drain()
        out.close()
        ours.close()
        assert await reader == b"".join(lines)
        theirs.close()

    _run(main())


def test_a_reader_that_leaves_too_much_unread_is_cut_off(monkeypatch):
    monkeypatch.setattr(sockwrite, "MAX_PENDING", 64 << 10)

    async def main():
        ours, theirs = socket.socketpair()
        out = SocketWriter(ours, asyncio.get_running_loop())
        with pytest.raises(ClientGone, match="unread"):
            for _ in range(10_000):
                out.write(b"y" * 1000)
        assert out.hung_up()
        with pytest.raises(ClientGone):
            await out.drain()
        out.close()
        ours.close()
        theirs.close()

    _run(main())


def test_a_reader_that_stalls_is_cut_off(monkeypatch):
    monkeypatch.setattr(sockwrite, "WRITE_STALL_S", 0.3)

    async def main():
        ours, theirs = socket.socketpair()
        out = SocketWriter(ours, asyncio.get_running_loop())
        out.write(b"z" * (2 << 20))  # more than the kernel holds: the rest waits
        with pytest.raises(ClientGone, match="read nothing"):
            await asyncio.wait_for(out.drain(), 10)
        out.close()
        ours.close()
        theirs.close()

    _run(main())


def test_half_close_is_not_a_hang_up_but_close_is():
    async def main():
        ours, theirs = socket.socketpair()
        out = SocketWriter(ours, asyncio.get_running_loop())
        theirs.shutdown(socket.SHUT_WR)
        assert not out.hung_up()
        out.write(b"answer\n")
        assert theirs.recv(100) == b"answer\n"
        theirs.close()
        assert out.hung_up()
        with pytest.raises(ClientGone):
            out.write(b"more\n")
        out.close()
        ours.close()

    _run(main())
