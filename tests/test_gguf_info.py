"""gguf_info.py on the real SmolLM2 file, on small files written with gguf.GGUFWriter, and on
every kind of damage (which must give GGUFError, never another exception)."""

from __future__ import annotations

import os
import random
import re
import struct
import time

import gguf
import numpy as np
import pytest

from hublabio.errors import GGUFError
from hublabio.gguf_info import human_count, read_gguf_info


def write_tiny(path, *, general_type="model", arch="llama", file_type=gguf.LlamaFileType.ALL_F32,
               kv_heads=2, chat_template="{{ messages }}"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(general_type)
    w.add_name("tiny")
    if general_type == "adapter":
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
        w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 64), np.float32))
        w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 4), np.float32))
    else:
        w.add_block_count(2)
        w.add_context_length(256)
        w.add_embedding_length(64)
        w.add_head_count(4)
        w.add_head_count_kv(kv_heads)
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_token_list([f"t{i}" for i in range(2000)])  # long enough to be skipped
        if chat_template:
            w.add_chat_template(chat_template)
        w.add_tensor("token_embd.weight", np.zeros((2000, 64), np.float32))
        for b in range(2):
            w.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((64, 64), np.float16))
            w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_real_smollm2(smollm2_path):
    info = read_gguf_info(smollm2_path)
    assert info.architecture == "llama"
    assert info.general_type == "model"
    assert 134_000_000 < info.parameters < 136_000_000
    assert info.parameters_human == "135M"
    assert info.quantization == "Q4_1"
    assert (info.layers, info.heads, info.kv_heads) == (30, 9, 3)
    assert info.embedding_length == 576 and info.head_dim == 64 and info.value_head_dim == 64
    assert info.context_length == 8192 and info.vocab_size == 49152
    assert info.file_size == smollm2_path.stat().st_size
    assert 0.95 * info.file_size < info.tensor_bytes < info.file_size
    assert info.tensor_count == 272
    assert "<|im_start|>" in info.chat_template
    assert info.kv_elements_per_token == 30 * 3 * (64 + 64)


def test_real_smollm2_is_read_quickly(smollm2_path):
    # header only: the ~100 MB of weights are never read (ours takes ~0.1 s; GGUFReader ~2 s)
    t = time.perf_counter()
    read_gguf_info(smollm2_path)
    assert time.perf_counter() - t < 1.5


def test_real_gemma(gemma_path):
    info = read_gguf_info(gemma_path)
    assert info.architecture == "gemma3" and info.quantization == "Q4_K_M"
    assert info.parameters_human == "268M"
    assert (info.layers, info.heads, info.kv_heads, info.head_dim) == (18, 4, 1, 256)
    assert info.embedding_length == 640 and info.vocab_size == 262144
    assert info.sliding_window == 512 and info.sliding_window_pattern == 6


def test_tiny_written_file(tmp_path):
    info = read_gguf_info(write_tiny(tmp_path / "t.gguf"))
    assert info.architecture == "llama" and info.name == "tiny"
    assert info.parameters == 2000 * 64 + 2 * (64 * 64 + 64)
    assert info.quantization == "F32"
    assert (info.layers, info.heads, info.kv_heads, info.head_dim) == (2, 4, 2, 16)
    assert info.vocab_size == 2000  # from the (skipped) token list's length
    assert info.chat_template == "{{ messages }}"
    assert info.tensor_types == {"F32": 2000 * 64 * 4 + 2 * 64 * 4, "F16": 2 * 64 * 64 * 2}


def test_quantization_falls_back_to_dominant_matrix_type(tmp_path):
    info = read_gguf_info(write_tiny(tmp_path / "t.gguf", file_type=None))
    # token_embd F32 is 512000 bytes, the two F16 matrices 16384: the dominant type wins
    assert info.quantization == "F32"
    assert read_gguf_info(write_tiny(tmp_path / "m.gguf",
                                     file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)).quantization == "Q4_K_M"


def test_adapter(tmp_path):
    info = read_gguf_info(write_tiny(tmp_path / "a.lora.gguf", general_type="adapter"))
    assert info.general_type == "adapter" and info.adapter_type == "lora"
    assert info.parameters == 2 * 4 * 64
    assert info.metadata["adapter.lora.alpha"] == 16.0


@pytest.mark.parametrize("n", [0, 1, 2000, 13_500_000, 123456789, 134_515_008, 1_240_000_000, 7_000_000_000])
def test_human_count(n):
    expected = {0: "0", 1: "1", 2000: "2K", 13_500_000: "14M", 123456789: "123M", 134_515_008: "135M",
                1_240_000_000: "1.2B", 7_000_000_000: "7B"}[n]
    assert human_count(n) == expected


# --- damage ---------------------------------------------------------------------------------

def expect_error(path, fragment=None):
    with pytest.raises(GGUFError) as info:
        read_gguf_info(path)
    assert str(path) in str(info.value)
    if fragment:
        assert fragment in str(info.value)
    return info.value


