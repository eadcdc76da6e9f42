"""Workstation `hublab-tools deploy` -> device `pkg install` through the real `hublab` shell and the
daemon it starts: the new model appears in `ai list` without a restart, answers, and `pkg remove`
takes exactly its files away. Tampered, `../` and symlinked packages are refused with nothing
written."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hublabio import config, pkg
from hublabio_tools.deploy import DeployError, deploy


def listing(root: Path) -> list[tuple]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else ""
            out.append((rel, kind, digest))
    return sorted(out)


def hublab(models: Path, stdin: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HUBLAB_MODELS_DIR=str(models))
    return subprocess.run([sys.executable, "-m", "hublabio.shell.main"], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def device_models(tmp_path, smollm2_path) -> Path:
    models = tmp_path / "device-models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "base"\ntype = "gguf"\npath = "{smollm2_path}"\n'
        "[inference]\nmax_tokens = 8\ntemperature = 0.0\ncontext_size = 512\nthreads = 2\n")
    return models


@pytest.fixture
def package(tmp_path, smollm2_path) -> Path:
    """A real deploy of the SmolLM2 GGUF as model `smol-pkg`, with an expert and a router."""
    work = tmp_path / "work"
    work.mkdir()
    adapter = work / "python.lora.gguf"
    adapter.write_bytes(b"GGUF adapter bytes for layout only")
    expert = work / "python.toml"
    expert.write_text(f'[model]\nname = "python-expert"\npath = "{smollm2_path}"\n'
                      'adapter = "python.lora.gguf"\n'
                      '[expert]\ndomain = "python"\nkeywords = ["python", "pandas"]\n')
    router = work / "router"
    router.mkdir()
    (router / "router.onnx").write_bytes(b"onnx bytes for layout only")
    (router / "domains.json").write_text('{"domains": ["python"]}')
    res = deploy(tmp_path / "smol-pkg", models=[smollm2_path], experts=[expert], router=router,
                 name="smol-pkg", version="1.2.0", category="bundle", description="test bundle",
                 context=512, config_name="smol-pkg.toml", tar=True)
    assert res.tarball is not None
    return res.tarball


def test_deploy_layout_validates_with_the_device_loader(package, smollm2_path):
    folder = package.with_name("smol-pkg")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == sorted(["package.toml", "smol-pkg.toml", smollm2_path.name,
                            "experts/python.toml", "experts/python.lora.gguf",
                            "router/router.onnx", "router/domains.json"])
    configs, errors = config.load_model_dir(folder)
    assert not errors and [c.name for c in configs] == ["smol-pkg"]
    assert configs[0].path == folder / smollm2_path.name
    experts, errors = config.load_experts(folder)
    assert not errors and experts[0].path.resolve() == folder / smollm2_path.name  # shared base
    assert experts[0].adapter == folder / "experts/python.lora.gguf"
    manifest = pkg.parse_manifest((folder / "package.toml").read_bytes(), "package.toml")
    assert manifest.name == "smol-pkg" and manifest.version == "1.2.0"
    for f in manifest.files:
        data = (folder / f.path).read_bytes()
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256
    with tarfile.open(package) as t:
        assert sorted(t.getnames()) == sorted(names)


def test_deploy_refuses_bad_input_and_leaves_nothing(tmp_path, smollm2_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "x"\npath = "x.gguf"\ncolour = "red"\n')
    with pytest.raises(Exception) as err:
        deploy(tmp_path / "out", models=[bad])
    assert "colour" in str(err.value)
    with pytest.raises(DeployError, match="nothing to deploy"):
        deploy(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.deploy-tmp"))


def test_pkg_install_makes_the_model_available_without_restart(device_models, package):
    before = listing(device_models)
    run = hublab(device_models, "ai list\n"
                                f"pkg install {package}\n"
                                "ai list\n"
                                "pkg list\n"
                                "ai load smol-pkg\n"
                                "pkg remove smol-pkg\n"
                                "ai list\n")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    first, rest = out.split("Installed smol-pkg 1.2.0", 1)
    assert "smol-pkg" not in first and "base" in first
    assert "Models now available: smol-pkg" in rest
    after_install, after_remove = rest.split("Removed smol-pkg 1.2.0", 1)
    assert "smol-pkg" in after_install and "bundle" in after_install  # ai list + pkg list
    assert "Model loaded" in after_install or "135M" in after_install
    assert "smol-pkg" not in after_remove
    remaining = [e for e in listing(device_models) if not e[0].startswith(".packages")]
    assert remaining == before


def _tampered(src: Path, dest: Path, mutate) -> Path:
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isreg() else None
            m, data = mutate(m, data)
            if m is not None:
                tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


@pytest.mark.parametrize("attack", ["tampered", "dotdot", "symlink"])
def test_bad_packages_are_refused_with_nothing_written(attack, device_models, package, tmp_path):
    def mutate(m, data):
        if attack == "tampered" and m.name == "router/domains.json":
            return m, data.replace(b"python", b"pythoX")
        if attack == "dotdot" and m.name == "router/domains.json":
            m.name = "../../escaped.json"
        if attack == "symlink" and m.name == "router/router.onnx":
            m.type, m.linkname, m.size = tarfile.SYMTYPE, "/etc/passwd", 0
            return m, None
        return m, data

    bad = _tampered(package, tmp_path / f"{attack}.tar.gz", mutate)
    before = listing(device_models)
    run = hublab(device_models, f"pkg install {bad}\n")
    assert run.returncode != 0
    expected = {"tampered": "router/domains.json: sha256 mismatch",
                "dotdot": "'../../escaped.json'", "symlink": "is a link"}[attack]
    assert expected in run.stderr, run.stderr
    assert listing(device_models) == before
    assert not list(tmp_path.rglob("escaped.json"))


@pytest.fixture
def http_repo(tmp_path):
    """A loopback HTTP server over a repository folder (Python's own static file server)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "repo"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_publish_then_install_by_name_over_http(device_models, package, http_repo):
    """The seed's flow: `pkg publish ./` on the workstation, `pkg install <name>` on the device
    from a repository served over HTTP; a tampered file in the repository is refused."""
    folder, url = http_repo
    run = hublab(device_models, f"pkg publish {package.with_name('smol-pkg')} --repo {folder}\n"
                                f"pkg repo add {url}\n"
                                "pkg search smol\n"
                                "pkg install smol-pkg@1.2.0\n"
                                "pkg list\n"
                                "ai list\n")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Published smol-pkg 1.2.0" in out and f"Added package repository {url}" in out
    assert re.search(r"^smol-pkg\s+1\.2\.0\s+-\s+bundle", out, re.M), out  # search row
    assert "Installed smol-pkg 1.2.0" in out and "Models now available: smol-pkg" in out
    run = hublab(device_models, "pkg remove smol-pkg\n")
    assert run.returncode == 0, run.stderr
    gguf = next((folder / "smol-pkg" / "1.2.0").glob("*.gguf"))
    with open(gguf, "r+b") as f:  # one byte changed in the repository's copy
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = listing(device_models)
    run = hublab(device_models, "pkg install smol-pkg\n")
    assert run.returncode == 1
    assert re.search(r"sha256 [0-9a-f]{64} does not match the index .*nothing installed",
                     run.stderr), run.stderr
    assert [r for r in listing(device_models) if not r[0].startswith(".packages")] == \
        [r for r in before if not r[0].startswith(".packages")]
