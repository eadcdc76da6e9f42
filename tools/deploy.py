"""hublab-tools deploy: lay out a models directory / SD-card package that the device installs.

Usage: hublab-tools deploy TARGET [--models FILE ...] [--experts FILE.toml ...] [--router DIR]
                          [--name NAME] [--version V] [--category C] [--description TEXT]
                          [--context N] [--config-name FILE.toml] [--tar] [--force]

--models takes GGUF files (a model TOML is generated for each: the first is written as
--config-name, default model-config.toml, the others as <model name>.toml) or model TOMLs (copied
with their GGUF; its path rewritten to the copy). --experts takes experts/*.toml files made by
`hublab-tools train-expert`: each is copied to experts/ with its LoRA adapter; its base model path
points at a deployed GGUF when it is one, stays as is for pkg:<module>/ paths, and otherwise the
base GGUF is copied too. --router takes a folder with router.onnx and domains.json.

TARGET receives exactly the device layout plus package.toml (name, version, category,
description, and every file's path, sha256 and size), which `pkg install` on the device verifies.
Every TOML is validated with the device's own loader (hublabio.config) before TARGET appears: the
package is built in a temporary folder beside TARGET and renamed into place. --tar also writes
TARGET.tar.gz. Copy TARGET (or the .tar.gz) to the device and run `pkg install` in `hublab`.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from hublabio import config
from hublabio.errors import ConfigError, HublabError, PackageError
from hublabio.fsutil import file_sha256
from hublabio.pkg import MANIFEST, NAME_RE, parse_manifest
from hublabio_tools.common import ToolError, main_guard


class DeployError(ToolError):
    code = "deploy"


@dataclass
class DeployResult:
    target: Path
    files: list[dict]
    tarball: Path | None


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s[:64] or "model"


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DeployError(f"{path}: cannot read TOML ({err})") from err


class _Builder:
    def __init__(self, stage: Path):
        self.stage = stage
        self.copied: dict[Path, str] = {}  # source file (resolved) -> package-relative path

    def copy(self, src: Path, rel: str) -> str:
        src = src.resolve()
        if src in self.copied:
            return self.copied[src]
        if not src.is_file():
            raise DeployError(f"{src}: no such file")
        dest = self.stage / rel
        if dest.exists():
            raise DeployError(f"{rel}: two different files would be deployed under this name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)  # a copy, never a hardlink: the package must not alias sources
        self.copied[src] = rel
        return rel

    def write_toml(self, rel: str, doc: dict, *, expert: bool = False) -> None:
        dest = self.stage / rel
        if dest.exists():
            raise DeployError(f"{rel}: two model files would be written under this name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(tomli_w.dumps(doc), encoding="utf-8")
        try:
            config.load_model_config(dest, require_expert=expert)
        except ConfigError as err:
            raise DeployError(f"generated {rel} does not pass the device's validation: "
                              f"{err.message} ({err.key})") from err


def _model_from_gguf(b: _Builder, gguf: Path, toml_rel: str, name: str, context: int) -> str:
    from hublabio.gguf_info import read_gguf_info

    read_gguf_info(gguf)  # a readable GGUF header, or GGUFError naming the file
    rel = b.copy(gguf, gguf.name)
    b.write_toml(toml_rel, {"model": {"name": name, "type": "gguf", "path": rel},
                            "inference": {"context_size": context}})
    return name


def _model_from_toml(b: _Builder, src: Path, toml_rel: str) -> str:
    doc = _read_toml(src)
    cfg = config.load_model_config(src)
    if cfg.type == "gguf" and not (cfg.path_spec or "").startswith("pkg:"):
        if not cfg.path.is_file():
            raise DeployError(f"{src}: [model] path {cfg.path} does not exist")
        doc["model"]["path"] = b.copy(cfg.path, cfg.path.name)
        if cfg.adapter is not None:
            doc["model"]["adapter"] = b.copy(cfg.adapter, cfg.adapter.name)
    b.write_toml(toml_rel, doc)
    return cfg.name


def _expert(b: _Builder, src: Path) -> str:
    doc = _read_toml(src)
    cfg = config.load_model_config(src, require_expert=True)
    model = doc["model"]
    if cfg.type == "gguf":
        if not (cfg.path_spec or "").startswith("pkg:"):
            base = cfg.path.resolve()
            model["path"] = posixpath.relpath(b.copy(base, base.name), "experts")
        if cfg.adapter is not None:
            rel = b.copy(cfg.adapter, f"experts/{cfg.adapter.name}")
            model["adapter"] = posixpath.relpath(rel, "experts")
    rel = f"experts/{src.name}"
    b.write_toml(rel, doc, expert=True)
    return cfg.name


def _router(b: _Builder, folder: Path) -> None:
    for name in ("router.onnx", "domains.json"):
        if not (folder / name).is_file():
            raise DeployError(f"{folder}: missing {name} (expected the output of train-router)")
        b.copy(folder / name, f"router/{name}")


def deploy(target, *, models=(), experts=(), router=None, name=None, version="1.0.0",
           category="model", description="", context: int = 2048,
           config_name: str = "model-config.toml", tar: bool = False,
           force: bool = False) -> DeployResult:
    target = Path(target)
    models, experts = [Path(m) for m in models], [Path(e) for e in experts]
    if not (models or experts or router):
        raise DeployError("nothing to deploy: give --models, --experts and/or --router")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise DeployError(f"{target}: exists and is not empty (use --force to replace it)")
    name = name or _slug(models[0].stem if models else (experts[0].stem if experts else "router"))
    if not NAME_RE.match(name):
        raise DeployError(f"--name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    if not config_name.endswith(".toml") or "/" in config_name:
        raise DeployError(f"--config-name {config_name!r}: a file name ending in .toml")
    stage = target.with_name(f".{target.name}.deploy-tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        b = _Builder(stage)
        for i, m in enumerate(models):
            toml_rel = config_name if i == 0 else None
            if m.suffix == ".gguf":
                mname = _slug(m.stem) if i or not name else name
                _model_from_gguf(b, m, toml_rel or f"{mname}.toml", mname, context)
            elif m.suffix == ".toml":
                _model_from_toml(b, m, toml_rel or m.name)
            else:
                raise DeployError(f"{m}: --models takes .gguf or model .toml files")
        for e in experts:
            _expert(b, e)
        if router:
            _router(b, Path(router))
        files = []
        for p in sorted(stage.rglob("*")):
            if p.is_file():
                files.append({"path": p.relative_to(stage).as_posix(), "sha256": file_sha256(p),
                              "size": p.stat().st_size})
        manifest = {"package": {"name": name, "version": version, "category": category,
                                "description": description}, "files": files}
        (stage / MANIFEST).write_text(tomli_w.dumps(manifest), encoding="utf-8")
        parse_manifest((stage / MANIFEST).read_bytes(), MANIFEST)  # what pkg install will check
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    except (HublabError, OSError) as err:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(err, (DeployError, PackageError)):
            raise
        raise DeployError(str(err)) from err
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    tarball = None
    if tar:
        tarball = target.with_name(target.name + ".tar.gz")
        tmp = tarball.with_name(f".{tarball.name}.partial")
        with tarfile.open(tmp, "w:gz") as t:
            for entry in [{"path": MANIFEST}] + files:
                info = t.gettarinfo(target / entry["path"], arcname=entry["path"])
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(target / entry["path"], "rb") as f:
                    t.addfile(info, f)
        os.replace(tmp, tarball)
    return DeployResult(target=target, files=files, tarball=tarball)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path, help="folder to create (must be empty or absent)")
    ap.add_argument("--models", nargs="+", default=[], type=Path, help=".gguf or model .toml")
    ap.add_argument("--experts", nargs="+", default=[], type=Path, help="experts/*.toml files")
    ap.add_argument("--router", type=Path, help="folder with router.onnx + domains.json")
    ap.add_argument("--name", help="package name (default: from the first file)")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--category", default="model", help="e.g. model, expert, router, bundle")
    ap.add_argument("--description", default="")
    ap.add_argument("--context", type=int, default=2048,
                    help="context_size in generated model TOMLs (default 2048)")
    ap.add_argument("--config-name", default="model-config.toml",
                    help="file name of the first model's TOML (default model-config.toml)")
    ap.add_argument("--tar", action="store_true", help="also write TARGET.tar.gz")
    ap.add_argument("--force", action="store_true", help="replace a non-empty TARGET")
    args = ap.parse_args(argv)
    try:
        res = deploy(args.target, models=args.models, experts=args.experts, router=args.router,
                     name=args.name, version=args.version, category=args.category,
                     description=args.description, context=args.context,
                     config_name=args.config_name, tar=args.tar, force=args.force)
    except HublabError as err:
        print(f"hublab-tools deploy: {err}", file=sys.stderr)
        return 1
    total = sum(f["size"] for f in res.files)
    print(f"wrote {res.target}: {len(res.files)} files + {MANIFEST}, {total / 2**20:.1f} MiB")
    for f in res.files:
        print(f"  {f['path']}  {f['size']}  {f['sha256'][:16]}…")
    if res.tarball:
        print(f"wrote {res.tarball} ({res.tarball.stat().st_size / 2**20:.1f} MiB)")
    print(f"on the device: hublab -c \"pkg install {res.tarball or res.target}\"")
    return 0


@main_guard
def main_publish(argv: list[str] | None = None) -> int:
    """hublab-tools publish: add a package folder to a package repository folder.

    The package folder is what `hublab-tools deploy` wrote (package.toml with every file's
    sha256), or one with the seed's manifest (top-level name, version, category, description,
    files = [paths]). The repository is a static folder (index.json plus <name>/<version>/);
    serve it with any HTTP server, or carry it on a USB stick, and on the device run
    `pkg repo add <folder|URL>` then `pkg install <name>` (hublabio.repo). A version once
    published is never replaced."""
    from hublabio.repo import publish

    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools publish",
                                 description=main_publish.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path, help="package folder (with package.toml)")
    ap.add_argument("--repo", required=True, help="repository folder (created if needed), or "
                                                  "the URL of a server that takes HTTP PUT")
    args = ap.parse_args(argv)
    res = publish(args.package, args.repo)
    print(f"published {res.name} {res.version} ({len(res.files)} files, "
          f"{res.size / 2**20:.1f} MiB) to {args.repo}")
    print(f"on the device: pkg repo add <{args.repo} or its URL>, then pkg install {res.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
