"""Proofs for `hublab-tools convert`: for tiny random checkpoints of every supported
architecture (and a from-scratch Llama with its own byte-level BPE tokenizer), the GGUF run
through llama.cpp gives transformers' next-token logits for the same token ids, and llama.cpp
tokenizes text exactly as the HF tokenizer does.

Tolerances (max |logit difference| over every position and vocabulary entry; the tiny models'
logits have std ~1):
  F32: 1e-4 (SiLU architectures), 3e-3 for Gemma (ggml's GELU is a tanh approximation via an f16
       lookup table); F16: 5e-2; BF16: 1.5e-1; Q8_0: 5e-1 with the same argmax at >= 90% positions.
The llama.cpp KV cache is kept in F32 so that only the weights' type differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import SAMPLE_TEXTS, bpe_tokenizer, build  # noqa: E402

from hublabio_tools.convert import convert, main  # noqa: E402
from hublabio_tools.gguf_arch import ConvertError  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gemma3", "llama3", "scratch", "train",
         "smollm"]
EXPECTED = {  # arch -> (general.architecture, tokenizer.ggml.model, tokenizer.ggml.pre)
    "llama": ("llama", "llama", "default"), "mistral": ("llama", "llama", "default"),
    "qwen2": ("qwen2", "gpt2", "qwen2"), "phi3": ("phi3", "llama", "default"),
    "gemma": ("gemma", "llama", "default"), "gemma2": ("gemma2", "llama", "default"),
    "gemma3": ("gemma3", "llama", "default"), "llama3": ("llama", "gpt2", "llama-bpe"),
    "scratch": ("llama", "gpt2", "gpt-2"),
    "train": ("llama", "gpt2", "gpt-2"),  # hublabio_tools.train.train_tokenizer, as trained by the CLI
    "smollm": ("llama", "gpt2", "smollm"),
}
PROMPT = "The quick brown fox jumps over the lazy dog. 12345 café"
_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    def get(arch: str, **kw) -> Path:
        key = arch + json.dumps(kw, sort_keys=True)
        if key not in _CACHE:
            _CACHE[key] = build(arch, tmp_path_factory.mktemp(f"hf-{arch}"), **kw)
        return _CACHE[key]
    return get


def hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def cpp_model(path: Path, threads: int, n_ctx: int = 128):
    """The GGUF in llama.cpp through hublabio.llama, with an F32 KV cache."""
    from hublabio_tools.llama_context import LlamaModel

    return LlamaModel(path, n_ctx=n_ctx, threads=threads, kv_f32=True)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    return llm.logits(ids)


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


def hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_and_tokenizer_match_transformers(arch, tiny, tmp_path, test_threads):
    hf_dir = tiny(arch)
    out = convert(hf_dir, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    reader = gguf.GGUFReader(out)
    general, tmodel, pre = EXPECTED[arch]
    assert field(reader, "general.architecture") == general
    assert field(reader, "tokenizer.ggml.model") == tmodel
    assert field(reader, "tokenizer.ggml.pre") == pre
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert ("<|end|>" if arch == "train" else "<|im_start|>") in field(reader, "tokenizer.chat_template")

    tok = hf_tokenizer(hf_dir)
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    llm = cpp_model(out, test_threads)
    spm_prefix = tmodel == "llama" and not arch.startswith("gemma")
    texts = SAMPLE_TEXTS + (["<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"] if arch == "train" else [])
    for text in texts:
        got = llm.tokenize(text, special=True).tolist()
        if spm_prefix and (text[0].isspace() or "<|" in text):
            # transformers 5 (Metaspace prepend_scheme="first") differs from SentencePiece itself
            # at a leading space and after a special token; llama.cpp follows SentencePiece.
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
            if "<|" not in text:
                assert got == [tok.bos_token_id] + sp.encode(text), text
            continue
        assert got == tok(text).input_ids, text

    ids = tok(PROMPT).input_ids
    ref, got = hf_logits(hf_dir, ids), cpp_logits(llm, ids)
    assert ref.shape == got.shape
    tol = 3e-3 if arch.startswith("gemma") else 1e-4
    assert np.abs(ref - got).max() <= tol
    assert ref.std() > 0.5  # the comparison is not trivially small numbers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
def test_f16_logits_within_tolerance(arch, tiny, tmp_path, test_threads):
    hf_dir = tiny(arch)
    out = convert(hf_dir, tmp_path / "m.gguf", "f16", log=lambda *_: None)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D stay F32
    ids = hf_tokenizer(hf_dir)(PROMPT).input_ids
    diff = np.abs(hf_logits(hf_dir, ids) - cpp_logits(cpp_model(out, test_threads), ids))
    assert diff.max() <= 5e-2


@pytest.mark.parametrize("outtype,qtype,tol", [
    ("bf16", gguf.GGMLQuantizationType.BF16, 1.5e-1),
    ("q8_0", gguf.GGMLQuantizationType.Q8_0, 5e-1),
])
def test_bf16_and_q8_0_outputs(outtype, qtype, tol, tiny, tmp_path, test_threads):
    hf_dir = tiny("scratch")
    out = convert(hf_dir, tmp_path / "m.gguf", outtype, log=lambda *_: None)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype
    assert types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = hf_tokenizer(hf_dir)(PROMPT).input_ids
    ref, got = hf_logits(hf_dir, ids), cpp_logits(cpp_model(out, test_threads), ids)
    assert np.abs(ref - got).max() <= tol
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_q_k_permutation_is_what_makes_llama_match(tiny, tmp_path, test_threads, monkeypatch):
    """Without the Q/K permutation the Llama GGUF loads but computes different logits."""
    import hublabio_tools.gguf_arch as ga

    hf_dir = tiny("llama")
    monkeypatch.setitem(ga.RULES, "LlamaForCausalLM", ga.ArchRule(gguf.MODEL_ARCH.LLAMA, permute_qk=False))
    out = convert(hf_dir, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    ids = hf_tokenizer(hf_dir)(PROMPT).input_ids
    assert np.abs(hf_logits(hf_dir, ids) - cpp_logits(cpp_model(out, test_threads), ids)).max() > 1e-2


def test_tokenizer_json_only_sentencepiece_model(tiny, tmp_path, test_threads):
    """transformers 5 saves SentencePiece tokenizers as tokenizer.json only (BPE with byte
    fallback): converted as a `llama` vocabulary with merge-rank scores, same tokens."""
    hf_dir = tiny("mistral", tokenizer_json_only=True)
    assert not (hf_dir / "tokenizer.model").exists()
    out = convert(hf_dir, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    assert field(gguf.GGUFReader(out), "tokenizer.ggml.model") == "llama"
    tok, llm = hf_tokenizer(hf_dir), cpp_model(out, test_threads)
    for text in SAMPLE_TEXTS:
        if not text[0].isspace() and "<|" not in text:
            assert llm.tokenize(text, special=True).tolist() == tok(text).input_ids, text


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_sharded_safetensors_and_pytorch_bin_give_identical_gguf_tensors(tiny, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = tiny("qwen2")
    ref = _tensor_bytes(convert(hf_dir, tmp_path / "ref.gguf", "f16", log=lambda *_: None))

    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert _tensor_bytes(convert(sharded, tmp_path / "sh.gguf", "f16", log=lambda *_: None)) == ref

    binary = tmp_path / "bin"
    shutil.copytree(hf_dir, binary, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    torch.save(load_file(hf_dir / "model.safetensors"), binary / "pytorch_model.bin")
    assert _tensor_bytes(convert(binary, tmp_path / "bin.gguf", "f16", log=lambda *_: None)) == ref


def test_bf16_checkpoint_is_read_exactly(tiny, tmp_path, test_threads):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    src = tiny("scratch")
    bf = tmp_path / "bf16"
    shutil.copytree(src, bf, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf)
    out = convert(bf, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    ids = hf_tokenizer(bf)(PROMPT).input_ids
    # bf16 -> f32 is exact, so the F32 GGUF equals the bf16 model evaluated in f32
    assert np.abs(hf_logits(bf, ids) - cpp_logits(cpp_model(out, test_threads), ids)).max() <= 1e-4


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_errors_name_the_problem_and_write_nothing(tiny, tmp_path):
    import shutil

    src = tiny("llama")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()

    with pytest.raises(ConvertError, match="config.json: missing"):
        convert(tmp_path, out)

    bad = tmp_path / "gpt2"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns("*.gguf"))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match="'GPT2LMHeadModel' is not supported"):
        convert(bad, out)
    _assert_nothing_written(tmp_path, out)

    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="no weights found"):
        convert(bad, out)

    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConvertError, match="shard 'model-00001-of-00002.safetensors' is listed but missing"):
        convert(bad, out)
    (bad / "model.safetensors.index.json").unlink()

    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((4, 4), dtype=np.int8)}, bad / "model.safetensors")
    with pytest.raises(ConvertError, match="'model.embed_tokens.weight' has dtype 'I8'"):
        convert(bad, out)
    _assert_nothing_written(tmp_path, out)

    with pytest.raises(ConvertError, match="--outtype 'q4_0'"):
        convert(src, out, "q4_0")

    g3 = tmp_path / "g3"  # Gemma 3 whose global layers are not where llama.cpp puts them
    shutil.copytree(tiny("gemma3"), g3, ignore=shutil.ignore_patterns("*.gguf"))
    cfg = json.loads((g3 / "config.json").read_text())
    cfg["layer_types"] = ["full_attention"] + cfg["layer_types"][1:]
    (g3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="layer_types .* differ from llama.cpp's fixed pattern"):
        convert(g3, out)
    _assert_nothing_written(tmp_path, out)


def test_failure_mid_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    """A crash while tensors are being written (disk full, bad tensor) removes the temp file."""
    import hublabio_tools.convert as conv

    src = tiny("llama")
    out = tmp_path / "m.gguf"
    calls = {"n": 0}
    real = conv._encode

    def failing(data, kind):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("No space left on device")
        return real(data, kind)

    monkeypatch.setattr(conv, "_encode", failing)
    with pytest.raises(OSError, match="No space left"):
        convert(src, out, "f16", log=lambda *_: None)
    assert calls["n"] == 5
    _assert_nothing_written(tmp_path, out)


def test_unknown_pre_tokenizer_is_refused_unless_declared(tmp_path, tiny):
    import shutil

    src = tiny("scratch")
    d = tmp_path / "custom"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.gguf"))
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, tj["pre_tokenizer"]]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConvertError, match=r"tokenizer.json: pre_tokenizer Punctuation.*--pre NAME"):
        convert(d, tmp_path / "x.gguf")
    out = convert(d, tmp_path / "x.gguf", "f16", pre="gpt-2", log=lambda *_: None)
    assert field(gguf.GGUFReader(out), "tokenizer.ggml.pre") == "gpt-2"


def test_bytelevel_add_prefix_space_is_refused(tmp_path):
    bpe_tokenizer(tmp_path, pre="gpt2")
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    from hublabio_tools.gguf_vocab import detect_bpe_pre

    with pytest.raises(ConvertError, match="add_prefix_space=true"):
        detect_bpe_pre(tj, "tokenizer.json")


def test_smollm_pre_tokenizer_is_detected(tmp_path):
    bpe_tokenizer(tmp_path, pre="smollm")
    from hublabio_tools.gguf_vocab import detect_bpe_pre

    assert detect_bpe_pre(json.loads((tmp_path / "tokenizer.json").read_text()), "t") == "smollm"


def test_cli(tiny, tmp_path, capsys):
    src = tiny("scratch")
    assert main([str(src), "--outtype", "f16", "--out", str(tmp_path / "cli.gguf")]) == 0
    assert (tmp_path / "cli.gguf").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_path, tmp_path, test_threads):
    """Default SmolLM2 GGUF -> transformers (dequantized) -> save_pretrained -> convert F32 ->
    llama.cpp logits equal the transformers model's logits."""
    import shutil

    import torch

    from tiny_models import hf_dir_from_gguf

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(smollm2_path, src / smollm2_path.name)
    hf = tmp_path / "hf"
    model, tok = hf_dir_from_gguf(src / smollm2_path.name, hf)
    out = convert(hf, tmp_path / "smollm2-f32.gguf", "f32", log=lambda *_: None)
    llm = cpp_model(out, test_threads)
    text = "The capital of France is Paris. Raspberry Pi 5 has 8 GB of memory."
    ids = tok(text).input_ids
    assert llm.tokenize(text, special=True).tolist() == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = cpp_logits(llm, ids)
    assert np.abs(ref - got).max() <= 2e-3 * max(1.0, np.abs(ref).max() / 10)
    assert (ref.argmax(-1) == got.argmax(-1)).all()


