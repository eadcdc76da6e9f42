"""A router in the seed's format, made the way its training guide makes one, only tiny:

a DistilBERT sequence classifier (transformers, random init, 2 layers of width 32) trained for a
few hundred steps on a handful of labelled questions, exported with torch.onnx.export (inputs
input_ids and attention_mask padded to 256, output logits, opset 14, dynamic batch) to
`<out>/router.onnx`, with `tokenizer.json` and `domains.json` in `<out>/final/` as the seed's
save_pretrained lays them out. The tokenizer is a BERT-style WordPiece over the questions'
words, built with the `tokenizers` package (no download).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SEED_DOMAINS = ["python", "rust", "system", "ai", "general"]  # the seed's label order
SEQ_LEN = 256

QUESTIONS = {
    "python": ["How do I use pandas?", "read a csv with pandas", "python list comprehension",
               "pip install a package in a venv", "python dict keys", "numpy array shape"],
    "rust": ["What is a lifetime in Rust?", "cargo build fails", "rust borrow checker error",
             "rust traits and generics", "tokio async in rust", "rust ownership move"],
    "system": ["restart a systemd service", "linux disk usage command", "ssh key setup",
               "apt upgrade packages", "check memory on linux", "bash script loop"],
    "ai": ["train a neural network", "what is a transformer model", "gradient descent step",
           "fine tune a language model", "overfitting in machine learning", "lora adapters"],
    "general": ["Name three planets.", "what is the capital of france", "tell me a joke",
                "who wrote hamlet", "how tall is mount everest", "a good pasta recipe"],
}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for qs in QUESTIONS.values():
        for q in qs:
            for w in _words(q):
                vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def hf_tokenizer(tokenizer_json: Path):
    """The tokenizer as the seed's training code holds it (transformers' fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def make_seed_router(out: Path, *, steps: int = 300, seed: int = 0):
    """Write the seed-format router into `out`; returns the trained torch model (eval mode)."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    final = out / "final"
    final.mkdir(exist_ok=True)
    make_tokenizer().save(str(final / "tokenizer.json"))
    tok = hf_tokenizer(final / "tokenizer.json")
    (final / "domains.json").write_text(json.dumps({"domains": SEED_DOMAINS}))

    texts = [q for d in SEED_DOMAINS for q in QUESTIONS[d]]
    labels = torch.tensor([SEED_DOMAINS.index(d) for d in SEED_DOMAINS for _ in QUESTIONS[d]])
    batch = tok(texts, truncation=True, max_length=SEQ_LEN, padding="max_length",
                return_tensors="pt")
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, n_layers=2,
                              n_heads=2, num_labels=len(SEED_DOMAINS),
                              max_position_embeddings=SEQ_LEN)
    model = DistilBertForSequenceClassification(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dummy = tok("This is a test query", return_tensors="pt", max_length=SEQ_LEN,
                padding="max_length", truncation=True)
    torch.onnx.export(
        model, (dummy["input_ids"], dummy["attention_mask"]), str(out / "router.onnx"),
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch_size"}, "attention_mask": {0: "batch_size"},
                      "logits": {0: "batch_size"}},
        opset_version=14, dynamo=False)
    return model
