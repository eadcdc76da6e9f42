"""hublab-tools convert-lora: a peft LoRA adapter -> a GGUF LoRA adapter for llama.cpp.

usage: hublab-tools convert-lora PEFT_DIR --base BASE [--out FILE] [--outtype f32|f16]

PEFT_DIR holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin).
BASE is the base model as an HF checkpoint directory or as the GGUF the adapter will be applied
to; only its architecture, head counts and tensor names are read. The result has
general.type=adapter, adapter.type=lora, adapter.lora.alpha, and per adapted matrix
`<gguf name>.lora_a` (ne=[n_in, r]) and `.lora_b` (ne=[r, n_out]); Llama/Mistral q/k adapters
get the same row permutation as the base weights. peft's per-module scaling (rank_pattern,
alpha_pattern, rsLoRA) is folded into lora_b where llama.cpp's alpha/r cannot express it.
--outtype f16 halves the file and its resident memory on the device (llama.cpp applies F16 LoRA
tensors directly; the logits move by the rounding of the adapter weights only — tests/tools/
test_convert_lora.py); train-expert writes f16. Default output: PEFT_DIR/adapter.lora.gguf.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hublabio_tools.common import gguf_output
from hublabio_tools.convert import OUTTYPES, SafetensorsFile, TorchBinFile, load_config, open_weights
from hublabio_tools.gguf_arch import RULES, ArchRule, ConvertError, gguf_name, permute_rotary, rule_for


class BaseModel:
    """What the adapter conversion needs from its base: rule, head counts, GGUF tensor shapes."""

    def __init__(self, base: Path):
        self.path = base
        if base.is_dir():
            cfg = load_config(base)
            self.hf_arch, self.rule = rule_for(cfg, str(base / "config.json"))
            self.n_layer = int(cfg["num_hidden_layers"])
            self.n_head = int(cfg["num_attention_heads"])
            self.n_kv = int(cfg.get("num_key_value_heads") or self.n_head)
            tmap = gguf.get_tensor_name_map(self.rule.arch, self.n_layer)
            self.shapes = {}  # gguf name -> numpy (out, in) shape
            for name, f in open_weights(base).items():
                dst = gguf_name(tmap, name)
                if dst is not None:
                    self.shapes[dst] = tuple(f.shapes()[name])
            self.name = str(cfg.get("_name_or_path") or base.name).rstrip("/").split("/")[-1]
        elif base.is_file():
            try:
                r = gguf.GGUFReader(base)
            except Exception as e:  # noqa: BLE001 - GGUFReader raises ValueError/struct errors
                raise ConvertError(f"{base}: not a GGUF file ({e})") from None

            def get(key: str, default: Any = None) -> Any:
                f = r.get_field(key)
                return f.contents() if f is not None else default

            arch = get("general.architecture")
            matches = [(n, rl) for n, rl in RULES.items() if gguf.MODEL_ARCH_NAMES[rl.arch] == arch]
            if not matches:
                raise ConvertError(f"{base}: general.architecture {arch!r} is not supported")
            if get("general.type") == "adapter":
                raise ConvertError(f"{base}: is itself an adapter, not a base model")
            self.hf_arch, self.rule = matches[0]
            self.n_layer = int(get(f"{arch}.block_count"))
            self.n_head = int(get(f"{arch}.attention.head_count"))
            self.n_kv = int(get(f"{arch}.attention.head_count_kv", self.n_head))
            self.shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
            self.name = str(get("general.name", base.stem))
        else:
            raise ConvertError(f"--base {base}: no such file or directory")


def _read_adapter(peft_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg_path = peft_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{cfg_path}: missing (a peft adapter directory has adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_path}: invalid JSON (line {e.lineno}): {e.msg}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ConvertError(f"{cfg_path}: use_dora=true (DoRA) has no llama.cpp equivalent")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ConvertError(f"{cfg_path}: key {key!r} is missing or not a number")
    st, binf = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_model.bin"
    f = SafetensorsFile(st) if st.is_file() else TorchBinFile(binf) if binf.is_file() else None
    if f is None:
        raise ConvertError(f"{peft_dir}: no adapter_model.safetensors or adapter_model.bin")
    return cfg, {name: f.read(name) for name in f.shapes()}


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def convert_lora(peft_dir: str | Path, base: str | Path, out_path: str | Path | None = None,
                 outtype: str = "f32", log=print) -> Path:
    """Convert the peft adapter in `peft_dir` for `base` (HF dir or GGUF); returns the GGUF path."""
    peft_dir, base_path = Path(peft_dir), Path(base)
    if outtype not in ("f32", "f16"):
        raise ConvertError(f"--outtype {outtype!r}: adapters are written as f32 or f16")
    acfg, tensors = _read_adapter(peft_dir)
    bm = BaseModel(base_path)
    rule: ArchRule = bm.rule
    tmap = gguf.get_tensor_name_map(rule.arch, bm.n_layer)
    where = str(peft_dir / "adapter_model.safetensors")

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, data in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m is None:
            hint = " (modules_to_save / trained embeddings are not LoRA)" if "modules_to_save" in name \
                or "embed" in name or "lm_head" in name else ""
            raise ConvertError(f"{where}: tensor {name!r} is not a lora_A/lora_B weight{hint}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = data

    r_global, alpha = float(acfg["r"]), float(acfg["lora_alpha"])
    rslora = bool(acfg.get("use_rslora"))
    # llama.cpp applies scale = alpha_gguf / rank; peft applies alpha / r (alpha / sqrt(r) for rsLoRA)
    alpha_gguf = alpha * math.sqrt(r_global) if rslora else alpha
    out_tensors: list[tuple[str, np.ndarray]] = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConvertError(f"{where}: module {module!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{where}: {module!r} lora_A {a.shape} / lora_B {b.shape} do not chain")
        if module.endswith(("embed_tokens", "lm_head")):
            raise ConvertError(f"{where}: LoRA on {module!r} is not supported; target attention/MLP "
                               f"projections")
        dst = gguf_name(tmap, module + ".weight")
        if dst is None:
            raise ConvertError(f"{where}: module {module!r} has no GGUF tensor in {rule.arch.name}")
        if dst not in bm.shapes:
            raise ConvertError(f"{where}: base {bm.path} has no tensor {dst!r} for module {module!r}")
        if tuple(bm.shapes[dst]) != (b.shape[0], a.shape[1]):
            raise ConvertError(f"{where}: {module!r} adapts a ({b.shape[0]}, {a.shape[1]}) matrix but "
                               f"base {dst} is {bm.shapes[dst]}")
        rank = a.shape[0]
        alpha_m = _pattern_value(acfg.get("alpha_pattern"), module, alpha)
        scale = alpha_m / (math.sqrt(rank) if rslora else rank)  # rank_pattern is in the shapes
        fold = scale / (alpha_gguf / rank)
        if abs(fold - 1.0) > 1e-6:
            b = b * np.float32(fold)
        if rule.permute_qk and module.endswith("self_attn.q_proj"):
            b = permute_rotary(b, bm.n_head)
        elif rule.permute_qk and module.endswith("self_attn.k_proj"):
            b = permute_rotary(b, bm.n_kv)
        out_tensors.append((dst + ".lora_a", a))
        out_tensors.append((dst + ".lora_b", b))
    if not out_tensors:
        raise ConvertError(f"{where}: no LoRA tensors found")

    out = Path(out_path) if out_path else peft_dir / "adapter.lora.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    qtype = OUTTYPES[outtype][0]
    with gguf_output(out, gguf.MODEL_ARCH_NAMES[rule.arch]) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(f"{bm.name}-lora")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha_gguf)
        w.add_file_type(int(OUTTYPES[outtype][1]))
        for name, data in out_tensors:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    log(f"wrote {out} (lora for {rule.arch.name.lower()}, {len(out_tensors) // 2} matrices, "
        f"{outtype.upper()}, alpha {alpha_gguf:g}, {out.stat().st_size / 1e6:.2f} MB)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools convert-lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peft_dir", type=Path, help="peft adapter directory")
    ap.add_argument("--base", type=Path, required=True, help="base model: HF directory or GGUF file")
    ap.add_argument("--out", type=Path, help="output .gguf path")
    ap.add_argument("--outtype", default="f32", choices=("f32", "f16"), help="lora_a/lora_b tensor type (default f32; f16 = half the memory)")
    args = ap.parse_args(argv)
    try:
        convert_lora(args.peft_dir, args.base, args.out, args.outtype)
    except ConvertError as e:
        print(f"hublab-tools convert-lora: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
