"""Deploy packages on the device: verify, install atomically, list, remove (standard library only).

A package is a folder or a .tar.gz made by `hublab-tools deploy`: files laid out as in the models
directory (model TOMLs, GGUFs, experts/, router/) plus `package.toml`:

    [package]
    name = "smollm2-python"    version = "1.0.0"    category = "model"    description = "..."
    [[files]]
    path = "model-config.toml"    sha256 = "<64 hex>"    size = 1234

install() refuses, before anything is written to the models directory: absolute paths, `..`,
symlinks / hardlinks / devices / fifos, files not listed in package.toml, listed files that are
missing, a wrong size or sha256, and files that belong to another package or to nobody (unless
force=True). Files are copied into a staging folder inside the models directory and verified
there; then a journal is written (fsync), each file is moved into place with os.replace, the
package record `.packages/<name>.toml` is written last (fsync), and the journal is deleted.
After a power loss the next install/remove finishes a journaled install (every staged file was
already verified) or discards an unjournaled staging folder, so the directory is always either
in its old or its new state. remove() deletes exactly the files in the record.

Journal-to-end of an install, a remove and a recovery hold an flock on the models directory
(hublabio.fsutil.dir_lock), so they never interleave, and a running daemon that finds a journal
(has_journal) waits for the install that wrote it or, when that process was killed, finishes it
itself before it reads the models directory: a running daemon never serves a half-installed
package either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hublabio import jsonsafe, tomlsafe
from hublabio.fsutil import atomic_write_text, dir_lock, fsync_dir
from hublabio.errors import PackageError

MANIFEST = "package.toml"
RECORDS = ".packages"
STAGING_PREFIX = ".pkg-staging-"
# Staging folders this process's installs are filling now (threads: the daemon, the tests), so
# that one install's recovery never discards another thread's staging as debris.
_LIVE_STAGING: set[str] = set()
_LIVE_LOCK = threading.Lock()
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


@dataclass(frozen=True)
class PackageFile:
    path: str
    sha256: str
    size: int


@dataclass
class InstalledPackage:
    name: str
    version: str
    category: str = ""
    description: str = ""
    files: list[PackageFile] = field(default_factory=list)
    installed_at: str = ""
    dirs: list[str] = field(default_factory=list)  # folders this package created (removed with it)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------

def check_path(text, where: str) -> str:
    """A package-relative POSIX path that stays inside the models directory."""
    if not isinstance(text, str) or not text:
        raise PackageError(f"{where}: path must be a non-empty string")
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise PackageError(f"{where}: {text!r} contains control characters")
    if "\\" in text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise PackageError(f"{where}: {text!r} is an absolute or non-POSIX path")
    parts = text.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PackageError(f"{where}: {text!r} is not a plain relative path ('..', '.', '//' "
                           "are refused: a package may only write inside the models directory)")
    if parts[0] in (RECORDS, MANIFEST) or parts[0].startswith(STAGING_PREFIX):
        raise PackageError(f"{where}: {text!r} is reserved for the package manager")
    return text


def check_files(files, label: str, hint: str = "") -> list[PackageFile]:
    """A manifest's (or a repository index's) file list: each entry exactly path, sha256 and
    size, every path a plain relative one listed once and never also used as a folder.
    `label` starts each error ("package.toml: files")."""
    if not isinstance(files, list) or not files:
        raise PackageError(f"{label}: the package lists no files{hint}")
    entries, seen = [], set()
    for i, f in enumerate(files):
        at = f"{label}[{i}]"
        if not isinstance(f, dict) or set(f) != {"path", "sha256", "size"}:
            raise PackageError(f"{at}: needs exactly path, sha256 and size")
        path = check_path(f["path"], f"{at}.path")
        if path in seen:
            raise PackageError(f"{at}.path: {path!r} is listed twice")
        seen.add(path)
        if not isinstance(f["sha256"], str) or not SHA_RE.match(f["sha256"]):
            raise PackageError(f"{at}.sha256: must be 64 lowercase hex digits")
        if not isinstance(f["size"], int) or isinstance(f["size"], bool) or f["size"] < 0:
            raise PackageError(f"{at}.size: must be a non-negative integer")
        entries.append(PackageFile(path, f["sha256"], f["size"]))
    dirs = {str(p) for e in entries for p in PurePosixPath(e.path).parents if str(p) != "."}
    clash = dirs & seen
    if clash:
        raise PackageError(f"{label}: {sorted(clash)[0]!r} is listed as a file and used as a "
                           "folder")
    return entries


def parse_manifest(data: bytes, where: str) -> InstalledPackage:
    if len(data) > tomlsafe.MAX_BYTES:
        raise PackageError(f"{where}: larger than {tomlsafe.MAX_BYTES // 1024} KiB")
    try:
        doc = tomlsafe.loads(data.decode("utf-8"))
    except tomlsafe.TomlLimitError as err:
        raise PackageError(f"{where}: {err}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PackageError(f"{where}: not valid TOML ({err})") from err
    unknown = set(doc) - {"package", "files"}
    if unknown:
        raise PackageError(f"{where}: unknown table {sorted(unknown)[0]!r}")
    meta = doc.get("package")
    if not isinstance(meta, dict):
        raise PackageError(f"{where}: missing [package] table")
    for key in meta:
        if key not in ("name", "version", "category", "description"):
            raise PackageError(f"{where}: package.{key}: unknown key")
    for key in ("name", "version"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise PackageError(f"{where}: package.{key}: required, a non-empty string")
    for key in ("category", "description"):
        if not isinstance(meta.get(key, ""), str):
            raise PackageError(f"{where}: package.{key}: must be a string")
    if not NAME_RE.match(meta["name"]):
        raise PackageError(f"{where}: package.name: {meta['name']!r} must be lowercase letters, "
                           "digits, '.', '_' or '-' (at most 64)")
    entries = check_files(doc.get("files"), f"{where}: files", hint=" ([[files]] tables)")
    return InstalledPackage(name=meta["name"], version=meta["version"].strip(),
                            category=meta.get("category", ""),
                            description=meta.get("description", ""), files=entries)


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def render_record(pkg: InstalledPackage) -> str:
    lines = ["[package]"]
    for key in ("name", "version", "category", "description", "installed_at"):
        lines.append(f"{key} = {_toml_str(getattr(pkg, key))}")
    lines.append("dirs = [" + ", ".join(_toml_str(d) for d in pkg.dirs) + "]")
    for f in pkg.files:
        lines += ["", "[[files]]", f"path = {_toml_str(f.path)}", f"sha256 = {_toml_str(f.sha256)}",
                  f"size = {f.size}"]
    return "\n".join(lines) + "\n"


def _read_record(path: Path) -> InstalledPackage:
    """A package record, validated like a manifest: a valid name, and every file and folder a
    plain relative path inside the models directory (a tampered record is refused before
    anything is touched)."""
    try:
        doc = tomlsafe.loads(tomlsafe.read_capped(path).decode("utf-8"))
        meta = doc["package"]
        meta.setdefault("dirs", doc.get("dirs", []))
        pkg = InstalledPackage(
            name=meta["name"], version=meta["version"], category=meta.get("category", ""),
            description=meta.get("description", ""), installed_at=meta.get("installed_at", ""),
            dirs=list(meta.get("dirs", [])),
            files=[PackageFile(f["path"], f["sha256"], int(f["size"])) for f in doc.get("files", [])])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise PackageError(f"{path}: unreadable package record ({err})") from err
    if not isinstance(pkg.name, str) or not NAME_RE.match(pkg.name):
        raise PackageError(f"{path}: package.name {pkg.name!r} is not a package name")
    for i, f in enumerate(pkg.files):
        check_path(f.path, f"{path}: files[{i}].path")
    for i, d in enumerate(pkg.dirs):
        check_path(d, f"{path}: dirs[{i}]")
    return pkg



def _copy_verified(src_file, dest: Path, entry: PackageFile, where: str) -> None:
    """Stream src_file (a binary file object) to dest, checking size and sha256 as it goes."""
    h = hashlib.sha256()
    n = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        while True:
            block = src_file.read(CHUNK)
            if not block:
                break
            n += len(block)
            if n > entry.size:
                raise PackageError(f"{where}: larger than the {entry.size} bytes package.toml lists")
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if n != entry.size:
        raise PackageError(f"{where}: {n} bytes, package.toml lists {entry.size}")
    if h.hexdigest() != entry.sha256:
        raise PackageError(f"{where}: sha256 mismatch (file {h.hexdigest()[:16]}…, package.toml "
                           f"{entry.sha256[:16]}…): the file was changed or corrupted")


# ---------------------------------------------------------------------------------------------
# staging from a folder or a tar.gz
# ---------------------------------------------------------------------------------------------

def _stage_dir(src: Path, staging: Path) -> InstalledPackage:
    manifest = src / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise PackageError(f"{manifest}: missing (not a package folder?)")
    try:
        data = tomlsafe.read_capped(manifest)
    except tomlsafe.TomlLimitError as err:
        raise PackageError(f"{manifest}: {err}") from None
    pkg = parse_manifest(data, str(manifest))
    listed = {f.path for f in pkg.files}
    for root, dirs, files in os.walk(src):
        for name in dirs + files:
            full = Path(root) / name
            rel = full.relative_to(src).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise PackageError(f"{full}: symlinks are refused in a package")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise PackageError(f"{full}: not a regular file (devices, fifos, sockets are refused)")
            if st.st_nlink > 1:  # could be any file of the machine under another name
                raise PackageError(f"{full}: a hard link ({st.st_nlink} names); a package folder "
                                   "holds its own files only")
            if rel != MANIFEST and rel not in listed:
                raise PackageError(f"{full}: not listed in {MANIFEST}")
    for entry in pkg.files:
        path = src / entry.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise PackageError(f"{path}: listed in {MANIFEST} but missing") from None
        except OSError as err:
            raise PackageError(f"{path}: cannot read ({err.strerror})") from err
        with os.fdopen(fd, "rb") as f:
            _copy_verified(f, staging / entry.path, entry, str(path))
    return pkg


def _member_name(m: tarfile.TarInfo, where: str) -> str:
    name = m.name[2:] if m.name.startswith("./") else m.name
    name = name.rstrip("/") if m.isdir() else name
    if m.isdir() and name in ("", "."):
        return ""
    if name == MANIFEST:
        return name
    return check_path(name, f"{where}: member {m.name!r}")


def _stage_tar(src: Path, staging: Path) -> InstalledPackage:
    where = str(src)
    try:
        tar = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise PackageError(f"{src}: not a readable tar archive ({err})") from err
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise PackageError(f"{src}: corrupt archive ({err})") from err
        regular: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = _member_name(m, where)
            if m.issym() or m.islnk():
                raise PackageError(f"{src}: member {m.name!r} is a link (symlinks and hardlinks "
                                   "are refused)")
            if m.isdir():
                continue
            if not m.isreg() or m.issparse():
                raise PackageError(f"{src}: member {m.name!r} is not a regular file (devices, "
                                   "fifos and sparse files are refused)")
            if name in regular:
                raise PackageError(f"{src}: member {name!r} appears twice")
            regular[name] = m
        if MANIFEST not in regular:
            raise PackageError(f"{src}: no {MANIFEST} at the top of the archive")
        try:
            data = tomlsafe.read_capped(tar.extractfile(regular[MANIFEST]))
        except tomlsafe.TomlLimitError as err:
            raise PackageError(f"{src}:{MANIFEST}: {err}") from None
        pkg = parse_manifest(data, f"{src}:{MANIFEST}")
        listed = {f.path for f in pkg.files}
        for name in regular:
            if name != MANIFEST and name not in listed:
                raise PackageError(f"{src}: member {name!r} is not listed in {MANIFEST}")
        for entry in pkg.files:
            m = regular.get(entry.path)
            if m is None:
                raise PackageError(f"{src}: {entry.path!r} is listed in {MANIFEST} but missing")
            f = tar.extractfile(m)
            try:
                _copy_verified(f, staging / entry.path, entry, f"{src}:{entry.path}")
            except (tarfile.TarError, EOFError, OSError) as err:
                if isinstance(err, PackageError):
                    raise
                raise PackageError(f"{src}:{entry.path}: corrupt archive ({err})") from err
    return pkg


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def list_packages(models_dir) -> list[InstalledPackage]:
    rec_dir = Path(models_dir) / RECORDS
    if not rec_dir.is_dir():
        return []
    return [_read_record(p) for p in sorted(rec_dir.glob("*.toml"))]


def owners(models_dir) -> dict[str, str]:
    """models-dir-relative path -> name of the package that installed it."""
    return {f.path: pkg.name for pkg in list_packages(models_dir) for f in pkg.files}


def _os_errors_named(func):
    """OS failures (permissions, a full SD card) become PackageErrors naming the file."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PackageError:
            raise
        except OSError as err:
            where = err.filename or (args[1] if len(args) > 1 else "models directory")
            raise PackageError(f"{where}: {err.strerror or err}") from err
    return wrapper


