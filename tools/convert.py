"""hublab-tools convert: a Hugging Face checkpoint directory -> one GGUF file.

usage: hublab-tools convert HF_DIR [--outtype f32|f16|bf16|q8_0] [--out FILE] [--pre NAME]

HF_DIR holds config.json, the weights (model.safetensors, sharded model-*.safetensors with
model.safetensors.index.json, or pytorch_model*.bin) and the tokenizer (tokenizer.json and/or
tokenizer.model, tokenizer_config.json). Supported: Llama, Mistral, Qwen2, Phi-3, Gemma 1/2/3.

Tensors are streamed: the GGUF header is laid out from the safetensors headers, then each tensor
is read, transformed and written in chunks of rows (32 MB of float32 at a time) before the next
is touched, so peak memory stays near the import baseline whatever the model size. The GGUF is
written to a temporary file next to --out and renamed only when complete. Default output:
HF_DIR/<name>-<OUTTYPE>.gguf.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hublabio_tools.common import gguf_output
from hublabio_tools.gguf_arch import ConvertError, TensorPlan, plan_tensors, rule_for, write_hparams
from hublabio_tools.gguf_vocab import add_vocab

OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsFile:
    """Minimal lazy safetensors reader: parses the header, reads one tensor at a time with a
    plain file read (no mmap kept around, so pages do not pile up in RSS). BF16 -> float32."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100_000_000:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: not a safetensors file ({e})") from None
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            if e.get("dtype") not in _ST_DTYPES:
                raise ConvertError(f"{path}: tensor {name!r} has dtype {e.get('dtype')!r}; "
                                   f"only F32/F16/BF16/F64 checkpoints can be converted")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.entries.items()}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows[start:stop] of it, which are contiguous on disk) as float32."""
        e = self.entries[name]
        dtype = _ST_DTYPES[e["dtype"]]
        shape = list(e["shape"])
        begin, end = e["data_offsets"]
        itemsize = np.dtype(dtype).itemsize
        if (end - begin) != int(np.prod(shape)) * itemsize:
            raise ConvertError(f"{self.path}: tensor {name!r}: data_offsets do not match shape {shape}")
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin += rows.start * row_bytes
            shape[0] = rows.stop - rows.start
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            a = np.fromfile(f, dtype=dtype, count=count)
        if a.size != count:
            raise ConvertError(f"{self.path}: tensor {name!r} is truncated")
        if e["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False).reshape(shape)


class TorchBinFile:
    """pytorch_model*.bin, loaded with mmap + weights_only (torch imported only for this)."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            self.sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds
            raise ConvertError(f"{path}: cannot load PyTorch weights ({e})") from None
        for name, t in self.sd.items():
            if not t.is_floating_point():
                raise ConvertError(f"{path}: tensor {name!r} has dtype {t.dtype}; only float "
                                   f"checkpoints can be converted")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.sd.items()}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        t = self.sd[name] if rows is None else self.sd[name][rows]
        return t.float().numpy()


def open_weights(hf_dir: Path) -> dict[str, Any]:
    """tensor name -> file object holding it (sharded checkpoints via their index)."""
    for index_name, single, cls in (("model.safetensors.index.json", "model.safetensors", SafetensorsFile),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinFile)):
        index = hf_dir / index_name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConvertError(f"{index}: no usable 'weight_map' ({e})") from None
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not (hf_dir / shard).is_file():
                    raise ConvertError(f"{index}: shard {shard!r} is listed but missing from {hf_dir}")
                files[shard] = cls(hf_dir / shard)
            owner = {}
            for name, shard in weight_map.items():
                if name not in files[shard].shapes():
                    raise ConvertError(f"{index}: tensor {name!r} is not in shard {shard!r}")
                owner[name] = files[shard]
            return owner
        if (hf_dir / single).is_file():
            f = cls(hf_dir / single)
            return {name: f for name in f.shapes()}
    raise ConvertError(f"{hf_dir}: no weights found (model.safetensors, model.safetensors.index.json "
                       f"or pytorch_model.bin)")


