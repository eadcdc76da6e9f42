"""Builders of tiny random Hugging Face checkpoints (config + safetensors + tokenizer) for the
conversion proofs: Llama, Mistral, Qwen2, Phi-3, Gemma 1/2/3 and a from-scratch Llama with a
byte-level BPE tokenizer trained the way `hublab-tools train` makes one. Each builds in about a
second. Weights are random but *not* small: norms, biases and projections are drawn so that
every tensor matters for the logits (a forgotten bias, `+1` or permutation shows up)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

CORPUS_WORDS = ("alpha beta gamma delta model token llama expert router device python data "
                "raspberry pi local small fast memory cache quantize adapter weights layer "
                "hello world the quick brown fox jumps over lazy dog café naïve résumé").split()

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# texts whose tokenization must be identical in transformers and llama.cpp
SAMPLE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and  double  spaces",
    "digits 12345 and 3.14159, code: def f(x): return x*2",
    "line one\nline two\n\n  indented\ttab",
    "unicode: café naïve résumé — 日本語 🙂",
    "<|im_start|>user\nhi there<|im_end|>",
]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)]
    lines += [f"{rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.random():.4f}" for _ in range(50)]
    lines += ["def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "A, B; C. D! E? (F)"] * 5
    return lines


# ---------------------------------------------------------------------------- tokenizers
def bpe_tokenizer(out: Path, pre: str = "gpt2", vocab_size: int = 600, bos: bool = False) -> None:
    """Byte-level BPE trained with the `tokenizers` library and saved through transformers.
    pre: "gpt2" (plain ByteLevel, what a from-scratch tokenizer uses), "qwen2", "llama3", "smollm"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        digits = r"\p{N}" if pre == "qwen2" else r"\p{N}{1,3}"
        regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(out)


def spm_tokenizer(out: Path, gemma: bool = False, vocab_size: int = 500, keep_model: bool = True,
                  extra_symbols: tuple[str, ...] = ()) -> None:
    """SentencePiece BPE (byte fallback, like Llama 2 / Mistral / Phi-3 / Gemma), saved as
    tokenizer.model plus the tokenizer.json/tokenizer_config.json transformers writes."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    ids = dict(unk_id=3, bos_id=2, eos_id=1, pad_id=0) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=not gemma, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", *extra_symbols], **ids)
    text.unlink()
    (out / "sp.vocab").unlink()
    shutil.move(out / "sp.model", out / "tokenizer.model")
    cls = GemmaTokenizer if gemma else LlamaTokenizer
    kw = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>") if gemma else {}
    hf = cls.from_pretrained(out, add_bos_token=True, **kw)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    check = AutoTokenizer.from_pretrained(out)
    assert check("hi").input_ids[0] == check.bos_token_id, "tokenizer must add BOS"
    if not keep_model:
        (out / "tokenizer.model").unlink()


# ---------------------------------------------------------------------------- models
def _randomize(model: torch.nn.Module, gemma_norm: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 0.0 if gemma_norm else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _vocab_size(out: Path) -> int:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(out))
    return n + (-n % 16) + 16  # padded rows, like real checkpoints (become [PAD] tokens)


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def build(arch: str, out: Path, seed: int = 0, tokenizer_json_only: bool = False) -> Path:
    """Write a tiny random checkpoint of `arch` to `out` and return `out`."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    seed = seed or sum(map(ord, arch))
    torch.manual_seed(seed)
    gemma = arch.startswith("gemma")
    if arch in ("llama", "mistral", "phi3", "phi3-longrope") or gemma:
        # llama.cpp looks up "<|endoftext|>" by text for models named phi3 (real Phi-3 has it)
        extra = ("<|endoftext|>",) if arch.startswith("phi3") else ()
        spm_tokenizer(out, gemma=gemma, keep_model=not tokenizer_json_only, extra_symbols=extra)
    elif arch == "qwen2":
        bpe_tokenizer(out, pre="qwen2")
    elif arch == "llama3":
        bpe_tokenizer(out, pre="llama3", bos=True)
    elif arch == "scratch":
        bpe_tokenizer(out, pre="gpt2", bos=True)
    elif arch == "smollm":  # SmolLM2's tokenizer layout: digits split one by one, then ByteLevel
        bpe_tokenizer(out, pre="smollm")
    elif arch == "train":  # the tokenizer exactly as `hublab-tools train` makes and saves it
        from hublabio_tools.train import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer(corpus(), 600), out)
    else:
        raise ValueError(arch)
    tok = tf.AutoTokenizer.from_pretrained(out)
    ids = dict(vocab_size=_vocab_size(out), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch in ("llama", "scratch", "llama3", "train", "smollm"):
        extra = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
                     ) if arch == "llama3" else {}
        cfg = tf.LlamaConfig(**COMMON, **ids, tie_word_embeddings=arch in ("llama3", "smollm"), rope_theta=10000.0,
                             **extra)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**COMMON, **ids, sliding_window=None, tie_word_embeddings=False)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**COMMON, **ids, tie_word_embeddings=True, rope_theta=1000000.0)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "phi3-longrope":  # Phi-3-128k style: longrope factors, context 4x the original
        half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [2.0 + 0.5 * i for i in range(half)]}
        cfg = tf.Phi3Config(**{**COMMON, "num_key_value_heads": 4, "max_position_embeddings": 1024}, **ids,
                            original_max_position_embeddings=256, rope_scaling=rope,
                            tie_word_embeddings=False, sliding_window=None, resid_pdrop=0.0)
        model = tf.Phi3ForCausalLM(cfg)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, **ids, original_max_position_embeddings=256,
                            tie_word_embeddings=False, sliding_window=None, resid_pdrop=0.0)
        model = tf.Phi3ForCausalLM(cfg)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**COMMON, **ids, head_dim=16, hidden_activation="gelu_pytorch_tanh")
        model = tf.GemmaForCausalLM(cfg)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**COMMON, **ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        model = tf.Gemma2ForCausalLM(cfg)
    elif arch == "gemma3":
        # 6 layers: llama.cpp's Gemma 3 has every 6th layer global (rope base 1e6), the rest local
        cfg = tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, **ids, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=128,
                                  rope_theta=1000000.0, rope_local_base_freq=10000.0)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    _randomize(model, gemma_norm=gemma, seed=seed)
    model.eval()
    model.save_pretrained(out)
    return out


def read_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def hf_dir_from_gguf(gguf_path: Path, out: Path):
    """A GGUF (e.g. the default SmolLM2 Q4_1) -> dequantized transformers checkpoint in `out`.
    transformers refuses save_pretrained on a GGUF-loaded model, so the float32 state dict and
    the config are written directly. Returns (model, tokenizer) loaded from `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path.parent
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(out)
    del model
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)