@_os_errors_named
def install(src, models_dir, *, force: bool = False, replace: bool = False) -> InstalledPackage:
    """Verify and install a package folder or .tar.gz into models_dir (see the module doc).
    `replace` lets it overwrite files that belong to no package (the shipped experts, a
    hand-made config); `force` also takes files over from other packages."""
    src, models_dir = Path(src), Path(models_dir)
    if not models_dir.is_dir():
        raise PackageError(f"{models_dir}: models directory does not exist")
    recover(models_dir)
    if not src.exists():
        raise PackageError(f"{src}: no such package folder or archive")
    staging = Path(os.path.join(models_dir, f"{STAGING_PREFIX}{os.getpid()}-{time.time_ns()}"))
    staging.mkdir()
    with _LIVE_LOCK:
        _LIVE_STAGING.add(staging.name)
    try:
        try:
            pkg = _stage_dir(src, staging) if src.is_dir() else _stage_tar(src, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with dir_lock(models_dir):  # from here on, one install/remove/recovery at a time
            return _install_staged(models_dir, staging, pkg, force, replace)
    finally:
        with _LIVE_LOCK:
            _LIVE_STAGING.discard(staging.name)


def _install_staged(models_dir: Path, staging: Path, pkg: InstalledPackage,
                    force: bool, replace: bool = False) -> InstalledPackage:
    """Journal the staged package and move it into place (the caller holds the lock). Once
    the journal is written, a failure leaves journal + staging for recover() to finish."""
    try:
        old = _existing(models_dir, pkg.name)
        plan = _conflicts(models_dir, pkg, old, force, replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pkg.installed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new_dirs = {str(d) for f in pkg.files for d in PurePosixPath(f.path).parents
                if str(d) != "." and not (models_dir / d).is_dir()}
    pkg.dirs = sorted(new_dirs | set(old.dirs if old else []))
    journal = {
        "name": pkg.name, "staging": staging.name, "files": [f.path for f in pkg.files],
        "record": render_record(pkg), "take_over": plan,
        "remove_old": sorted({f.path for f in old.files} - {f.path for f in pkg.files}) if old else [],
    }
    rec_dir = models_dir / RECORDS
    rec_dir.mkdir(exist_ok=True)
    atomic_write_text(rec_dir / f".journal-{pkg.name}.json", json.dumps(journal))
    _roll_forward(models_dir, journal)
    return pkg


def _existing(models_dir: Path, name: str) -> InstalledPackage | None:
    rec = models_dir / RECORDS / f"{name}.toml"
    return _read_record(rec) if rec.exists() else None


def _conflicts(models_dir: Path, pkg: InstalledPackage, old: InstalledPackage | None,
               force: bool, replace: bool = False) -> dict[str, list[str]]:
    """Files of other packages this install takes over ({package: [paths]}); refuses without
    force (or, for files of no package, without replace)."""
    owned = owners(models_dir)
    take: dict[str, list[str]] = {}
    for f in pkg.files:
        target = models_dir / f.path
        for parent in PurePosixPath(f.path).parents:
            p = models_dir / parent
            if str(parent) != "." and (p.is_symlink() or (p.exists() and not p.is_dir())):
                raise PackageError(f"{p}: exists and is not a folder; {f.path} cannot go there")
        if not (target.exists() or target.is_symlink()):
            continue
        if target.is_dir() and not target.is_symlink():
            raise PackageError(f"{target}: a folder is in the way of {f.path}")
        owner = owned.get(f.path)
        if owner == pkg.name:
            continue
        if owner is None and (replace or force):
            continue
        if not force:
            if owner:
                raise PackageError(f"{target}: belongs to package {owner!r}; refusing to "
                                   f"overwrite it (pkg remove {owner} first, or pkg install "
                                   "--force takes it over)")
            raise PackageError(f"{target}: exists and belongs to no package (a shipped or "
                               "hand-made file); refusing to overwrite it (pkg install "
                               "--replace replaces it)")
        if owner:
            take.setdefault(owner, []).append(f.path)
    return take


def check_journal(journal, where: str) -> dict:
    """A journal read back from disk, validated like a package before recovery acts on it: a
    package name, a staging folder of this package manager's own, plain relative paths, and a
    record for the same package. Anything else is a PackageError (nothing is touched)."""
    if not isinstance(journal, dict) or set(journal) != {"name", "staging", "files", "record",
                                                         "take_over", "remove_old"}:
        raise PackageError(f"{where}: not a journal of this package manager")
    name, staging = journal["name"], journal["staging"]
    if not isinstance(name, str) or not NAME_RE.match(name) or \
            Path(where).name != f".journal-{name}.json":
        raise PackageError(f"{where}: bad package name {name!r}")
    if not isinstance(staging, str) or not re.fullmatch(re.escape(STAGING_PREFIX) + r"[\w.-]+",
                                                         staging):
        raise PackageError(f"{where}: staging {staging!r} is not a staging folder name")
    for key in ("files", "remove_old"):
        if not isinstance(journal[key], list):
            raise PackageError(f"{where}: {key} must be a list")
        for i, rel in enumerate(journal[key]):
            check_path(rel, f"{where}: {key}[{i}]")
    if not isinstance(journal["take_over"], dict):
        raise PackageError(f"{where}: take_over must be a table")
    for other, paths in journal["take_over"].items():
        if not NAME_RE.match(str(other)) or not isinstance(paths, list):
            raise PackageError(f"{where}: take_over[{other!r}] is not a package's file list")
        for i, rel in enumerate(paths):
            check_path(rel, f"{where}: take_over[{other!r}][{i}]")
    if not isinstance(journal["record"], str):
        raise PackageError(f"{where}: record must be text")
    try:
        record = tomlsafe.loads(journal["record"])
        rec_name = record["package"]["name"]
        rec_files = [f["path"] for f in record.get("files", [])]
        rec_dirs = record["package"].get("dirs", record.get("dirs", []))
    except (ValueError, KeyError, TypeError) as err:
        raise PackageError(f"{where}: record is not a package record ({err})") from None
    if rec_name != name:
        raise PackageError(f"{where}: record is for {rec_name!r}, the journal for {name!r}")
    for i, rel in enumerate([*rec_files, *rec_dirs]):
        check_path(rel, f"{where}: record path [{i}]")
    return journal


def _inside(models_dir: Path, rel: str) -> bool:
    """No folder on the way from models_dir to `rel` is a symlink (so writes stay inside)."""
    p = models_dir
    for part in PurePosixPath(rel).parts[:-1]:
        p = p / part
        if p.is_symlink():
            return False
    return True


def _roll_forward(models_dir: Path, journal: dict) -> None:
    """Finish a journaled install; safe to run again after a crash at any point."""
    staging = models_dir / journal["staging"]
    if staging.is_symlink():
        raise PackageError(f"{staging}: a symlink where a staging folder should be; refusing")
    touched = set()
    for rel in journal["files"]:
        staged, target = staging / rel, models_dir / rel
        if not (_inside(models_dir, rel) and _inside(staging, rel)) or staged.is_symlink():
            raise PackageError(f"{target}: a symlink on the way; refusing to install through it")
        if staged.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            touched.add(target.parent)
    for d in touched:
        fsync_dir(d)
    rec_dir = models_dir / RECORDS
    for other, paths in journal["take_over"].items():
        rec = rec_dir / f"{other}.toml"
        if rec.exists():
            o = _read_record(rec)
            o.files = [f for f in o.files if f.path not in set(paths)]
            if o.files:
                atomic_write_text(rec, render_record(o))
            else:  # every file taken over: that package is gone, and `pkg list` says so
                rec.unlink()
    atomic_write_text(rec_dir / f"{journal['name']}.toml", journal["record"])
    for rel in journal["remove_old"]:
        _remove_file(models_dir, rel)
    (rec_dir / f".journal-{journal['name']}.json").unlink(missing_ok=True)
    fsync_dir(rec_dir)
    shutil.rmtree(staging, ignore_errors=True)


def _owner_alive(staging_name: str) -> bool:
    """Is the process that made this staging folder (pid in its name) still running? Then the
    folder is a concurrent install in progress, not debris."""
    m = re.match(re.escape(STAGING_PREFIX) + r"(\d+)-", staging_name)
    if not m:
        return False
    if int(m.group(1)) == os.getpid():  # ours: another thread's install is still staging it
        with _LIVE_LOCK:
            return staging_name in _LIVE_STAGING
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(models_dir, *, timeout: float | None = None) -> list[str]:
    """Finish interrupted installs (journal present) and discard unjournaled staging folders.
    Returns what was done, one line each. Waits for an install or remove in progress to end
    (at most `timeout` seconds: then fsutil.LockTimeout)."""
    models_dir = Path(models_dir)
    with dir_lock(models_dir, timeout):
        return _recover_locked(models_dir)


def has_journal(models_dir) -> bool:
    """Is an install half done (in progress, or killed) in models_dir? One directory read."""
    try:
        with os.scandir(Path(models_dir) / RECORDS) as it:
            return any(e.name.startswith(".journal-") for e in it)
    except OSError:
        return False


def _recover_locked(models_dir: Path) -> list[str]:
    done = []
    rec_dir = models_dir / RECORDS
    journaled = set()
    if rec_dir.is_dir():
        for j in sorted(rec_dir.glob(".journal-*.json")):
            if j.is_symlink():
                raise PackageError(f"{j}: a symlink, not a journal; remove it by hand")
            try:
                journal = jsonsafe.loads(tomlsafe.read_capped(j))
            except (OSError, ValueError):
                j.unlink(missing_ok=True)  # torn journal: written before its fsync'd rename
                continue
            try:
                check_journal(journal, str(j))
            except PackageError as err:
                raise PackageError(f"{err}; nothing was changed: remove {j} by hand if you did "
                                   "not put it there") from None
            journaled.add(journal["staging"])
            # under the lock no install is between its journal and its end: this one was killed
            _roll_forward(models_dir, journal)
            done.append(f"finished the interrupted install of {journal['name']}")
    for d in models_dir.glob(STAGING_PREFIX + "*"):
        if d.name not in journaled and d.is_dir() and not _owner_alive(d.name):
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"discarded an incomplete install ({d.name})")
    return done


def _remove_file(models_dir: Path, rel: str) -> None:
    target = models_dir / check_path(rel, str(models_dir))
    if not _inside(models_dir, rel):
        raise PackageError(f"{target}: a symlink on the way; refusing to delete through it")
    if target.is_file() or target.is_symlink():
        target.unlink()


@_os_errors_named
def remove(name: str, models_dir) -> InstalledPackage:
    """Delete exactly the files recorded for package `name`, then its record."""
    models_dir = Path(models_dir)
    with dir_lock(models_dir):
        return _remove_locked(name, models_dir)


def _remove_locked(name: str, models_dir: Path) -> InstalledPackage:
    _recover_locked(models_dir)
    rec = models_dir / RECORDS / f"{name}.toml"
    if not NAME_RE.match(name) or not rec.exists():
        known = ", ".join(p.name for p in list_packages(models_dir)) or "none installed"
        raise PackageError(f"no installed package named {name!r} (installed: {known})")
    pkg = _read_record(rec)
    for f in pkg.files:
        check_path(f.path, f"{rec}: files")
        _remove_file(models_dir, f.path)
    for d in sorted(pkg.dirs, key=lambda d: -d.count("/")):  # deepest first, only if now empty
        folder = models_dir / check_path(d, f"{rec}: dirs")
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    rec.unlink()
    fsync_dir(rec.parent)
    return pkg
