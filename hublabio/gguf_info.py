"""What a GGUF file holds, read from its header only (no weights are loaded).

`read_gguf_info(path) -> ModelInfo`: architecture, parameter count, quantization, layers,
heads, KV heads, head size, training context, vocabulary, chat template, tensor bytes.

The header is parsed here with a small bounds-checked reader over an mmap rather than with
gguf.GGUFReader, which also builds numpy views of every tokenizer array (about 2 s for
SmolLM2 on a loaded 2-core x86 box; this reader: tens of ms). Any damage (truncated header or
tensor data, wrong magic, absurd counts, a directory, an empty file) is a `GGUFError` naming the
file and what is wrong, never another exception.
"""

from __future__ import annotations

import mmap
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from hublabio.errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types → struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are skipped (only their length is kept): tokenizer tables.
_KEEP_ARRAY_MAX = 1024
# Limits on what a header may hold, so that a hostile file costs bounded memory and time. They
# are far above any real model's (SmolLM2: 37 keys, 272 tensors, a 3 KB chat template) and
# include llama.cpp's own: no arrays of arrays, no duplicate keys, tensor names under
# GGML_MAX_NAME (64 bytes), at most GGML_MAX_DIMS (4) dimensions.
MAX_KEYS = 65536
MAX_TENSORS = 65536
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 1 << 20       # one metadata string (a chat template)
MAX_ITEM_BYTES = 64 << 10        # one string in an array (a token, a merge)
MAX_TENSOR_NAME_BYTES = 63       # GGML_MAX_NAME - 1
MAX_DIMS = 4                     # GGML_MAX_DIMS
MAX_KEPT_BYTES = 16 << 20        # strings kept in memory, all keys together


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    n_elements: int
    n_bytes: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    file_size: int
    architecture: str
    name: str | None
    general_type: str             # "model" | "adapter"
    parameters: int               # sum of tensor elements
    quantization: str             # "Q4_1", "Q4_K_M", "F16", ...
    layers: int                   # block_count
    heads: int
    kv_heads: int                 # max over layers when the file gives one per layer
    embedding_length: int
    head_dim: int                 # key length per head
    value_head_dim: int           # value length per head (usually == head_dim)
    context_length: int           # training context
    vocab_size: int
    chat_template: str | None
    tensor_bytes: int             # total tensor data (what mmap pulls in once touched)
    tensor_count: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name → bytes
    kv_heads_per_layer: tuple[int, ...] = ()
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every Nth layer is global (gemma3: 6)
    adapter_type: str | None = None            # "lora" for LoRA adapters
    metadata: dict = field(default_factory=dict, repr=False)  # every scalar/short-array key
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False)

    @property
    def parameters_human(self) -> str:
        return human_count(self.parameters)

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements one token occupies in the cache, summed over layers."""
        per_layer = self.kv_heads_per_layer or (self.kv_heads,) * self.layers
        return sum(h * (self.head_dim + self.value_head_dim) for h in per_layer)


def human_count(n: int) -> str:
    """134_515_008 → "135M", 1_240_000_000 → "1.2B", 7_000_000_000 → "7B"."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            text = f"{v:.0f}" if v >= 10 else f"{v:.1f}".removesuffix(".0")
            return f"{text}{suffix}"
    return str(n)