def load_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    if not path.is_file():
        raise ConvertError(f"{path}: missing (an HF checkpoint directory has config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON (line {e.lineno}): {e.msg}") from None
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def _out_type(plan: TensorPlan, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if plan.force_f32 or len(plan.shape) < 2:
        return gguf.GGMLQuantizationType.F32  # norms, biases, rope factors: always F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and plan.shape[-1] % 32 != 0:
        return gguf.GGMLQuantizationType.F16  # rows not a multiple of the Q8_0 block
    return qtype


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return gguf.quants.quantize(data, qtype)
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


CHUNK_BYTES = 32 << 20  # float32 bytes converted at a time (a few rows of the largest matrices)


def _row_chunks(p: TensorPlan) -> list[slice | None]:
    """Row ranges to convert one after the other; None = the whole (small or generated) tensor."""
    if p.generated is not None or len(p.shape) < 2:
        return [None]
    row_bytes = int(np.prod(p.shape[1:])) * 4
    step = max(p.row_align, (CHUNK_BYTES // row_bytes) // p.row_align * p.row_align)
    if step >= p.shape[0]:
        return [None]
    return [slice(i, min(i + step, p.shape[0])) for i in range(0, p.shape[0], step)]


def _write_chunk(fout, data: np.ndarray) -> int:
    data.tofile(fout)
    return data.nbytes


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], int, Any]:
    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, int(np.prod(shape)) * 4, np.float32
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, int(np.prod(shape)) * 2, np.float16
    bshape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return bshape, int(np.prod(bshape)), np.uint8


def convert(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16",
            pre: str | None = None, log=print) -> Path:
    """Convert `hf_dir` to GGUF; returns the output path. Raises ConvertError on bad input."""
    hf_dir = Path(hf_dir)
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    qtype, ftype = OUTTYPES[outtype]
    cfg = load_config(hf_dir)
    where = str(hf_dir / "config.json")
    hf_arch, rule = rule_for(cfg, where)
    if hf_arch == "MistralForCausalLM" and cfg.get("sliding_window"):
        log(f"note: sliding_window={cfg['sliding_window']} is not applied by llama.cpp's llama "
            f"architecture; outputs match transformers up to that many tokens of context")
    weights = open_weights(hf_dir)
    shapes = {name: f.shapes()[name] for name, f in weights.items()}
    plans = plan_tensors(rule, cfg, shapes, where)
    embd = next((p for p in plans if p.dst == "token_embd.weight"), None)
    if embd is None:
        raise ConvertError(f"{hf_dir}: no token embedding tensor (model.embed_tokens.weight)")
    n_vocab = embd.shape[0]

    name = str(cfg.get("_name_or_path") or hf_dir.resolve().name).rstrip("/").split("/")[-1] or "model"
    out_path = Path(out) if out else hf_dir / f"{name}-{outtype.upper()}.gguf"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with gguf_output(out_path, gguf.MODEL_ARCH_NAMES[rule.arch]) as w:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        write_hparams(w, hf_arch, rule, cfg, where, n_vocab)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_vocab(w, hf_dir, rule, n_vocab, pre_override=pre)
        kinds = []
        for p in plans:
            kind = _out_type(p, qtype)
            kinds.append(kind)
            bshape, nbytes, dt = _byte_shape(p.shape, kind)
            w.add_tensor_info(p.dst, bshape, np.dtype(dt), nbytes,
                              raw_dtype=None if dt is not np.uint8 else kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for p, kind in zip(plans, kinds, strict=True):
            # stream: rows are read, transformed, encoded and written chunk by chunk, laid out
            # exactly as GGUFWriter.write_tensor_data would (aligned start, padded end)
            ti = w.tensors[0].pop(p.dst)
            w.write_padding(fout, fout.tell())
            written = 0
            for rows in _row_chunks(p):
                if p.generated is not None:
                    data = p.generated
                else:
                    data = weights[p.src].read(p.src, rows)
                if p.transform is not None:
                    data = p.transform(data, p.shape[0] if rows is not None else None)
                expect = p.shape if rows is None else (rows.stop - rows.start, *p.shape[1:])
                if tuple(data.shape) != tuple(expect):
                    raise ConvertError(f"{hf_dir}: tensor {p.src!r} has shape {data.shape}, "
                                       f"header says {p.shape}")
                written += _write_chunk(fout, _encode(np.ascontiguousarray(data), kind))
                del data
            if written != ti.nbytes:
                raise ConvertError(f"{hf_dir}: tensor {p.src!r}: wrote {written} bytes, expected {ti.nbytes}")
            w.write_padding(fout, written)
    log(f"wrote {out_path} ({rule.arch.name.lower()}, {outtype}, {len(plans)} tensors, "
        f"tokenizer {vocab.model}/{vocab.pre} from {Path(vocab.source).name}, "
        f"{out_path.stat().st_size / 1e6:.1f} MB)")
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("--outtype", default="f16", choices=sorted(OUTTYPES), help="tensor type (default f16)")
    ap.add_argument("--out", type=Path, help="output .gguf path")
    ap.add_argument("--pre", help="declare the BPE pre-tokenizer (gpt-2, smollm, llama-bpe, qwen2) "
                                  "when tokenizer.json's is not recognised")
    args = ap.parse_args(argv)
    try:
        convert(args.hf_dir, args.out, args.outtype, pre=args.pre)
    except ConvertError as e:
        print(f"hublab-tools convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
