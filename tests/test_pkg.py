"""hublabio.pkg: verified, atomic install / list / remove of deploy packages (real files and tars)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from hublabio import pkg
from hublabio.errors import PackageError


def listing(root: Path) -> list[tuple]:
    """Everything under root: (path, kind, size, sha256) - the before/after comparison."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out.append((rel, "link", os.readlink(p), ""))
            elif p.is_dir():
                out.append((rel, "dir", 0, ""))
            else:
                data = p.read_bytes()
                out.append((rel, "file", len(data), hashlib.sha256(data).hexdigest()))
    return sorted(out)


def manifest(name: str, files: dict[str, bytes], version: str = "1.0.0", **override) -> str:
    lines = ["[package]", f'name = "{name}"', f'version = "{version}"', 'category = "model"',
             'description = "test package"']
    for path, data in files.items():
        entry = {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        entry.update(override.get(path, {}))
        lines += ["", "[[files]]", f'path = {json.dumps(entry["path"])}', f'sha256 = "{entry["sha256"]}"',
                  f'size = {entry["size"]}']
    return "\n".join(lines) + "\n"


FILES = {
    "demo.toml": b'[model]\nname = "demo"\npath = "demo.gguf"\n',
    "demo.gguf": b"GGUF" + bytes(range(256)) * 40,
    "experts/python.toml": b'[model]\nname = "py"\n',
    "router/domains.json": b'{"domains": ["python"]}',
}


def make_dir(root: Path, name="demo", files=FILES, **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "package.toml").write_text(manifest(name, files, **kw))
    return root


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.fixture
def models(tmp_path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "model-config.toml").write_text('[model]\nname = "base"\npath = "base.gguf"\n')
    return d


def test_install_list_remove_folder(tmp_path, models):
    before = listing(models)
    installed = pkg.install(make_dir(tmp_path / "p"), models)
    assert installed.name == "demo" and installed.version == "1.0.0"
    for path, data in FILES.items():
        assert (models / path).read_bytes() == data
    assert not list(models.glob(".pkg-staging-*"))
    [listed] = pkg.list_packages(models)
    assert listed.name == "demo" and {f.path for f in listed.files} == set(FILES)
    assert listed.size == sum(len(d) for d in FILES.values())
    assert pkg.owners(models)["demo.gguf"] == "demo"
    removed = pkg.remove("demo", models)
    assert removed.name == "demo"
    after = [e for e in listing(models) if not e[0].startswith(".packages")]
    assert after == before  # exactly the package's files (and the folders it made) are gone
    assert pkg.list_packages(models) == []


def test_install_tar_gz(tmp_path, models):
    members = [reg("package.toml", manifest("demo", FILES).encode())]
    members += [reg(p, d) for p, d in FILES.items()]
    installed = pkg.install(make_tar(tmp_path / "demo.tar.gz", members), models)
    assert {f.path for f in installed.files} == set(FILES)
    assert (models / "experts/python.toml").read_bytes() == FILES["experts/python.toml"]


def test_tampered_file_is_refused_and_nothing_written(tmp_path, models):
    src = make_dir(tmp_path / "p")
    (src / "demo.gguf").write_bytes(FILES["demo.gguf"][:-1] + b"X")  # same size, other bytes
    before = listing(models)
    with pytest.raises(PackageError) as err:
        pkg.install(src, models)
    assert "demo.gguf" in str(err.value) and "sha256" in str(err.value)
    assert listing(models) == before
    (src / "demo.gguf").write_bytes(FILES["demo.gguf"] + b"extra")
    with pytest.raises(PackageError, match="demo.gguf: larger than"):
        pkg.install(src, models)
    assert listing(models) == before


@pytest.mark.parametrize("bad", ["../evil.toml", "experts/../../evil", "/etc/evil", "a//b",
                                 "./x", ".packages/demo.toml", "C:/x", "a\\b", "a\x08b"])
def test_unsafe_paths_in_manifest_are_refused(bad, tmp_path, models):
    src = make_dir(tmp_path / "p", files={"demo.toml": FILES["demo.toml"]})
    data = b"evil"
    (src / "package.toml").write_text(manifest("demo", {bad: data}))
    before = listing(models)
    with pytest.raises(PackageError) as err:
        pkg.install(src, models)
    assert "package.toml" in str(err.value) and "files[0].path" in str(err.value)
    assert listing(models) == before
    assert not (tmp_path / "evil.toml").exists()


def test_dotdot_member_in_tar_is_refused(tmp_path, models):
    files = {"demo.toml": FILES["demo.toml"]}
    members = [reg("package.toml", manifest("demo", files).encode()), reg("demo.toml", files["demo.toml"]),
               reg("../escape.txt", b"boom")]
    before = listing(models)
    with pytest.raises(PackageError, match=r"'\.\./escape\.txt'"):
        pkg.install(make_tar(tmp_path / "x.tar.gz", members), models)
    assert listing(models) == before and not (tmp_path / "escape.txt").exists()


def test_symlinks_are_refused(tmp_path, models):
    src = make_dir(tmp_path / "p")
    os.remove(src / "demo.gguf")
    (tmp_path / "outside.gguf").write_bytes(FILES["demo.gguf"])
    os.symlink(tmp_path / "outside.gguf", src / "demo.gguf")
    before = listing(models)
    with pytest.raises(PackageError, match="demo.gguf: symlinks are refused"):
        pkg.install(src, models)
    assert listing(models) == before

    link = tarfile.TarInfo("demo.gguf")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members = [reg("package.toml", manifest("demo", FILES).encode()), (link, None)]
    with pytest.raises(PackageError, match="is a link"):
        pkg.install(make_tar(tmp_path / "s.tar.gz", members), models)
    hard = tarfile.TarInfo("demo.gguf")
    hard.type, hard.linkname = tarfile.LNKTYPE, "package.toml"
    members = [reg("package.toml", manifest("demo", FILES).encode()), (hard, None)]
    with pytest.raises(PackageError, match="is a link"):
        pkg.install(make_tar(tmp_path / "h.tar.gz", members), models)
    dev = tarfile.TarInfo("demo.gguf")
    dev.type = tarfile.CHRTYPE
    members = [reg("package.toml", manifest("demo", FILES).encode()), (dev, None)]
    with pytest.raises(PackageError, match="not a regular file"):
        pkg.install(make_tar(tmp_path / "d.tar.gz", members), models)
    assert listing(models) == before


def test_unlisted_missing_and_wrong_size_files_are_refused(tmp_path, models):
    before = listing(models)
    src = make_dir(tmp_path / "a")
    (src / "surprise.bin").write_bytes(b"?")
    with pytest.raises(PackageError, match="surprise.bin: not listed in package.toml"):
        pkg.install(src, models)
    src = make_dir(tmp_path / "b")
    os.remove(src / "router/domains.json")
    with pytest.raises(PackageError, match="domains.json: listed in package.toml but missing"):
        pkg.install(src, models)
    src = make_dir(tmp_path / "c", **{"demo.toml": {"size": 3}})
    with pytest.raises(PackageError, match="demo.toml: larger than the 3 bytes"):
        pkg.install(src, models)
    members = [reg("package.toml", manifest("demo", FILES).encode()), reg("demo.toml", FILES["demo.toml"])]
    with pytest.raises(PackageError, match="'demo.gguf' is listed in package.toml but missing"):
        pkg.install(make_tar(tmp_path / "m.tar.gz", members), models)
    assert listing(models) == before


def test_bad_manifests_name_the_key(tmp_path, models):
    src = make_dir(tmp_path / "p")
    (src / "package.toml").write_text(manifest("Bad Name!", FILES))
    with pytest.raises(PackageError, match="package.name"):
        pkg.install(src, models)
    (src / "package.toml").write_text(manifest("demo", FILES, **{"demo.gguf": {"sha256": "abc"}}))
    with pytest.raises(PackageError, match=r"files\[1\].sha256"):
        pkg.install(src, models)
    (src / "package.toml").write_text("[package\nname=")
    with pytest.raises(PackageError, match="not valid TOML"):
        pkg.install(src, models)


def test_files_of_other_packages_and_unowned_files_need_force(tmp_path, models):
    pkg.install(make_dir(tmp_path / "one", name="one", files={"shared.gguf": b"one"}), models)
    two = make_dir(tmp_path / "two", name="two", files={"shared.gguf": b"two!", "two.toml": b"x"})
    before = listing(models)
    with pytest.raises(PackageError, match="belongs to package 'one'"):
        pkg.install(two, models)
    assert listing(models) == before
    pkg.install(two, models, force=True)
    assert (models / "shared.gguf").read_bytes() == b"two!"
    assert pkg.owners(models)["shared.gguf"] == "two"
    # "one" lost its only file: it is no longer installed (pkg list showed it with 0 files)
    assert [p.name for p in pkg.list_packages(models)] == ["two"]
    with pytest.raises(PackageError, match="no installed package named 'one'"):
        pkg.remove("one", models)
    assert (models / "shared.gguf").read_bytes() == b"two!"
    three = make_dir(tmp_path / "three", name="three", files={"a.gguf": b"a", "b.gguf": b"b"})
    pkg.install(three, models)
    four = make_dir(tmp_path / "four", name="four", files={"a.gguf": b"A"})
    pkg.install(four, models, force=True)  # takes one of three's two files
    assert pkg.remove("three", models).files[0].path == "b.gguf"  # keeps the one it still owns
    assert (models / "a.gguf").read_bytes() == b"A" and not (models / "b.gguf").exists()
    cfg = make_dir(tmp_path / "cfg", name="cfg", files={"model-config.toml": b"[model]\n"})
    with pytest.raises(PackageError, match="belongs to no package"):
        pkg.install(cfg, models)


def test_upgrade_replaces_files_and_drops_old_ones(tmp_path, models):
    pkg.install(make_dir(tmp_path / "v1", files=FILES), models)
    v2_files = {"demo.toml": b'[model]\nname = "demo2"\n', "demo.gguf": b"GGUF-v2"}
    pkg.install(make_dir(tmp_path / "v2", files=v2_files, version="2.0.0"), models)
    [p] = pkg.list_packages(models)
    assert p.version == "2.0.0" and {f.path for f in p.files} == set(v2_files)
    assert (models / "demo.gguf").read_bytes() == b"GGUF-v2"
    assert not (models / "experts/python.toml").exists()
    pkg.remove("demo", models)
    assert not (models / "experts").exists() and not (models / "router").exists()


def test_power_loss_during_commit_is_finished_by_recovery(tmp_path, models, monkeypatch):
    src = make_dir(tmp_path / "p")
    real_replace = os.replace
    calls = []

    def dying_replace(a, b):
        calls.append(b)
        if len(calls) == 3:  # journal written, two files moved, then the power goes
            raise KeyboardInterrupt("power loss")
        return real_replace(a, b)

    monkeypatch.setattr(pkg.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        pkg.install(src, models)
    monkeypatch.setattr(pkg.os, "replace", real_replace)
    assert list((models / ".packages").glob(".journal-*"))
    assert pkg.recover(models) == ["finished the interrupted install of demo"]
    for path, data in FILES.items():
        assert (models / path).read_bytes() == data
    assert [p.name for p in pkg.list_packages(models)] == ["demo"]
    assert not list(models.glob(".pkg-staging-*"))


def test_power_loss_before_the_journal_leaves_the_old_state(tmp_path, models):
    before = listing(models)
    dead = models / ".pkg-staging-4194305-456"  # above Linux's pid_max: no such process
    dead.mkdir()
    (dead / "demo.gguf").write_bytes(b"half")
    live = models / f".pkg-staging-{os.getppid()}-789"  # a concurrent install still running
    live.mkdir()
    assert pkg.recover(models) == ["discarded an incomplete install (.pkg-staging-4194305-456)"]
    assert live.is_dir()
    live.rmdir()
    assert listing(models) == before


def test_remove_unknown_package(models):
    with pytest.raises(PackageError, match="no installed package named 'nope'"):
        pkg.remove("nope", models)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_models_dir_is_a_package_error(tmp_path, models):
    models.chmod(0o555)
    try:
        with pytest.raises(PackageError, match="Permission denied"):
            pkg.install(make_dir(tmp_path / "p"), models)
    finally:
        models.chmod(0o755)


def test_os_errors_become_package_errors(tmp_path, models, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(models / "demo.gguf"))

    monkeypatch.setattr(pkg, "_copy_verified", full_disk)
    before = listing(models)
    with pytest.raises(PackageError, match="demo.gguf: No space left on device"):
        pkg.install(make_dir(tmp_path / "p"), models)
    assert listing(models) == before


@pytest.mark.parametrize("tail,fragment", [
    ("# " + "x" * (2 << 20) + "\n", "larger than 1024 KiB"),   # a huge manifest, never read whole
    ("x = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("size_hint = " + "9" * 5000 + "\n", "a number is too long")])
def test_hostile_manifests_are_package_errors(tmp_path, models, tail, fragment):
    for kind in ("dir", "tar"):
        src = make_dir(tmp_path / f"p-{kind}")
        text = (src / "package.toml").read_text()
        (src / "package.toml").write_text(text + tail)
        if kind == "tar":
            members = [reg(path, data) for path, data in FILES.items()]
            members.append(reg("package.toml", (src / "package.toml").read_bytes()))
            src = make_tar(tmp_path / "p.tar.gz", members)
        with pytest.raises(PackageError, match=fragment):
            pkg.install(src, models)
        assert pkg.list_packages(models) == []


def _journal(models: Path, **override) -> Path:
    rec = models / ".packages"
    rec.mkdir(exist_ok=True)
    journal = {"name": "evil", "staging": ".pkg-staging-999999999-x", "files": ["demo.gguf"],
               "record": '[package]\nname = "evil"\nversion = "1"\n', "take_over": {},
               "remove_old": []}
    journal.update(override)
    path = rec / f".journal-{journal['name']}.json"
    path.write_text(json.dumps(journal))
    return path


@pytest.mark.parametrize("override,fragment", [
    ({"files": ["../../outside.txt"]}, "files[0]"),
    ({"remove_old": ["/etc/hostname"]}, "remove_old[0]"),
    ({"staging": "../../tmp"}, "not a staging folder name"),
    ({"take_over": {"other": ["../x"]}}, "take_over['other'][0]"),
    ({"record": '[package]\nname = "other"\nversion = "1"\n'}, "record is for 'other'"),
    ({"record": '[package]\nname = "evil"\nversion = "1"\n[[files]]\npath = "../../x"\n'
                'sha256 = "0"\nsize = 1\n'}, "record path"),
    ({"extra": 1}, "not a journal of this package manager")])
def test_a_planted_journal_is_refused_and_touches_nothing(tmp_path, models, override, fragment):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    journal = _journal(models, **override)
    before = listing(models)
    for action in (lambda: pkg.recover(models), lambda: pkg.install(make_dir(tmp_path / "p"),
                                                                    models)):
        with pytest.raises(PackageError) as err:
            action()
        assert fragment in str(err.value) and "remove" in str(err.value)
    assert outside.read_text() == "keep me" and listing(models) == before and journal.exists()


def test_a_journal_cannot_delete_or_write_through_a_symlinked_folder(tmp_path, models):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.gguf").write_text("keep me")
    (models / "link").symlink_to(elsewhere, target_is_directory=True)
    _journal(models, remove_old=["link/victim.gguf"], files=[])
    with pytest.raises(PackageError, match="symlink on the way"):
        pkg.recover(models)
    assert (elsewhere / "victim.gguf").read_text() == "keep me"


def test_a_tampered_record_is_refused_before_anything_is_deleted(tmp_path, models):
    pkg.install(make_dir(tmp_path / "p"), models)
    rec = models / ".packages" / "demo.toml"
    rec.write_text(rec.read_text() + '\n[[files]]\npath = "../../outside.txt"\nsha256 = "'
                   + "0" * 64 + '"\nsize = 1\n')
    before = listing(models)
    with pytest.raises(PackageError, match=r"files\[\d+\]\.path"):
        pkg.remove("demo", models)
    assert listing(models) == before  # not one of its files was deleted first


def test_the_daemon_finishes_an_interrupted_install_before_serving(tmp_path, models, monkeypatch):
    import shutil
    import tempfile

    from hublabio.client import Client
    from hublabio.config import DaemonSettings
    from hublabio.daemon.server import start_in_thread

    real_replace, calls = os.replace, []

    def dying_replace(a, b):
        calls.append(b)
        if len(calls) == 3:
            raise KeyboardInterrupt("power loss")
        return real_replace(a, b)

    monkeypatch.setattr(pkg.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        pkg.install(make_dir(tmp_path / "p"), models)
    monkeypatch.setattr(pkg.os, "replace", real_replace)
    torn = models / ".packages" / ".demo.toml.x1y2.tmp"  # a record write killed mid-way
    torn.write_text("half")
    os.utime(torn, (1, 1))
    sock = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    handle = start_in_thread(DaemonSettings(models_dir=models), sock / "d.sock")
    try:  # by the time it answers, the install is complete
        with Client(handle.socket_path) as c:
            assert c.call("hello")
        for path, data in FILES.items():
            assert (models / path).read_bytes() == data
        assert not list((models / ".packages").glob(".journal-*"))
        assert not torn.exists()  # and what killed writers left there is cleaned up
    finally:
        handle.stop()
        shutil.rmtree(sock, ignore_errors=True)


def test_folder_packages_refuse_hard_links(tmp_path, models):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(FILES["demo.gguf"])
    src = make_dir(tmp_path / "p")
    (src / "demo.gguf").unlink()
    os.link(secret, src / "demo.gguf")  # same bytes, so only the link itself is wrong
    with pytest.raises(PackageError, match="a hard link"):
        pkg.install(src, models)
    assert pkg.list_packages(models) == []


def test_temp_files_of_killed_writers_are_removed_by_age(tmp_path):
    import time

    from hublabio.fsutil import remove_stale_temps

    old, fresh = tmp_path / ".settings.toml.abc.tmp", tmp_path / ".settings.toml.def.tmp"
    old.write_text("x")
    fresh.write_text("y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temps(tmp_path) == [old]
    assert fresh.exists() and not old.exists()


def test_installs_from_several_threads_all_land(tmp_path, models):
    """The models-dir lock serializes them (one descriptor per call: threads too, no deadlock)."""
    import threading

    errors = []

    def one(i):
        files = {f"m{i}.toml": f'[model]\nname = "m{i}"\npath = "m{i}.gguf"\n'.encode(),
                 f"m{i}.gguf": b"GGUF" + bytes([i]) * 5000}
        try:
            pkg.install(make_dir(tmp_path / f"p{i}", name=f"pk{i}", files=files), models)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(p.name for p in pkg.list_packages(models)) == [f"pk{i}" for i in range(6)]
    assert not list(models.glob(pkg.STAGING_PREFIX + "*"))
    assert not pkg.has_journal(models)


def test_recovery_in_one_thread_keeps_another_threads_staging(tmp_path, models, monkeypatch):
    """Recovery discards staging folders of dead processes only: the daemon's own threads
    stage concurrently under one pid (the race CI hit: another install's recover() removed
    a folder still being filled)."""
    import threading

    copying, go_on = threading.Event(), threading.Event()
    real_copy = pkg._copy_verified

    def slow_copy(*args, **kwargs):
        copying.set()
        assert go_on.wait(30)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pkg, "_copy_verified", slow_copy)
    errors = []
    src = make_dir(tmp_path / "p", name="slow", files={"slow.toml": b'[model]\nname = "slow"\n'})

    def install():
        try:
            pkg.install(src, models)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=install)
    t.start()
    assert copying.wait(30)
    debris = models / f"{pkg.STAGING_PREFIX}{os.getpid()}-1"  # ours, but no install fills it
    debris.mkdir()
    done = pkg.recover(models)
    go_on.set()
    t.join(30)
    assert errors == []
    assert [p.name for p in pkg.list_packages(models)] == ["slow"]
    assert done == [f"discarded an incomplete install ({debris.name})"]


def test_recovery_waits_for_an_install_in_progress(models):
    from hublabio.fsutil import LockTimeout, dir_lock

    with dir_lock(models):  # another process moving files into place
        with pytest.raises(LockTimeout, match="locked by another process"):
            pkg.recover(models, timeout=0.2)
    assert pkg.recover(models, timeout=0.2) == []
