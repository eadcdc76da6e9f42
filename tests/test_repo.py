"""hublabio.repo: publish to a repository folder; search, install by name[@version], upgrade
from a folder and from a loopback HTTP server (Range resume, a tampered file refused, the size
checked before any download); and pkg install --replace over a shipped file."""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from pathlib import Path

import pytest

from hublabio import pkg, repo
from hublabio.errors import PackageError

from test_pkg import listing, make_dir, models  # noqa: E402,F401  (tests/ is on sys.path; models: a fixture)

V1 = {"demo.toml": b'[model]\nname = "demo"\npath = "demo.gguf"\n',
      "demo.gguf": b"GGUF" + bytes(range(256)) * 400,
      "experts/python.toml": b'[model]\nname = "py"\n'}
V2 = {**V1, "demo.gguf": b"GGUF" + bytes(range(255, -1, -1)) * 400}


@pytest.fixture
def published(tmp_path) -> Path:
    r = tmp_path / "repo"
    repo.publish(make_dir(tmp_path / "v1", name="demo", files=V1, version="1.0.0"), r)
    repo.publish(make_dir(tmp_path / "v2", name="demo", files=V2, version="1.10.0"), r)
    repo.publish(make_dir(tmp_path / "other", name="other-thing",
                          files={"other.toml": b"x"}, version="0.1"), r)
    return r


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static server that honours `Range: bytes=N-` and can cut the first response of a
    file short (the connection drops mid-download)."""

    ranges: list[str] = []
    cut_once: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        rng = self.headers.get("Range")
        start = 0
        if rng:
            self.ranges.append(f"{Path(self.path).name} {rng}")
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        name = Path(self.path).name
        if name in self.cut_once:
            self.cut_once.discard(name)
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def http_repo(published):
    RangeHandler.ranges = []
    RangeHandler.cut_once = set()
    handler = functools.partial(RangeHandler, directory=str(published))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", published
    server.shutdown()
    server.server_close()


def test_publish_writes_an_index_with_every_files_sha256(published):
    index = json.loads((published / "index.json").read_text())
    versions = index["packages"]["demo"]
    assert [v["version"] for v in versions] == ["1.0.0", "1.10.0"]
    files = {f["path"]: f for f in versions[0]["files"]}
    assert files["demo.gguf"]["size"] == len(V1["demo.gguf"])
    assert (published / "demo" / "1.0.0" / "demo.gguf").read_bytes() == V1["demo.gguf"]
    assert (published / "demo" / "1.0.0" / "package.toml").is_file()


def test_a_published_version_is_never_replaced(published, tmp_path):
    before = listing(published)
    with pytest.raises(PackageError, match=r"demo 1\.0\.0 is already in .*raise the version"):
        repo.publish(make_dir(tmp_path / "again", name="demo", files=V2, version="1.0.0"),
                     published)
    assert listing(published) == before


def test_the_seeds_manifest_publishes_too(tmp_path):
    src = tmp_path / "seed-pkg"
    src.mkdir()
    (src / "model-q4_k_m.gguf").write_bytes(b"GGUF seed model")
    (src / "package.toml").write_text(
        'name = "my-custom-model"\nversion = "1.0.0"\ncategory = "ai"\n'
        'description = "Custom trained model for HubLab IO"\nfiles = ["model-q4_k_m.gguf"]\n')
    p = repo.publish(src, tmp_path / "r")
    assert (p.name, p.version, [f.path for f in p.files]) == \
        ("my-custom-model", "1.0.0", ["model-q4_k_m.gguf"])
    (src / "package.toml").write_text('name = "x"\nversion = "1"\nfiles = ["../etc/passwd"]\n')
    with pytest.raises(PackageError, match=r"is not a plain relative path"):
        repo.publish(src, tmp_path / "r")


def test_search_and_versions(published):
    found, problems = repo.search([str(published)])
    assert problems == []
    assert [(p.name, p.version) for p in found] == [("demo", "1.10.0"), ("other-thing", "0.1")]
    assert [p.name for p in repo.search([str(published)], "OTHER")[0]] == ["other-thing"]
    assert repo.version_key("1.10.0") > repo.version_key("1.9.2") > repo.version_key("1.9")
    assert repo.version_key("1.0.0") > repo.version_key("1.0.0-rc1")
    with pytest.raises(PackageError, match=r"no package demo@3 .*versions offered: 1\.0\.0, "
                                           r"1\.10\.0"):
        repo.resolve("demo@3", [str(published)])
    with pytest.raises(PackageError, match="no package repositories configured"):
        repo.resolve("demo", [])


def test_install_by_name_from_a_folder_then_upgrade(published, models):
    installed = repo.install("demo@1.0.0", models, [str(published)])
    assert installed.version == "1.0.0"
    assert (models / "demo.gguf").read_bytes() == V1["demo.gguf"]
    assert not any((models / pkg.RECORDS / repo.DOWNLOADS).iterdir())  # cleaned up
    assert repo.upgrade(models, [str(published)]) == [("demo", "1.0.0", "1.10.0")]
    assert (models / "demo.gguf").read_bytes() == V2["demo.gguf"]
    assert [(p.name, p.version) for p in pkg.list_packages(models)] == [("demo", "1.10.0")]
    assert repo.upgrade(models, [str(published)]) == []


def test_install_over_http_resumes_a_cut_download(http_repo, models):
    url, _ = http_repo
    RangeHandler.cut_once = {"demo.gguf"}
    with pytest.raises(PackageError, match=r"demo\.gguf: ended after \d+ of \d+ bytes \(run the "
                                           r"install again to resume\)"):
        repo.install("demo", models, [url])
    assert not (models / "demo.gguf").exists()  # nothing installed
    partial = models / pkg.RECORDS / repo.DOWNLOADS / "demo-1.10.0" / "demo.gguf"
    half = partial.stat().st_size
    assert 0 < half < len(V2["demo.gguf"])
    repo.install("demo", models, [url])
    assert RangeHandler.ranges == [f"demo.gguf bytes={half}-"]
    assert (models / "demo.gguf").read_bytes() == V2["demo.gguf"]


def test_a_tampered_file_in_the_repository_is_refused(http_repo, models):
    url, folder = http_repo
    target = folder / "demo" / "1.10.0" / "demo.gguf"
    target.write_bytes(target.read_bytes()[:-1] + b"X")  # same size, other bytes
    before = listing(models)
    with pytest.raises(PackageError, match=r"demo\.gguf: sha256 [0-9a-f]{64} does not match the "
                                           r"index .*nothing installed"):
        repo.install("demo", models, [url])
    downloads = models / pkg.RECORDS / repo.DOWNLOADS / "demo-1.10.0"
    assert not (downloads / "demo.gguf").exists()  # the bad download is gone
    assert [r for r in listing(models) if not r[0].startswith(pkg.RECORDS)] == \
        [r for r in before if not r[0].startswith(pkg.RECORDS)]


def test_the_free_space_is_checked_before_anything_is_downloaded(published, models,
                                                                  monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=len(V2["demo.gguf"])))
    with pytest.raises(PackageError, match=r"needs 0\.\d MiB free .*nothing was downloaded"):
        repo.install("demo", models, [str(published)])
    downloads = models / pkg.RECORDS / repo.DOWNLOADS / "demo-1.10.0"
    assert not downloads.exists() or not any(downloads.iterdir())


def test_a_damaged_index_and_an_unreachable_repository_are_named(tmp_path, published):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text('{"format": "hublab-package-repository", "version": 1, '
                                    '"packages": {"x": [{"version": "1", "files": '
                                    '[{"path": "../x", "sha256": "' + "0" * 64 + '", "size": 1}]}]}}')
    with pytest.raises(PackageError, match=r"index\.json: packages\.x\[0\]\.files\[0\]\.path: "
                                           r"'\.\./x' is not a plain relative path"):
        repo.read_index(str(bad))
    found, problems = repo.search([str(bad), "http://127.0.0.1:9", str(published)])
    assert [p.name for p in found] == ["demo", "other-thing"]  # the good one still answers
    assert any("cannot connect" in p for p in problems)
    with pytest.raises(PackageError, match="no package index"):
        repo.read_index(str(tmp_path))


def test_replace_overwrites_a_shipped_file_but_not_another_packages(tmp_path, models):
    (models / "experts").mkdir()
    (models / "experts" / "python.toml").write_text("shipped")
    trained = make_dir(tmp_path / "trained", name="trained-python",
                       files={"experts/python.toml": b"trained"})
    with pytest.raises(PackageError, match=r"belongs to no package .*pkg install --replace"):
        pkg.install(trained, models)
    pkg.install(trained, models, replace=True)
    assert (models / "experts" / "python.toml").read_text() == "trained"
    assert pkg.owners(models)["experts/python.toml"] == "trained-python"
    [listed] = pkg.list_packages(models)
    assert listed.name == "trained-python" and len(listed.files) == 1
    other = make_dir(tmp_path / "other", name="other", files={"experts/python.toml": b"o"})
    with pytest.raises(PackageError, match="belongs to package 'trained-python'"):
        pkg.install(other, models, replace=True)


class PutHandler(RangeHandler):
    """A static server that also stores what is PUT (as WebDAV or a bucket would)."""

    def do_PUT(self):
        path = Path(self.translate_path(self.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_publish_over_http_put_then_install_from_that_url(tmp_path, models):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(PutHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/repo"
    try:
        repo.publish(make_dir(tmp_path / "v1", name="demo", files=V1, version="1.0.0"), url)
        repo.publish(make_dir(tmp_path / "o", name="other", files={"o.toml": b"o"}), url)
        index = json.loads((served / "repo" / "index.json").read_text())
        assert sorted(index["packages"]) == ["demo", "other"]
        with pytest.raises(PackageError, match="already in"):
            repo.publish(make_dir(tmp_path / "again", name="demo", files=V2, version="1.0.0"),
                         url)
        assert repo.install("demo", models, [url]).version == "1.0.0"
        assert (models / "demo.gguf").read_bytes() == V1["demo.gguf"]
    finally:
        server.shutdown()
        server.server_close()