@pytest.mark.parametrize("arch,outtype", [("llama", "f16"), ("gemma", "q8_0")])
def test_tensors_are_streamed_in_row_chunks(arch, outtype, tiny, tmp_path, monkeypatch):
    """Rows are read, then written, chunk by chunk: the converter never holds a whole matrix.
    With tiny chunks (q/k chunks stay whole heads for the permutation) the file is byte-identical
    to the one converted in one piece. Peak memory: bench/bench_convert.py."""
    import hublabio_tools.convert as conv

    ref = convert(tiny(arch), tmp_path / "ref.gguf", outtype, log=lambda *_: None).read_bytes()
    events: list[str] = []
    real_read, real_write = conv.SafetensorsFile.read, conv._write_chunk
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(conv.SafetensorsFile, "read",
                        lambda self, name, rows=None: events.append("read") or real_read(self, name, rows))
    monkeypatch.setattr(conv, "_write_chunk", lambda f, d: events.append("write") or real_write(f, d))
    out = convert(tiny(arch), tmp_path / "chunked.gguf", outtype, log=lambda *_: None)
    n_tensors = len(gguf.GGUFReader(out).tensors)
    assert len(events) // 2 > 3 * n_tensors  # matrices went in several chunks
    assert events == ["read", "write"] * (len(events) // 2)
    assert out.read_bytes() == ref


@pytest.mark.parametrize("n_tokens,n_ctx", [(20, 128), (300, 512)])
def test_phi3_longrope_short_and_long_factors(n_tokens, n_ctx, tiny, tmp_path, test_threads):
    """Phi-3-128k style longrope: rope_factors_short/long + attention factor. Under the original
    context (256) both sides use the short factors; past it, the long ones."""
    hf_dir = tiny("phi3-longrope")
    out = convert(hf_dir, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(5, 400, n_tokens - 1).tolist()
    llm = cpp_model(out, test_threads, n_ctx=n_ctx)
    assert np.abs(hf_logits(hf_dir, ids) - cpp_logits(llm, ids)).max() <= 1e-4