class _Reader:
    """Sequential bounds-checked reads from a buffer; raises GGUFError on any overrun."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.kept = 0  # bytes of strings kept so far (MAX_KEPT_BYTES)

    def fail(self, what: str) -> GGUFError:
        return GGUFError(self.path, what)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, "
                            f"the file has {self.end - self.pos} left")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what): return self.scalar("<I", what)
    def u64(self, what): return self.scalar("<Q", what)

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long; at most {limit}")
        self.need(n, what)
        self.kept += n
        if self.kept > MAX_KEPT_BYTES:
            raise self.fail(f"the header's strings pass {MAX_KEPT_BYTES >> 20} MiB at {what}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8") from None

    def skip_string(self, what: str, limit: int = MAX_ITEM_BYTES) -> None:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long; at most {limit}")
        self.need(n, what)
        self.pos += n

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"value of {key}")
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {key}")
            count = self.u64(f"length of {key}")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                self.need(count * size, f"array {key} ({count} items)")
                if count > _KEEP_ARRAY_MAX:
                    self.pos += count * size
                    return _Skipped(count)
                items = list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", self.buf, self.pos))
                self.pos += count * size
                return items
            if etype == _STRING:
                self.need(count * 8, f"array {key} ({count} strings)")
                if count > _KEEP_ARRAY_MAX:
                    for i in range(count):
                        self.skip_string(f"item {i} of {key}")
                    return _Skipped(count)
                return [self.string(f"item {i} of {key}", MAX_ITEM_BYTES) for i in range(count)]
            if etype == _ARRAY:
                raise self.fail(f"{key} is an array of arrays, which GGUF readers (llama.cpp) "
                                "do not accept")
            raise self.fail(f"unknown element type {etype} in array {key}")
        raise self.fail(f"unknown value type {vtype} for key {key!r}")


class _Skipped:
    """A long array whose items were not kept (tokenizer tables): only its length."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __repr__(self):
        return f"<{self.count} items>"


def _ftype_name(value) -> str | None:
    try:
        name = LlamaFileType(int(value)).name
    except (ValueError, TypeError):
        return None
    if name == "GUESSED":
        return None
    return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")


