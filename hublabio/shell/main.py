"""hublab: the HubLab IO shell. Ask the local model questions and manage models.

  hublab                                 interactive shell (prompt `hublab> `) on a terminal
  hublab -c "ai list"                    run one command; exit status 1 if it failed
  printf 'ai load smollm2-135m\\n?Hi\\n' | hublab
                                         stdin not a terminal: each line is one command;
                                         exit status 1 if any command failed
  hublab --serial /dev/ttyS0 --baud 115200
                                         the same shell on a serial console (UART, USB gadget)

Commands: ?<question>, ai list|load|unload|info|config|stats|benchmark, help, history, exit
(`help` in the shell lists them all, including add-ons such as `moe` and `pkg`).

If no daemon (hublabd) listens on the socket, hublab starts one inside this process with
--models-dir / --budget-mb, so `hublab` alone works right after installation.
Environment: HUBLAB_MODELS_DIR, HUBLAB_STATE_DIR (history, settings, socket, and hublabd.log,
the log of a daemon started by the shell), HUBLAB_SOCKET.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from hublabio import __version__, paths
from hublabio.errors import HublabError
from hublabio.shell import render
from hublabio.shell.commands import (
    ExitShell,
    Output,
    ShellContext,
    execute,
    load_plugins,
    read_history_file,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="hublab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", dest="command", metavar="CMD",
                        help="run one shell command and exit (non-zero status on error)")
    parser.add_argument("--serial", metavar="DEVICE",
                        help="serve the shell on a serial port, e.g. /dev/ttyS0 or /dev/ttyGS0")
    parser.add_argument("--baud", type=int, default=115200, help="serial speed (default 115200)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR",
                        help="models directory for a daemon started by this shell "
                             "(default: $HUBLAB_MODELS_DIR or the shipped models/)")
    parser.add_argument("--budget-mb", type=int, metavar="N",
                        help="memory budget in MiB for a daemon started by this shell")
    parser.add_argument("--socket", type=Path, metavar="PATH",
                        help="the daemon's Unix socket (default: $HUBLAB_SOCKET or "
                             "<state dir>/hublabd.sock)")
    parser.add_argument("--version", action="version", version=f"hublab {__version__}")
    return parser


class Connection:
    """Connects on first use (so `help` works without a model) and starts an in-process
    daemon when none is listening; `close()` stops that daemon."""

    def __init__(self, socket_path: Path | None, overrides: dict, warn=None):
        self.socket_path = socket_path
        self.overrides = overrides
        self.warn = warn or (lambda text: print(text, file=sys.stderr))
        self.handle = None
        self._checked = False

    def __call__(self):
        from hublabio.client import Client, connect_or_start

        if self.handle is not None:  # our own daemon is already running: just reconnect
            return Client(self.handle.socket_path)
        client, handle = connect_or_start(self.socket_path, **self.overrides)
        self.handle = handle
        if handle is None and self.overrides and not self._checked:
            self._checked = True
            self._check_overrides(client)
        return client

    def _check_overrides(self, client) -> None:
        """A daemon that was already running keeps its own settings: say so when the flags
        ask for something else."""
        hello = client.call("hello")
        wanted = self.overrides.get("models_dir")
        if wanted is not None and Path(hello.get("models_dir", "")) != Path(wanted):
            self.warn(f"warning: --models-dir ignored: the daemon already listening on "
                      f"{client.socket_path} uses {hello.get('models_dir')}")
        budget = self.overrides.get("budget_mb")
        if budget is not None and hello.get("budget_mb") != budget:
            self.warn(f"warning: --budget-mb ignored: the daemon already listening on "
                      f"{client.socket_path} has a budget of {hello.get('budget_mb')} MiB")

    def close(self, timeout: float = 15.0) -> bool:
        """Stop a daemon started here; False if it is still busy after `timeout` seconds
        (an operation that cannot be cancelled, such as a benchmark, is still running)."""
        if self.handle is None:
            return True
        handle, self.handle = self.handle, None
        handle.stop(timeout)
        return not handle.alive


def log_to_file() -> Path:
    """Send this process's log records (those of a daemon started in-process) to
    <state dir>/hublabd.log, so the shell's output holds only what commands print."""
    path = paths.state_dir() / "hublabd.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=1 << 20, backupCount=1,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def run_lines(ctx: ShellContext, lines) -> int:
    """Run each line as one command; 1 if any failed, 0 otherwise. `exit` stops early."""
    status = 0
    for line in lines:
        try:
            if not execute(ctx, line.rstrip("\r\n")):
                status = 1
        except ExitShell:
            break
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {}
    if args.models_dir is not None:
        models_dir = args.models_dir.expanduser().resolve()
        os.environ["HUBLAB_MODELS_DIR"] = str(models_dir)  # for add-on commands (pkg) too
        overrides["models_dir"] = models_dir
    if args.budget_mb is not None:
        overrides["budget_mb"] = args.budget_mb
    socket_path = args.socket.expanduser() if args.socket else None
    ctx = ShellContext(connect=lambda: connection(), out=Output.for_streams(),
                       history=lambda: read_history_file(paths.history_file()))
    connection = Connection(socket_path, overrides, warn=ctx.out.error)
    log_to_file()
    for warning in load_plugins():
        print(warning, file=sys.stderr)
    try:
        status = run(args, ctx)
    except HublabError as exc:
        ctx.out.error(render.error(exc))
        status = 1
    except KeyboardInterrupt:
        status = 130
    ctx.reset_client()
    if not connection.close():
        # The in-process daemon is stuck in an operation that cannot be interrupted: leave
        # anyway (settings are written atomically, so nothing is half-written).
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


def run(args, ctx: ShellContext) -> int:
    if args.serial:
        from hublabio.shell.serial_console import SerialConsole, open_port

        port = open_port(args.serial, args.baud)
        try:
            return SerialConsole(port, ctx, paths.history_file()).run(
                banner=f"HubLab IO shell {__version__} - type `help`")
        finally:
            port.close()
    if args.command is not None:
        return run_lines(ctx, [args.command])
    if not sys.stdin.isatty():
        return run_lines(ctx, sys.stdin)
    from hublabio.shell import repl

    return repl.run(ctx, paths.history_file(),
                    banner=f"HubLab IO shell {__version__} - type `help`, "
                           "`?question` to ask, Ctrl-D to leave")


if __name__ == "__main__":
    sys.exit(main())
