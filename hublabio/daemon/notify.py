"""systemd notification (sd_notify) with the standard library only.

systemd passes NOTIFY_SOCKET (a path, or '@name' for an abstract socket) to Type=notify services
and WATCHDOG_USEC when WatchdogSec= is set. Every function is a no-op outside systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket

_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    return value


def notify(*states: str) -> bool:
    """Send 'KEY=value' lines to systemd. Returns False when not under systemd or on failure
    (a lost notification must never take the daemon down)."""
    target = os.environ.get(_ENV)
    if not target or not states:
        return False
    msg = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, _address(target))
        return True
    except OSError:
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is
    configured for this process (WATCHDOG_PID, when set, must be ours)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def watchdog_loop(healthy=lambda: True) -> None:
    """Ping the watchdog at half its timeout while `healthy()` is true (a stuck event loop stops
    pinging, and systemd restarts the service). Returns at once when no watchdog is configured."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