def test_truncated_at_many_offsets(tmp_path):
    good = write_tiny(tmp_path / "good.gguf").read_bytes()
    header_end = len(good) - 2000 * 64 * 4 - 2 * (64 * 64 * 2 + 64 * 4)  # roughly
    cuts = sorted({4, 8, 15, 23, 24, 30, 40, 60, 100, 500, 5000, 20000, header_end - 10,
                   header_end + 10, len(good) // 2, len(good) - 1})
    for cut in cuts:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(good[:cut])
        err = expect_error(p)
        assert "truncated" in str(err) or "too small" in str(err), (cut, str(err))


def test_real_model_truncated(smollm2_path, tmp_path):
    p = tmp_path / "half.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(3_000_000))  # whole header, a sliver of the weights
    expect_error(p, "truncated: tensor data ends at byte")


def test_random_bytes(tmp_path):
    rng = random.Random(1)
    for i in range(20):
        p = tmp_path / f"r{i}.gguf"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(24, 4000))))
        expect_error(p, "not a GGUF file")


def test_random_bytes_after_valid_magic(tmp_path):
    # a GGUF magic + version followed by garbage: counts and lengths are absurd, never a crash
    rng = random.Random(2)
    for i in range(50):
        p = tmp_path / f"g{i}.gguf"
        p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") +
                      bytes(rng.randrange(256) for _ in range(rng.randrange(16, 3000))))
        expect_error(p)


def test_flipped_bytes_in_header(tmp_path):
    good = write_tiny(tmp_path / "good.gguf").read_bytes()
    rng = random.Random(3)
    for i in range(60):
        data = bytearray(good)
        for _ in range(4):
            data[rng.randrange(8, 3000)] = rng.randrange(256)
        p = tmp_path / f"f{i}.gguf"
        p.write_bytes(bytes(data))
        try:
            read_gguf_info(p)  # some flips land in strings and leave a readable file
        except GGUFError as exc:
            assert str(p) in str(exc)


def test_wrong_magic_text_empty_dir_missing(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    expect_error(p, "not a GGUF file: starts with b'GGML'")
    t = tmp_path / "notes.gguf"
    t.write_text("this is a text file, not a model\n" * 10)
    expect_error(t, "a text file?")
    e = tmp_path / "empty.gguf"
    e.write_bytes(b"")
    expect_error(e, "empty file")
    expect_error(tmp_path, "is a directory")
    expect_error(tmp_path / "missing.gguf", "file not found")


def test_unsupported_versions(tmp_path):
    for version, fragment in ((1, "version 1 is not supported"), (7, "unsupported GGUF version 7"),
                              (3 << 24, "big-endian")):
        p = tmp_path / f"v{version}.gguf"
        p.write_bytes(b"GGUF" + version.to_bytes(4, "little") + b"\0" * 40)
        expect_error(p, fragment)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_rejected(tmp_path):
    p = tmp_path / "pipe.gguf"
    os.mkfifo(p)
    expect_error(p, "not a regular file")


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _raw_gguf(path, kvs: list[bytes], tensors: list[bytes] = (), *, n_kv=None, pad=0):
    """A GGUF header written by hand, so that it can break the format's rules."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs) if n_kv is None else n_kv)
    path.write_bytes(head + b"".join(kvs) + b"".join(tensors) + b"\0" * (64 + pad))
    return path


_ARCH = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")


@pytest.mark.parametrize("kvs,tensors,extra,fragment", [
    ([_s("k" * 2000) + struct.pack("<II", 4, 1)], [], {},
     "metadata key #0 is 2000 bytes long; at most 1024"),
    ([_ARCH, _s("general.name") + struct.pack("<IQ", 8, 2 << 20)], [], {},
     "value of general.name is 2097152 bytes long; at most 1048576"),
    ([_ARCH, _ARCH], [], {}, "metadata key 'general.architecture' appears twice"),
    ([_ARCH, _s("llama.attention.head_count") + struct.pack("<IIQ", 9, 9, 1)
      + struct.pack("<IQ", 4, 1) + struct.pack("<I", 3)], [], {},
     "llama.attention.head_count is an array of arrays"),
    ([_ARCH], [], {"n_kv": 70_000, "pad": 70_000 * 12},
     "header lists 70000 metadata entries and 0 tensors; at most 65536 and 65536"),
    ([_ARCH], [_s("t" * 100) + struct.pack("<IQIQ", 1, 32, 0, 0)], {},
     "name of tensor #0 is 100 bytes long; at most 63"),
    ([_ARCH], [_s("t") + struct.pack("<I5QIQ", 5, 32, 1, 1, 1, 1, 0, 0)], {},
     "corrupt tensor 't': 5 dimensions; at most 4"),
    ([_ARCH], [_s("t") + struct.pack("<IQIQ", 1, 32, 0, 0)] * 2, {},
     "tensor name 't' appears twice"),
    ([_ARCH] + [_s(f"k{i}") + struct.pack("<I", 8) + _s("v" * (1 << 20)) for i in range(17)], [],
     {}, "the header's strings pass 16 MiB at value of k15")])
def test_header_limits_are_named(tmp_path, kvs, tensors, extra, fragment):
    path = _raw_gguf(tmp_path / "hostile.gguf", kvs, tensors, **extra)
    with pytest.raises(GGUFError, match=re.escape(fragment)):
        read_gguf_info(path)
