"""Package repositories: publish on the workstation, search / install / upgrade on the device
(standard library only).

A repository is a static folder, served as it is by any HTTP server or carried on a USB stick:

    index.json                      {"format": "hublab-package-repository", "version": 1,
                                     "packages": {name: [{version, category, description,
                                                          files: [{path, sha256, size}]}]}}
    <name>/<version>/package.toml   the package as `pkg install` verifies it
    <name>/<version>/<files...>

`publish(package_dir, repo)` takes a package folder (`hublab-tools deploy`'s, or the seed's
manifest: top-level name, version, category, description and `files = [paths]`), hashes every
file, copies it to `<name>/<version>/` (a temporary folder renamed into place) and rewrites
index.json atomically under a lock. `repo` may also be an http(s) URL of a server that takes
PUT uploads: the files go first and index.json last. A published version is never overwritten.

On the device, `install(spec, models_dir, repos)` resolves `name` or `name@version` (the
highest version when none is given) in the configured repositories (paths or http(s) URLs,
the first that has it), checks the free space before downloading anything (the download plus
`pkg install`'s staging copy), downloads each file into `.packages/downloads/<name>-<version>/`
in the models directory, resuming a partial file where it stopped (HTTP Range), checks its
size and sha256, and then installs that folder with hublabio.pkg.install (verified again, atomic,
journaled). A file that fails its sha256 is deleted and the install refused: nothing is
installed from a tampered repository. `upgrade` installs each installed package's newest version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hublabio import pkg as packages
from hublabio.errors import PackageError
from hublabio.fsutil import atomic_write_text, dir_lock, file_sha256

INDEX = "index.json"
FORMAT = "hublab-package-repository"
DOWNLOADS = "downloads"  # under the models directory's .packages/
MAX_INDEX_BYTES = 8 << 20
TIMEOUT_S = 30.0
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
_SPEC_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>[^@\s]+))?$")


@dataclass
class RepoPackage:
    name: str
    version: str
    category: str = ""
    description: str = ""
    files: list[packages.PackageFile] = field(default_factory=list)
    repo: str = ""  # where it was found (a folder or a URL)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def version_key(version: str) -> tuple:
    """Order versions as people do: 1.10.0 > 1.9.2 > 1.9; a non-numeric part sorts before a
    number (1.0.0-rc1 < 1.0.0)."""
    def parts(text: str) -> tuple:
        return tuple((1, int(p), "") if p.isdigit() else (0, 0, p)
                     for p in re.split(r"[.+_-]", text))

    release, _, pre = version.partition("-")
    return parts(release), ((1,) if not pre else (0, parts(pre)))


def is_spec(text: str) -> bool:
    """`name` or `name@version`: something to look up in the repositories."""
    return _SPEC_RE.match(text) is not None


# ------------------------------------------------------------------------ reading a repository

def is_url(repo: str) -> bool:
    return repo.startswith(("http://", "https://"))


def _join(repo: str, *parts: str) -> str:
    if is_url(repo):
        return repo.rstrip("/") + "/" + "/".join(urllib.parse.quote(p) for p in parts)
    return str(Path(repo).expanduser().joinpath(*parts))


def _open(location: str, offset: int = 0):
    """(file object, offset it starts at): a local file, or an HTTP response (Range when
    resuming; a server that ignores it starts again at 0)."""
    if not is_url(location):
        f = open(location, "rb")
        f.seek(offset)
        return f, offset
    req = urllib.request.Request(location, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after the offset: the partial file is whole
            return _open(location, 0)
        if err.code == 404:
            raise FileNotFoundError(location) from None
        raise PackageError(f"{location}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PackageError(f"{location}: cannot connect ({reason})") from None
    return resp, (offset if resp.status == 206 else 0)


def read_index(repo: str) -> list[RepoPackage]:
    """Every package version a repository offers, validated like a package manifest."""
    return _parse_index(_index_doc(repo), _join(repo, INDEX), repo)


def _index_doc(repo: str, *, missing_ok: bool = False) -> dict:
    """The repository's index.json, checked (an empty index when `missing_ok` and there is
    none yet: the first publish)."""
    where = _join(repo, INDEX)
    try:
        f, _ = _open(where)
        with f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return {"format": FORMAT, "version": 1, "packages": {}}
        raise PackageError(f"{where}: no package index (is {repo} a repository? "
                           "`pkg publish` writes one)") from None
    except OSError as err:
        raise PackageError(f"{where}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_INDEX_BYTES:
        raise PackageError(f"{where}: larger than {MAX_INDEX_BYTES >> 20} MiB")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackageError(f"{where}: not a package index ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
        raise PackageError(f"{where}: not a version-1 {FORMAT} index")
    _parse_index(doc, where, repo)  # a damaged index is refused before anyone extends it
    return doc


def _parse_index(doc: dict, where: str, repo: str) -> list[RepoPackage]:
    found = []
    for name, versions in (doc.get("packages") or {}).items():
        if not packages.NAME_RE.match(str(name)) or not isinstance(versions, list):
            raise PackageError(f"{where}: packages.{name!r}: not a package name or no list")
        for i, v in enumerate(versions):
            at = f"{where}: packages.{name}[{i}]"
            if not isinstance(v, dict) or not isinstance(v.get("version"), str) \
                    or not VERSION_RE.match(v["version"]):
                raise PackageError(f"{at}.version: missing or not a version")
            found.append(RepoPackage(
                name=name, version=v["version"], category=str(v.get("category", "")),
                description=str(v.get("description", "")), repo=repo,
                files=packages.check_files(v.get("files"), f"{at}.files")))
    return found


def search(repos: list[str], term: str = "") -> tuple[list[RepoPackage], list[str]]:
    """The newest version of each package whose name or description contains `term`, and a
    line per repository that could not be read (the others still answer)."""
    newest: dict[str, RepoPackage] = {}
    problems = []
    for repo in repos:
        try:
            offered = read_index(repo)
        except PackageError as err:
            problems.append(str(err))
            continue
        for p in offered:
            text = f"{p.name} {p.description}".lower()
            if term.lower() in text and (p.name not in newest or version_key(p.version)
                                         > version_key(newest[p.name].version)):
                newest[p.name] = p
    return sorted(newest.values(), key=lambda p: p.name), problems


def resolve(spec: str, repos: list[str]) -> RepoPackage:
    """`name` (its highest version) or `name@version`, from the first repository that has it."""
    m = _SPEC_RE.match(spec)
    if not m:
        raise PackageError(f"{spec!r}: expected a package name or name@version")
    if not repos:
        raise PackageError("no package repositories configured; add one with "
                           "`pkg repo add <folder|http(s) URL>`")
    name, version = m.group("name"), m.group("version")
    problems, seen = [], []
    for repo in repos:
        try:
            offered = [p for p in read_index(repo) if p.name == name]
        except PackageError as err:
            problems.append(str(err))
            continue
        seen += [p.version for p in offered]
        if version is not None:
            offered = [p for p in offered if p.version == version]
        if offered:
            return max(offered, key=lambda p: version_key(p.version))
    what = f"{name}@{version}" if version else name
    known = f" (versions offered: {', '.join(sorted(set(seen), key=version_key))})" if seen else ""
    tail = "; " + "; ".join(problems) if problems else ""
    raise PackageError(f"no package {what} in {', '.join(repos)}{known}{tail}")


# ------------------------------------------------------------------------------- downloading

def download_dir(models_dir: Path, p: RepoPackage) -> Path:
    return Path(models_dir) / packages.RECORDS / DOWNLOADS / f"{p.name}-{p.version}"


def _partial(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def check_space(p: RepoPackage, dest: Path, models_dir: Path) -> None:
    """Refuse before downloading when the SD card cannot hold what is left to download plus
    the staging copy `pkg install` verifies before moving files into place."""
    have = sum(min(_partial(dest / f.path), f.size) for f in p.files)
    need = (p.size - have) + p.size
    free = shutil.disk_usage(models_dir).free
    if need > free:
        raise PackageError(f"{p.name} {p.version} needs {need / 2**20:.1f} MiB free in "
                           f"{models_dir} (download + staging), only {free / 2**20:.1f} MiB "
                           "is free; nothing was downloaded")


def fetch(p: RepoPackage, models_dir: Path) -> Path:
    """Download every file of `p` (resuming partial ones) and its verified manifest; returns
    the folder, ready for hublabio.pkg.install."""
    dest = download_dir(models_dir, p)
    dest.mkdir(parents=True, exist_ok=True)
    check_space(p, dest, models_dir)
    for f in p.files:
        _fetch_file(_join(p.repo, p.name, p.version, *f.path.split("/")), dest / f.path, f)
    manifest = {"name": p.name, "version": p.version, "category": p.category,
                "description": p.description}
    atomic_write_text(dest / packages.MANIFEST, render_manifest(manifest, p.files))
    return dest


def _fetch_file(src: str, dest: Path, entry: packages.PackageFile) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = _partial(dest)
    if have > entry.size:
        dest.unlink()
        have = 0
    if have < entry.size:
        try:
            stream, start = _open(src, have)
        except FileNotFoundError:
            raise PackageError(f"{src}: listed in the index but missing") from None
        with stream, open(dest, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            left = entry.size - start
            while left > 0:
                chunk = stream.read(min(packages.CHUNK, left))
                if not chunk:
                    raise PackageError(f"{src}: ended after {entry.size - left} of "
                                       f"{entry.size} bytes (run the install again to resume)")
                out.write(chunk)
                left -= len(chunk)
            if stream.read(1):
                raise PackageError(f"{src}: larger than the {entry.size} bytes the index says")
    digest = file_sha256(dest)
    if digest != entry.sha256:
        dest.unlink()
        raise PackageError(f"{src}: sha256 {digest} does not match the index "
                           f"({entry.sha256}); the download was deleted and nothing installed")


def install(spec: str, models_dir, repos: list[str], *, force: bool = False,
            replace: bool = False) -> packages.InstalledPackage:
    """Resolve, download and install `spec` (see the module doc)."""
    models_dir = Path(models_dir)
    p = resolve(spec, repos)
    folder = fetch(p, models_dir)
    installed = packages.install(folder, models_dir, force=force, replace=replace)
    shutil.rmtree(folder, ignore_errors=True)
    return installed


def upgrade(models_dir, repos: list[str], names: list[str] | None = None
            ) -> list[tuple[str, str, str]]:
    """Install the newest version of each installed package (or of `names`) that a repository
    offers above the installed one; returns (name, old version, new version) per upgrade."""
    models_dir = Path(models_dir)
    installed = {p.name: p for p in packages.list_packages(models_dir)}
    for n in names or []:
        if n not in installed:
            raise PackageError(f"{n}: not installed (pkg list shows what is)")
    done = []
    for name in names or sorted(installed):
        try:
            newest = resolve(name, repos)
        except PackageError:
            continue  # not offered by any repository: nothing to upgrade to
        old = installed[name].version
        if version_key(newest.version) > version_key(old):
            install(f"{name}@{newest.version}", models_dir, repos)
            done.append((name, old, newest.version))
    return done


# -------------------------------------------------------------------------------- publishing

def render_manifest(meta: dict, files: list[packages.PackageFile]) -> str:
    import tomli_w

    return tomli_w.dumps({"package": meta, "files": [
        {"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]})


def _read_source(src: Path) -> tuple[dict, list[str]]:
    """A package folder's manifest: ours ([package] + [[files]] with sha256) or the seed's
    (top-level name, version, category, description, files = [paths])."""
    import tomllib

    manifest = src / packages.MANIFEST
    try:
        doc = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackageError(f"{manifest}: missing (a package folder has a package.toml)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PackageError(f"{manifest}: cannot read ({err})") from None
    if "package" in doc:
        pkg = packages.parse_manifest(manifest.read_bytes(), str(manifest))
        meta = {"name": pkg.name, "version": pkg.version, "category": pkg.category,
                "description": pkg.description}
        return meta, [f.path for f in pkg.files]
    unknown = set(doc) - {"name", "version", "category", "description", "files"}
    if unknown:
        raise PackageError(f"{manifest}: {sorted(unknown)[0]}: unknown key")
    for key in ("name", "version"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            raise PackageError(f"{manifest}: {key}: required, a non-empty string")
    if not packages.NAME_RE.match(doc["name"]):
        raise PackageError(f"{manifest}: name: {doc['name']!r} must be lowercase letters, "
                           "digits, '.', '_' or '-'")
    files = doc.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise PackageError(f"{manifest}: files: expected a non-empty list of file paths")
    meta = {k: str(doc.get(k, "")) for k in ("name", "version", "category", "description")}
    return meta, [packages.check_path(f, f"{manifest}: files") for f in files]


def publish(src, repo_dir) -> RepoPackage:
    """Add the package folder `src` to the repository folder `repo_dir` (created if needed)."""
    src = Path(src).expanduser()
    repo = str(repo_dir)
    meta, paths = _read_source(src)
    if not VERSION_RE.match(meta["version"]):
        raise PackageError(f"{src / packages.MANIFEST}: version: {meta['version']!r} is not a "
                           "version (letters, digits, '.', '+', '_', '-')")
    files = []
    for rel in paths:
        f = src / rel
        if f.is_symlink() or not f.is_file():
            raise PackageError(f"{f}: listed in {packages.MANIFEST} but not a regular file")
        files.append(packages.PackageFile(rel, file_sha256(f), f.stat().st_size))
    if is_url(repo):
        return _publish_http(repo, src, meta, files)
    repo_path = Path(repo).expanduser()
    repo_path.mkdir(parents=True, exist_ok=True)
    with dir_lock(repo_path):
        index = _index_doc(str(repo_path), missing_ok=True)
        _add_version(index, meta, files, repo_path)
        final = repo_path / meta["name"] / meta["version"]
        final.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=final.parent))
        try:
            for f in files:
                (tmp / f.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / f.path, tmp / f.path)
                if file_sha256(tmp / f.path) != f.sha256:
                    raise PackageError(f"{src / f.path}: changed while it was being published")
            (tmp / packages.MANIFEST).write_text(render_manifest(meta, files), encoding="utf-8")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(repo_path / INDEX, _render_index(index))
    return RepoPackage(files=files, repo=str(repo_path), **meta)


def _put(url: str, body, size: int) -> None:
    req = urllib.request.Request(url, data=body, method="PUT",
                                 headers={"Content-Length": str(size),
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S):
            pass
    except urllib.error.HTTPError as err:
        raise PackageError(f"{url}: the server refused the upload (HTTP {err.code} "
                           f"{err.reason}); publish to a folder and serve it instead") from None
    except (urllib.error.URLError, OSError) as err:
        raise PackageError(f"{url}: cannot connect ({getattr(err, 'reason', err)})") from None


def _publish_http(repo: str, src: Path, meta: dict, files: list[packages.PackageFile]
                  ) -> RepoPackage:
    """Publish to a server that takes HTTP PUT (WebDAV, a storage bucket, nginx dav): the files
    first, index.json last, so a reader never sees a version whose files are not all there.
    (Two publishers at once are not serialized here: a folder repository locks.)"""
    doc = _index_doc(repo, missing_ok=True)
    _add_version(doc, meta, files, repo)
    for entry in files:
        with open(src / entry.path, "rb") as body:
            _put(_join(repo, meta["name"], meta["version"], *entry.path.split("/")), body,
                 entry.size)
    manifest = render_manifest(meta, files).encode("utf-8")
    _put(_join(repo, meta["name"], meta["version"], packages.MANIFEST), manifest, len(manifest))
    index = _render_index(doc).encode("utf-8")
    _put(_join(repo, INDEX), index, len(index))
    return RepoPackage(files=files, repo=repo, **meta)


def _add_version(index: dict, meta: dict, files: list[packages.PackageFile], repo) -> None:
    """Add a version to an index document; a version once published is never replaced."""
    versions = index["packages"].setdefault(meta["name"], [])
    if any(v["version"] == meta["version"] for v in versions):
        raise PackageError(f"{meta['name']} {meta['version']} is already in {repo}; a published "
                           "version is never replaced (raise the version)")
    versions.append({**meta, "files": [
        {"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]})
    versions.sort(key=lambda v: version_key(v["version"]))


def _render_index(index: dict) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"
