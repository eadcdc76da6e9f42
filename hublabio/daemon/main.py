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
from hublabio.params import DAEMON, add_flags, flag_values

log = logging.getLogger("hublabd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublabd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="daemon settings TOML (default: $HUBLAB_CONFIG, "
                   "/etc/hublab/hublab.toml, or etc/hublab.toml)")
    add_flags(p, DAEMON)  # --models-dir, --budget-mb, --http, ... (hublabio.params.DAEMON)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def settings_from_args(args: argparse.Namespace):
    """The settings file, then the flags given (each checked by the schema as it was parsed)."""
    config = args.config or paths.daemon_config_file()
    settings = replace(load_daemon_settings(config, required=args.config is not None),
                       **flag_values(args, DAEMON))
    if settings.http:
        from hublabio.daemon.http import parse_listen

        parse_listen(settings.http)  # the host too: fail before loading anything
    return settings


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
