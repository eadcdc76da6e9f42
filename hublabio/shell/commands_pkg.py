"""Shell commands for deploy packages: `pkg install`, `pkg list`, `pkg remove` (hublabio.pkg).

Packages go into the models directory the daemon serves (asked with `hello`; without a daemon,
hublabio.paths.models_dir()). The daemon re-reads the models directory when its TOML files
change, so after `pkg install` the new models are listed by `ai list` without a restart; the
install command confirms this with `models.list`.
"""

from __future__ import annotations

from pathlib import Path

from hublabio import paths, pkg
from hublabio.errors import DaemonUnavailable, HublabError
from hublabio.shell import render
from hublabio.shell.commands import ShellContext, UsageError, command


def _models_dir(ctx: ShellContext) -> Path:
    try:
        found = ctx.client.call("hello").get("models_dir")
    except (DaemonUnavailable, OSError):
        found = None
    return Path(found) if found else paths.models_dir()


def _installed_names(ctx: ShellContext) -> list[str]:
    try:
        return [p.name for p in pkg.list_packages(_models_dir(ctx))]
    except HublabError:
        return []


def render_packages(packages: list[pkg.InstalledPackage]) -> str:
    if not packages:
        return "No packages installed."
    rows = [[p.name, p.version, p.category or "-", str(len(p.files)),
             render.human_mb(p.size / 2**20), p.description or ""] for p in packages]
    return render.table(["NAME", "VERSION", "CATEGORY", "FILES", "SIZE", "DESCRIPTION"], rows,
                        "lllrrl")


@command("pkg install", usage="pkg install <folder|file.tar.gz> [--force]")
def pkg_install(ctx: ShellContext, args: list[str]) -> None:
    """Verify and install a package made by `hublab-tools deploy` into the models directory.

    Every file's size and sha256 is checked; absolute paths, '..', links, devices and files not
    listed in package.toml are refused; nothing is written unless everything checks out.
    --force replaces files that belong to another package (or to none)."""
    force = "--force" in args
    rest = [a for a in args if a != "--force"]
    if len(rest) != 1:
        raise UsageError("usage: pkg install <folder|file.tar.gz> [--force]")
    models_dir = _models_dir(ctx)
    installed = pkg.install(Path(rest[0]).expanduser(), models_dir, force=force)
    ctx.out.line(f"Installed {installed.name} {installed.version}: {len(installed.files)} files, "
                 f"{render.human_mb(installed.size / 2**20)} into {models_dir}")
    ctx.forget_models()
    try:
        listed = ctx.client.call("models.list")
    except (DaemonUnavailable, OSError):
        return
    names = {m.get("name") for m in listed.get("models", [])}
    tomls = [f.path for f in installed.files if "/" not in f.path and f.path.endswith(".toml")]
    from hublabio.config import load_model_config

    new = []
    for t in tomls:
        try:
            new.append(load_model_config(models_dir / t).name)
        except HublabError as err:
            ctx.out.error(f"warning: {err}")
    if new:
        seen = [n for n in new if n in names]
        missing = [n for n in new if n not in names]
        if seen:
            ctx.out.line("Models now available: " + ", ".join(seen))
        if missing:
            ctx.out.error("warning: the daemon does not list " + ", ".join(missing)
                          + " yet (see `ai list`)")


@command("pkg list")
def pkg_list(ctx: ShellContext, args: list[str]) -> None:
    """List installed packages: name, version, category, files, size."""
    if args:
        raise UsageError("usage: pkg list")
    ctx.out.line(render_packages(pkg.list_packages(_models_dir(ctx))))


@command("pkg remove", usage="pkg remove <name>", complete=_installed_names)
def pkg_remove(ctx: ShellContext, args: list[str]) -> None:
    """Remove an installed package: deletes exactly the files it installed."""
    if len(args) != 1:
        raise UsageError("usage: pkg remove <name>")
    removed = pkg.remove(args[0], _models_dir(ctx))
    ctx.forget_models()
    ctx.out.line(f"Removed {removed.name} {removed.version}: {len(removed.files)} files")
