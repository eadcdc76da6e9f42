"""hublabd: the HubLab IO daemon. Loads GGUF models within the board's memory budget and answers
the `hublab` shell over a Unix socket (JSON lines), optionally with an OpenAI-compatible HTTP API.

Settings come from --config (default: $HUBLAB_CONFIG, /etc/hublab/hublab.toml, or the repo's
etc/hublab.toml); command-line options override them. Models are read from --models-dir
(default: $HUBLAB_MODELS_DIR or the shipped models/ folder); user settings (`ai config`) and
the socket live in $HUBLAB_STATE_DIR. Under systemd (Type=notify) it reports READY, STATUS and
watchdog pings. SIGTERM or SIGINT stops it cleanly: running answers are cancelled, models
unloaded, the socket removed. Logs go to stderr.

Examples:
  hublabd
  hublabd --models-dir /srv/models --budget-mb 300 --http 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from hublabio import paths
from hublabio.config import load_daemon_settings
from hublabio.daemon import notify
from hublabio.errors import HublabError

log = logging.getLogger("hublabd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublabd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, help="folder with model-config.toml and *.gguf")
    p.add_argument("--budget-mb", type=int, help="MiB all loaded models may use (0 = board RAM "
                   "minus the OS reserve)")
    p.add_argument("--socket", type=Path, help="Unix socket path (default: $HUBLAB_SOCKET or "
                   "<state dir>/hublabd.sock)")
    p.add_argument("--http", metavar="HOST:PORT", help="also serve the OpenAI-compatible API, "
                   "e.g. 127.0.0.1:8080 (give another host explicitly to listen beyond loopback)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000, or *) call "
                        "the HTTP API; repeat for more (default: none)")
    p.add_argument("--config", type=Path, help="daemon settings TOML (default: $HUBLAB_CONFIG, "
                   "/etc/hublab/hublab.toml, or etc/hublab.toml)")
    p.add_argument("--threads", type=int, help="llama.cpp threads for generation (0 = the "
                   "board's default)")
    p.add_argument("--threads-batch", type=int, help="llama.cpp threads for prompt processing "
                   "(0 = the board's default)")
    p.add_argument("--repack", choices=["auto", "on", "off"], help="weight repacking for faster "
                   "kernels: auto = every repack except Intel AMX (llama.cpp #20824), on = AMX "
                   "too, off = none (default: [daemon] repack, else auto)")
    p.add_argument("--queue-size", type=int, help="requests that may wait behind the running "
                   "one before new ones get a busy error")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def settings_from_args(args: argparse.Namespace):
    config = args.config or paths.daemon_config_file()
    settings = load_daemon_settings(config, required=args.config is not None)
    changes = {}
    for key in ("models_dir", "budget_mb", "socket", "http", "threads", "threads_batch",
                "queue_size"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.repack is not None:
        changes["repack"] = {"auto": "auto", "on": True, "off": False}[args.repack]
    for key, lo in (("budget_mb", 0), ("threads", 0), ("threads_batch", 0), ("queue_size", 1)):
        if key in changes and changes[key] < lo:
            raise HublabError(f"--{key.replace('_', '-')} must be >= {lo}, got {changes[key]}")
    if args.cors_origin:
        from hublabio.config import check_origin

        for origin in args.cors_origin:
            if check_origin(origin):
                raise HublabError(f"--cors-origin: {check_origin(origin)}")
        changes["cors_origins"] = tuple(args.cors_origin)
    if "http" in changes:
        from hublabio.daemon.http import parse_listen

        parse_listen(changes["http"])  # fail before loading anything
    return replace(settings, **changes)


async def run(settings) -> int:
    from hublabio.daemon.server import Server
    from hublabio.daemon.service import Service

    loop = asyncio.get_running_loop()
    service = await loop.run_in_executor(None, Service, settings)
    server = Server(service)
    try:
        await server.start()
    except BaseException:
        await loop.run_in_executor(None, service.close)
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, server, sig)
    configs, errors = service.configs()
    budget = service.pool.budget_mb
    status = f"{len(configs)} model(s), budget {budget} MiB, socket {server.socket_path}"
    notify.ready(status)
    log.info("ready: %s", status)
    watchdog = asyncio.ensure_future(notify.watchdog_loop())
    try:
        await server.serve_forever()
    finally:
        watchdog.cancel()
    return 0


def _on_signal(server, sig) -> None:
    log.info("received %s, shutting down", signal.Signals(sig).name)
    notify.stopping("shutting down")
    server.request_stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s hublabd %(levelname)s %(message)s")
    try:
        settings = settings_from_args(args)
        return asyncio.run(run(settings))
    except HublabError as exc:
        log.error("%s", exc)
        notify.notify(f"STATUS=failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
