"""Shell commands for packages: `pkg install`, `pkg list`, `pkg remove` (hublabio.pkg) and the
repository commands `pkg search`, `pkg upgrade`, `pkg publish`, `pkg repo` (hublabio.repo).

Packages go into the models directory the daemon serves (asked with `hello`; without a daemon,
hublabio.paths.models_dir()). The daemon re-reads the models directory when its TOML files
change, so after `pkg install` the new models are listed by `ai list` without a restart; the
install command confirms this with `models.list`.
"""

from __future__ import annotations

from pathlib import Path

from hublabio import paths, pkg, repo
from hublabio.config import package_repositories, update_settings
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


@command("pkg install", usage="pkg install <folder|file.tar.gz|name[@version]> [--replace] "
                             "[--force]")
def pkg_install(ctx: ShellContext, args: list[str]) -> None:
    """Install a package: a folder or .tar.gz made by `hublab-tools deploy`, or a package by
    name (`moe-r-experts`, `moe-r-experts@1.2.0`) from the repositories `pkg repo add` set.

    Every file's size and sha256 is checked; absolute paths, '..', links, devices and files not
    listed in package.toml are refused; nothing is written unless everything checks out. A
    download resumes where an interrupted one stopped. --replace overwrites files that belong
    to no package (the shipped experts, say, when the package brings trained ones); --force
    also takes files over from other packages."""
    flags = {a for a in args if a in ("--force", "--replace")}
    rest = [a for a in args if a not in flags]
    if len(rest) != 1:
        raise UsageError("usage: pkg install <folder|file.tar.gz|name[@version]> [--replace] "
                         "[--force]")
    models_dir = _models_dir(ctx)
    target = Path(rest[0]).expanduser()
    force, replace = "--force" in flags, "--replace" in flags
    if target.exists() or not repo.is_spec(rest[0]):
        installed = pkg.install(target, models_dir, force=force, replace=replace)
    else:
        installed = repo.install(rest[0], models_dir, package_repositories(), force=force,
                                 replace=replace)
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


@command("pkg search", usage="pkg search [text]")
def pkg_search(ctx: ShellContext, args: list[str]) -> None:
    """List the packages the configured repositories offer (newest version of each), those whose
    name or description contains `text` when given."""
    repos = package_repositories()
    if not repos:
        raise UsageError("no package repositories configured; add one with "
                         "`pkg repo add <folder|http(s) URL>`")
    found, problems = repo.search(repos, " ".join(args))
    for line in problems:
        ctx.out.error(f"warning: {line}")
    if not found:
        ctx.out.line("No packages found.")
        return
    installed = {p.name: p.version for p in pkg.list_packages(_models_dir(ctx))}
    rows = [[p.name, p.version, installed.get(p.name, "-"), p.category or "-",
             render.human_mb(p.size / 2**20), p.description] for p in found]
    ctx.out.line(render.table(["NAME", "VERSION", "INSTALLED", "CATEGORY", "SIZE",
                               "DESCRIPTION"], rows, "llllrl"))


@command("pkg upgrade", usage="pkg upgrade [name ...]", complete=_installed_names)
def pkg_upgrade(ctx: ShellContext, args: list[str]) -> None:
    """Install the newest version the repositories offer of every installed package (or of the
    ones named)."""
    done = repo.upgrade(_models_dir(ctx), package_repositories(), args or None)
    ctx.forget_models()
    if not done:
        ctx.out.line("Everything is up to date.")
    for name, old, new in done:
        ctx.out.line(f"Upgraded {name}: {old} -> {new}")


@command("pkg publish", usage="pkg publish <folder> --repo <folder|url>")
def pkg_publish(ctx: ShellContext, args: list[str]) -> None:
    """Add a package folder (package.toml: `hublab-tools deploy`'s, or the seed's name /
    version / files list) to a repository: a folder, which any HTTP server or a USB stick
    serves, or the http(s) URL of a server that takes PUT uploads. Without --repo, the first
    configured repository that is a folder."""
    rest = list(args)
    target = None
    if "--repo" in rest:
        i = rest.index("--repo")
        if i + 1 >= len(rest):
            raise UsageError("usage: pkg publish <folder> --repo <folder|url>")
        target = rest[i + 1]
        del rest[i:i + 2]
    if len(rest) != 1:
        raise UsageError("usage: pkg publish <folder> --repo <folder|url>")
    if target is None:
        target = next((r for r in package_repositories() if not repo.is_url(r)), None)
        if target is None:
            raise UsageError("pkg publish needs --repo <folder> (no folder repository is "
                             "configured)")
    published = repo.publish(rest[0], target)
    ctx.out.line(f"Published {published.name} {published.version}: {len(published.files)} "
                 f"files, {render.human_mb(published.size / 2**20)} to {target}")


@command("pkg repo", usage="pkg repo [list | add <folder|url> | remove <folder|url>]")
def pkg_repo(ctx: ShellContext, args: list[str]) -> None:
    """The package repositories `pkg install <name>`, `pkg search` and `pkg upgrade` use, in
    order: folders (a USB stick) or http(s) URLs of a folder `pkg publish` wrote."""
    repos = package_repositories()
    if args in ([], ["list"]):
        ctx.out.line("\n".join(repos) if repos else "No package repositories configured.")
        return
    if len(args) != 2 or args[0] not in ("add", "remove"):
        raise UsageError("usage: pkg repo [list | add <folder|url> | remove <folder|url>]")
    where = args[1]
    if args[0] == "add":
        if not repo.is_url(where):
            where = str(Path(where).expanduser().absolute())
        repo.read_index(where)  # refuse what is not a repository before saving it
        if where not in repos:
            repos.append(where)
        ctx.out.line(f"Added package repository {where}")
    else:
        if where not in repos:
            raise UsageError(f"{where}: not a configured repository (pkg repo list)")
        repos.remove(where)
        ctx.out.line(f"Removed package repository {where}")
    update_settings("pkg", "repositories", repos)
