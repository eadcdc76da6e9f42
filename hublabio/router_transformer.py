"""The seed's router format: a transformer classifier exported to ONNX.

The seed's guide trains a DistilBERT sequence classifier and writes:
    router.onnx       inputs input_ids and attention_mask (int64, [batch, seq]), output logits
                      ([batch, n_domains]); seq is fixed (256, padded) unless exported dynamic
    tokenizer.json    from tokenizer.save_pretrained (the fast tokenizer's one file)
    domains.json      {"domains": [...]}, the label order
in `router-model/final/` beside `router-model/router.onnx`. On the device they go in
models/router/; tokenizer.json and domains.json are also looked for in router/final/, as the
seed's training output lays them out.

Tokenizing uses the `tokenizers` package (Rust, wheels for the Pi), the scoring onnxruntime and
numpy: nothing from transformers or torch. The probabilities are softmax(logits).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from hublabio.errors import RouterError
from hublabio.router import DOMAINS_FILE, ONNX_FILE, check_first_run, read_domain_list

TOKENIZER_FILE = "tokenizer.json"
DYNAMIC_MAX_TOKENS = 512  # the longest input when the model was exported with a dynamic length
_SEEN_IN = ("", "final")  # router/ and the seed's router/final/
_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")


def _find(router_dir: Path, name: str) -> Path:
    for sub in _SEEN_IN:
        p = router_dir / sub / name
        if p.is_file():
            return p
    raise RouterError(f"{router_dir / name}: missing; the seed's transformer router needs its "
                      f"{name} beside {ONNX_FILE} (copy it from the training output's final/ "
                      "folder)")


class TransformerRouter:
    """Use `TransformerRouter.load(router_dir, session)` (router.load_router does)."""

    def __init__(self, session, tokenizer, domains: list[str], seq_len: int | None,
                 extra_inputs: list[str], source: Path):
        self._session = session
        self._tokenizer = tokenizer
        self.domains = domains
        self.seq_len = seq_len
        self._extra = extra_inputs  # token_type_ids (BERT exports): zeros
        self.source = source
        self.meta = {"format": "transformer", "seq_len": seq_len}
        self._lock = threading.Lock()  # one tokenizer object, used from several threads

    @classmethod
    def load(cls, router_dir: str | Path, session) -> "TransformerRouter":
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RouterError("the seed's transformer router needs the 'tokenizers' package "
                              "(pip install tokenizers)") from None
        router_dir = Path(router_dir)
        onnx_path = router_dir / ONNX_FILE
        domains, _ = read_domain_list(_find(router_dir, DOMAINS_FILE))
        tok_path = _find(router_dir, TOKENIZER_FILE)
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as err:  # the Rust side raises Exception with its own message
            raise RouterError(f"{tok_path}: not a tokenizers tokenizer.json "
                              f"({str(err).strip()[:200]})") from None
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if "attention_mask" not in inputs or "logits" not in outputs:
            raise RouterError(f"{onnx_path}: a transformer router needs inputs input_ids and "
                              f"attention_mask and an output logits; found inputs "
                              f"{sorted(inputs)}, outputs {outputs}")
        extra = [n for n in inputs if n not in ("input_ids", "attention_mask")]
        if any(n != "token_type_ids" for n in extra):
            raise RouterError(f"{onnx_path}: unexpected inputs {extra} (known: input_ids, "
                              "attention_mask, token_type_ids)")
        shape = inputs["input_ids"].shape
        seq_len = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        tokenizer.enable_truncation(max_length=seq_len or DYNAMIC_MAX_TOKENS)
        pad_id = next((t for t in map(tokenizer.token_to_id, _PAD_TOKENS) if t is not None), 0)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "",
                                 length=seq_len)
        router = cls(session, tokenizer, domains, seq_len, extra, router_dir)
        check_first_run(onnx_path, lambda: router._logits(["routing check"]), "logits",
                        len(domains))
        return router

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The model's inputs for `texts`, as the seed's tokenizer(..., truncation=True,
        padding="max_length") makes them: truncated to seq_len (DYNAMIC_MAX_TOKENS for a dynamic
        export) with the special tokens kept, padded to seq_len (dynamic: to the longest)."""
        with self._lock:
            encs = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        feed = {"input_ids": ids,
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64)}
        for name in self._extra:
            feed[name] = np.zeros_like(ids)
        return feed

    def _logits(self, texts: list[str]) -> np.ndarray:
        return self._session.run(["logits"], self.encode(texts))[0]

    def score_many(self, texts) -> list[dict[str, float]]:
        if not texts:
            return []
        logits = self._logits(list(texts)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return [{d: float(p) for d, p in zip(self.domains, row)} for row in probs]

    def score(self, text: str) -> dict[str, float]:
        return self.score_many([text])[0]