def read_gguf_info(path) -> ModelInfo:
    """Parse a GGUF file's header (and check its tensor data is all there) into ModelInfo."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GGUFError(path, "file not found") from None
    except OSError as exc:
        raise GGUFError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(path, "is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(path, "not a regular file")
    if st.st_size == 0:
        raise GGUFError(path, "empty file, not a GGUF model")
    if st.st_size < 24:
        raise GGUFError(path, f"too small to be a GGUF file ({st.st_size} bytes)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, st.st_size)
    except GGUFError:
        raise
    except (OSError, ValueError) as exc:
        raise GGUFError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def _parse(buf, path: Path, file_size: int) -> ModelInfo:
    r = _Reader(buf, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        hint = " (a text file?)" if all(32 <= b < 127 or b in (9, 10, 13) for b in magic) else ""
        raise GGUFError(path, f"not a GGUF file: starts with {magic!r}, expected b'GGUF'{hint}")
    r.pos = 4
    version = r.u32("version")
    if version in (1,):
        raise GGUFError(path, "GGUF version 1 is not supported (re-convert the model)")
    if version not in (2, 3):
        if struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3):
            raise GGUFError(path, "big-endian GGUF files are not supported")
        raise GGUFError(path, f"unsupported GGUF version {version}")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    # Every entry needs at least 8 (key length) + 4 (type) bytes, every tensor 8 + 4 + 4 + 8.
    if n_kv * 12 > file_size or n_tensors * 24 > file_size:
        raise GGUFError(path, f"corrupt header: {n_kv} metadata entries / {n_tensors} tensors "
                        f"cannot fit in {file_size} bytes")
    if n_kv > MAX_KEYS or n_tensors > MAX_TENSORS:
        raise GGUFError(path, f"header lists {n_kv} metadata entries and {n_tensors} tensors; "
                        f"at most {MAX_KEYS} and {MAX_TENSORS}")

    meta: dict = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if key in meta:
            raise GGUFError(path, f"metadata key {key!r} appears twice")
        vtype = r.u32(f"type of {key}")
        meta[key] = r.value(vtype, key)

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
        if name in names:
            raise GGUFError(path, f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(path, f"corrupt tensor {name!r}: {n_dims} dimensions; at most "
                            f"{MAX_DIMS}")
        shape = tuple(r.u64(f"shape of {name}") for _ in range(n_dims))
        ttype = r.u32(f"type of {name}")
        offset = r.u64(f"offset of {name}")
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(path, f"tensor {name!r} has unknown type {ttype}") from None
        n_el = 1
        for d in shape:
            n_el *= d
        if shape[0] % block:
            raise GGUFError(path, f"corrupt tensor {name!r}: row of {shape[0]} is not a multiple "
                            f"of the {qtype.name} block size {block}")
        tensors.append(TensorInfo(name, shape, qtype.name, n_el, n_el // block * type_size, offset))

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(path, f"corrupt header: general.alignment = {alignment!r}")
    data_start = (r.pos + alignment - 1) // alignment * alignment
    data_end = max((t.offset + t.n_bytes for t in tensors), default=0)
    if data_start + data_end > file_size:
        raise GGUFError(path, f"truncated: tensor data ends at byte {data_start + data_end}, "
                        f"the file has {file_size} bytes")

    return _build_info(path, file_size, meta, tensors)


def _meta_int(meta: dict, key: str, default: int = 0) -> int:
    v = meta.get(key, default)
    if isinstance(v, list):  # one value per layer; a list of anything else counts as absent
        nums = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        v = max(nums) if nums and len(nums) == len(v) else default
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _build_info(path: Path, file_size: int, meta: dict, tensors: list[TensorInfo]) -> ModelInfo:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(path, "no general.architecture in the header")
    a = arch
    gtype = meta.get("general.type", "model")
    gtype = gtype if gtype in ("model", "adapter") else "model"

    bytes_by_type: Counter = Counter()
    for t in tensors:
        bytes_by_type[t.type_name] += t.n_bytes
    quant = _ftype_name(meta["general.file_type"]) if "general.file_type" in meta else None
    if quant is None:
        # Dominant type among the matrices (norms and biases are F32 in every file).
        mats: Counter = Counter()
        for t in tensors:
            if len(t.shape) >= 2:
                mats[t.type_name] += t.n_bytes
        quant = (mats or bytes_by_type).most_common(1)[0][0] if (mats or bytes_by_type) else "unknown"

    heads = _meta_int(meta, f"{a}.attention.head_count")
    kv_raw = meta.get(f"{a}.attention.head_count_kv", heads)
    layers = _meta_int(meta, f"{a}.block_count")
    if _ints(kv_raw):
        kv_per_layer = tuple(int(x) for x in kv_raw)
        kv_heads = max(kv_per_layer, default=0)
    else:
        kv_per_layer = ()
        kv_heads = int(kv_raw) if isinstance(kv_raw, int) else heads
    emb = _meta_int(meta, f"{a}.embedding_length")
    head_dim = _meta_int(meta, f"{a}.attention.key_length") or (emb // heads if heads else 0)
    value_dim = _meta_int(meta, f"{a}.attention.value_length") or head_dim

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _meta_int(meta, f"{a}.vocab_size") or (len(tokens) if tokens is not None else 0)
    if not vocab:
        emb_t = next((t for t in tensors if t.name == "token_embd.weight"), None)
        vocab = emb_t.shape[-1] if emb_t is not None else 0
    template = meta.get("tokenizer.chat_template")
    swa = _meta_int(meta, f"{a}.attention.sliding_window") or None
    swa_pattern = _meta_int(meta, f"{a}.attention.sliding_window_pattern") or None
    if swa and swa_pattern is None and arch.startswith("gemma3"):
        swa_pattern = 6  # llama.cpp's built-in pattern for Gemma 3 (5 local : 1 global)
    name = meta.get("general.name")

    kept = {k: v for k, v in meta.items() if not isinstance(v, _Skipped)}
    return ModelInfo(
        path=path, file_size=file_size, architecture=arch,
        name=name if isinstance(name, str) else None, general_type=gtype,
        parameters=sum(t.n_elements for t in tensors), quantization=quant,
        layers=layers, heads=heads, kv_heads=kv_heads, embedding_length=emb,
        head_dim=head_dim, value_head_dim=value_dim,
        context_length=_meta_int(meta, f"{a}.context_length"), vocab_size=vocab,
        chat_template=template if isinstance(template, str) else None,
        tensor_bytes=sum(bytes_by_type.values()), tensor_count=len(tensors),
        tensor_types=dict(bytes_by_type), kv_heads_per_layer=kv_per_layer,
        sliding_window=swa, sliding_window_pattern=swa_pattern,
        adapter_type=meta.get("adapter.type") if gtype == "adapter" else None,
        metadata=kept, tensors=tuple(tensors),
    )


__all__ = ["ModelInfo", "TensorInfo", "read_gguf_info", "human_count"]
