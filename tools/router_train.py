"""Train the device's domain router from labelled queries and export it to ONNX.

Input: jsonl lines {"text": "...", "domain": "..."} (data/router_queries.jsonl ships with the
repo). Texts are featurized with hublabio.router_features (the exact code the device runs), a
small PyTorch model (one hidden layer, or linear with --hidden 0) is trained on a stratified
split, and the held-out part is reported: accuracy, per-domain precision/recall/F1, the
confusion matrix, and the keyword router's accuracy on the same queries for comparison.

--extra FILE (repeatable) adds labelled rows to the training split only: rows built from
documentation by `prepare-data --docs --router-domain DOMAIN`. The held-out split is drawn
from --data alone, so the held-out report stays comparable with and without them. Their
domains must be domains of --data.

Writes into --out: router.onnx (input "features" float32 [batch, dim], output "probs"
[batch, n_domains]), domains.json (domains, hashing parameters, training record) and
metrics.json (the full held-out report). The ONNX outputs are checked against the PyTorch
model on the held-out split (max abs difference <= 1e-5) before anything is written.
The same --seed gives the same split, model and metrics.

Example:
  hublab-tools train-router --data data/router_queries.jsonl --out models/router --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hublabio.errors import RouterError
from hublabio.fsutil import atomic_write_bytes, file_sha256
from hublabio.router import DOMAINS_FILE, INPUT_NAME, ONNX_FILE, OUTPUT_NAME, KeywordRouter
from hublabio.router_features import FeatureSpec, featurize
from hublabio_tools.common import ToolError, iter_jsonl, main_guard, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
ONNX_TOLERANCE = 1e-5
MAX_PARAMS = 10_000_000


@dataclass
class Example:
    text: str
    domain: str
    line: int


def read_examples(path: str | Path) -> list[Example]:
    """All examples of a labelled jsonl; every bad line is reported (file:line: why) at once."""
    examples, problems = [], []
    for item in iter_jsonl(path):
        if item.error:
            problems.append(f"{item.where}: {item.error}")
            continue
        value = item.value
        if not isinstance(value, dict):
            problems.append(f"{item.where}: expected an object with \"text\" and \"domain\"")
            continue
        text, domain = value.get("text"), value.get("domain")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{item.where}: \"text\" must be a non-empty string")
        elif not isinstance(domain, str) or not domain.strip():
            problems.append(f"{item.where}: \"domain\" must be a non-empty string")
        else:
            examples.append(Example(text, domain.strip(), item.line))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ToolError(f"{len(problems)} bad line(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise ToolError(f"{path}: no examples")
    return examples


def read_extra(paths: list[str], index: dict[str, int]
               ) -> tuple[list[str], list[int], list[dict]]:
    """Texts, label indices and a record (file, sha256, rows per domain, and the prepare-data
    arguments that made it when its router_DOMAIN_meta.json lies beside it) of the --extra
    files; a domain that --data does not have is an error naming the file and line."""
    texts, labels, record = [], [], []
    for path in paths:
        rows = read_examples(path)
        unknown = [e for e in rows if e.domain not in index]
        if unknown:
            e = unknown[0]
            raise ToolError(f"{path}:{e.line}: domain {e.domain!r} is not a domain of --data "
                            f"({', '.join(index)}); {len(unknown)} such row(s)")
        texts += [e.text for e in rows]
        labels += [index[e.domain] for e in rows]
        counts = {d: n for d in index if (n := sum(e.domain == d for e in rows))}
        entry = {"file": Path(path).name, "sha256": file_sha256(Path(path)),
                 "rows": len(rows), "domains": counts}
        made = Path(path).with_name(Path(path).stem + "_meta.json")   # prepare-data's record
        if made.is_file():
            try:
                entry["prepare_data_argv"] = json.loads(made.read_text())["argv"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ToolError(f"{made}: not a prepare-data --router-domain record ({err}); "
                                "remake it or move it away") from None
        record.append(entry)
    return texts, labels, record


def stratified_split(labels: np.ndarray, n_classes: int, holdout: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): round(holdout * n) of each class (at least one) held
    out, chosen by a numpy Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        n_held = min(max(1, int(round(holdout * members.size))), members.size - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def build_model(dim: int, hidden: int, n_classes: int, dropout: float):
    import torch

    if hidden <= 0:
        return torch.nn.Linear(dim, n_classes)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(dropout), torch.nn.Linear(hidden, n_classes))


def train_model(x: np.ndarray, y: np.ndarray, n_classes: int, args,
                quiet: bool = False) -> "torch.nn.Module":
    import torch

    torch.manual_seed(args.seed)
    model = build_model(x.shape[1], args.hidden, n_classes, args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(yt), generator=gen)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if not quiet and (args.verbose or epoch == args.epochs - 1):
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {total / len(yt):.4f}")
    model.eval()
    return model


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: over `bins` equal-width bins of the top probability, the mean |accuracy - mean top
    probability| weighted by the bin's share of the questions."""
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    which = np.minimum((top * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - top[inside].mean())
    return float(ece)


BANDS = (0.0, 0.5, 0.7, 0.9, 1.0)


def reliability(probs: np.ndarray, labels: np.ndarray, edges=BANDS) -> list[dict]:
    """Per band [lo, hi) of the top probability (the last band includes 1): how many questions
    fall in it, the share routed right and their mean top probability."""
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    out = []
    for lo, hi in zip(edges, edges[1:]):
        inside = (top >= lo) & ((top < hi) if hi < edges[-1] else (top <= hi))
        n = int(inside.sum())
        out.append({"band": [lo, hi], "n": n,
                    "accuracy": round(float(right[inside].mean()), 4) if n else None,
                    "mean_probability": round(float(top[inside].mean()), 4) if n else None})
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T) (a log-spaced
    grid from 0.05 to 20, then refined around the best point)."""
    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    fine = np.linspace(best / 1.06, best * 1.06, 41)
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def out_of_fold_logits(x: np.ndarray, y: np.ndarray, n_classes: int, args,
                       folds: int, extra_x: np.ndarray | None = None,
                       extra_y: np.ndarray | None = None) -> np.ndarray:
    """Each training example's logits from a model trained on the other folds (stratified,
    seeded), so the temperature is fitted on answers to questions the model did not see.
    extra_x/extra_y (the --extra rows) join every fold's training set and get no logits: the
    temperature is fitted on questions, not on documentation headings."""
    import torch

    if extra_x is None:
        extra_x = np.zeros((0, x.shape[1]), dtype=x.dtype)
        extra_y = np.zeros(0, dtype=np.int64)

    rng = np.random.default_rng(args.seed + 1)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        fold_of[rng.permutation(idx)] = np.arange(len(idx)) % folds
    logits = np.zeros((len(y), n_classes), dtype=np.float64)
    for k in range(folds):
        rest = fold_of != k
        model = train_model(np.concatenate([x[rest], extra_x]),
                            np.concatenate([y[rest], extra_y]), n_classes, args, quiet=True)
        with torch.no_grad():
            logits[fold_of == k] = model(torch.from_numpy(x[fold_of == k])).numpy()
    return logits


def scale_logits(model, temperature: float) -> None:
    """Divide the model's output layer by `temperature` (softmax(logits / T), exactly)."""
    import torch

    last = model if isinstance(model, torch.nn.Linear) else model[-1]
    with torch.no_grad():
        last.weight /= temperature
        last.bias /= temperature


class _WithSoftmax:
    """Wraps the logits model so the exported graph outputs probabilities."""

    def __new__(cls, model):
        import torch

        class Probs(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, features):
                return torch.softmax(self.model(features), dim=-1)

        return Probs().eval()


def export_onnx(model, dim: int) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithSoftmax(model), (torch.zeros(1, dim),), buf,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


def onnx_probs(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def report(y_true: np.ndarray, y_pred: np.ndarray, domains: list[str]) -> dict:
    """Accuracy, per-domain precision/recall/F1/support, macro F1, confusion matrix
    (rows: true domain, columns: predicted)."""
    n = len(domains)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    per = {}
    for i, d in enumerate(domains):
        tp = int(cm[i, i])
        predicted, actual = int(cm[:, i].sum()), int(cm[i, :].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per[d] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4),
                  "support": actual}
    return {"accuracy": round(float(np.mean(y_true == y_pred)), 4),
            "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])), 4),
            "per_domain": per, "confusion": cm.tolist()}


def keyword_predictions(texts: list[str], keywords: dict[str, list[str]], domains: list[str],
                        fallback: str = "general") -> np.ndarray:
    """The keyword router's pick per text (its top domain; `fallback` when nothing matches,
    as on the device)."""
    router = KeywordRouter(keywords)
    index = {d: i for i, d in enumerate(domains)}
    out = []
    for text in texts:
        scores = router.score(text)
        best = max(sorted(scores), key=lambda d: scores[d]) if scores else None
        pick = best if best is not None and scores[best] > 0 else fallback
        out.append(index.get(pick, index.get(fallback, 0)))
    return np.asarray(out)


def load_keywords(experts_dir: Path) -> dict[str, list[str]]:
    from hublabio.config import load_experts

    experts, errors = load_experts(experts_dir)
    if errors:
        raise ToolError("; ".join(str(e) for e in errors))
    table: dict[str, list[str]] = {}
    for cfg in experts:
        table.setdefault(cfg.expert.domain, []).extend(cfg.expert.keywords)
    return table


def format_report(rep: dict, domains: list[str], title: str) -> str:
    width = max(8, *(len(d) for d in domains))
    lines = [f"{title}: accuracy {rep['accuracy']:.4f}  macro F1 {rep['macro_f1']:.4f}",
             f"  {'domain':<{width}}  precision  recall     f1  support"]
    for d in domains:
        v = rep["per_domain"][d]
        lines.append(f"  {d:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  "
                     f"{v['f1']:5.3f}  {v['support']:7d}")
    lines.append("  confusion (rows: true, columns: predicted)")
    lines.append("  " + " " * width + "  " + " ".join(f"{d[:7]:>7}" for d in domains))
    for d, row in zip(domains, rep["confusion"]):
        lines.append(f"  {d:<{width}}  " + " ".join(f"{c:7d}" for c in row))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="hublab-tools train-router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO_ROOT / "data" / "router_queries.jsonl"),
                   help="labelled jsonl {text, domain} (default: the shipped query set)")
    p.add_argument("--extra", action="append", default=[], metavar="FILE",
                   help="labelled jsonl rows for the training split only (repeatable)")
    p.add_argument("--out", default="models/router", help="output folder (default models/router)")
    p.add_argument("--seed", type=int, default=0, help="split, init and shuffle seed (default 0)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--holdout", type=float, default=0.2,
                   help="held-out fraction per domain, stratified (default 0.2)")
    p.add_argument("--hidden", type=int, default=0,
                   help="hidden units of a one-hidden-layer MLP; 0 = linear softmax (default 0:"
                        " on the shipped data an MLP was no more accurate and 10x slower)")
    p.add_argument("--dim", type=int, default=FeatureSpec().dim,
                   help="hashed feature dimension, a power of two (default %(default)s)")
    p.add_argument("--word-ngrams", type=int, default=FeatureSpec().word_ngrams,
                   help="word n-grams up to this n (default %(default)s)")
    p.add_argument("--char-min", type=int, default=FeatureSpec().char_min,
                   help="shortest byte n-gram (default %(default)s)")
    p.add_argument("--char-max", type=int, default=FeatureSpec().char_max,
                   help="longest byte n-gram; 0 disables them (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.2, help="MLP only")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--calibrate-folds", type=int, default=5,
                   help="fit a softmax temperature on out-of-fold logits of this many folds of "
                        "the training split, so probabilities mean what they say (default 5; "
                        "0 = no calibration)")
    p.add_argument("--experts", default=str(REPO_ROOT / "models"),
                   help="models dir whose experts/*.toml keywords give the keyword-router "
                        "comparison (default: the repo's models/)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest on a busy machine)")
    p.add_argument("--verbose", action="store_true", help="print the loss of every epoch")
    return p


def train_router(args) -> dict:
    """Everything main() does, returning the metrics (used by tests)."""
    import torch

    if not 0 < args.holdout < 1:
        raise ToolError(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.epochs < 1:
        raise ToolError(f"--epochs must be >= 1, got {args.epochs}")
    if args.calibrate_folds == 1 or args.calibrate_folds < 0:
        raise ToolError(f"--calibrate-folds must be 0 (off) or at least 2, got "
                        f"{args.calibrate_folds}")
    try:
        spec = FeatureSpec.from_dict({**FeatureSpec().to_dict(), "dim": args.dim,
                                      "word_ngrams": args.word_ngrams,
                                      "char_min": args.char_min, "char_max": args.char_max})
    except RouterError as err:
        raise ToolError(f"feature options: {err}") from None
    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()
    data_path = Path(args.data)
    examples = read_examples(data_path)
    domains = sorted({e.domain for e in examples})
    if len(domains) < 2:
        raise ToolError(f"{data_path}: need at least two domains, found {domains}")
    counts = {d: sum(e.domain == d for e in examples) for d in domains}
    small = {d: c for d, c in counts.items() if c < 2}
    if small:
        raise ToolError(f"{data_path}: every domain needs at least 2 examples for a held-out "
                        f"split; too few: {small}")
    index = {d: i for i, d in enumerate(domains)}
    texts = [e.text for e in examples]
    labels = np.array([index[e.domain] for e in examples], dtype=np.int64)
    train_idx, held_idx = stratified_split(labels, len(domains), args.holdout, args.seed)
    print(f"{len(examples)} examples, {len(domains)} domains "
          + ", ".join(f"{d} {counts[d]}" for d in domains)
          + f"; train {len(train_idx)}, held out {len(held_idx)} (seed {args.seed})")

    extra_texts, extra_labels, extra_record = read_extra(args.extra, index)
    x = featurize(texts, spec)
    x_extra = featurize(extra_texts, spec) if extra_texts \
        else np.zeros((0, spec.dim), dtype=x.dtype)
    y_extra = np.array(extra_labels, dtype=np.int64)
    x_train = np.concatenate([x[train_idx], x_extra])
    y_train = np.concatenate([labels[train_idx], y_extra])
    if extra_texts:
        print(f"+ {len(extra_texts)} training-only rows from --extra: "
              + ", ".join(f"{r['file']} {r['rows']}" for r in extra_record))
    model = train_model(x_train, y_train, len(domains), args)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:
        raise ToolError(f"model has {n_params} parameters, over the device limit {MAX_PARAMS}; "
                        "lower --hidden or --dim")

    x_held = x[held_idx]
    y_held = labels[held_idx]
    with torch.no_grad():
        raw_probs = torch.softmax(model(torch.from_numpy(x_held)), dim=-1).numpy()
    temperature = 1.0
    if args.calibrate_folds:
        oof = out_of_fold_logits(x[train_idx], labels[train_idx], len(domains), args,
                                 args.calibrate_folds, x_extra, y_extra)
        temperature = fit_temperature(oof, labels[train_idx])
        scale_logits(model, temperature)
    with torch.no_grad():
        torch_probs = torch.softmax(model(torch.from_numpy(x_held)), dim=-1).numpy()
    onnx_bytes = export_onnx(model, spec.dim)
    ort_probs = onnx_probs(onnx_bytes, x_held)
    diff = float(np.max(np.abs(ort_probs - torch_probs)))
    if not diff <= ONNX_TOLERANCE:
        raise ToolError(f"ONNX outputs differ from PyTorch on the held-out split: max abs "
                        f"difference {diff:.3g} > {ONNX_TOLERANCE}; nothing written")
    model_rep = report(y_held, ort_probs.argmax(axis=1), domains)
    model_rep["ece"] = round(expected_calibration_error(ort_probs, y_held), 4)
    model_rep["ece_uncalibrated"] = round(expected_calibration_error(raw_probs, y_held), 4)
    model_rep["mean_top_probability"] = round(float(ort_probs.max(axis=1).mean()), 4)
    model_rep["reliability"] = reliability(ort_probs, y_held)
    model_rep["reliability_uncalibrated"] = reliability(raw_probs, y_held)
    held_texts = [texts[i] for i in held_idx]
    keywords = load_keywords(Path(args.experts))
    if keywords:
        kw_rep = report(y_held, keyword_predictions(held_texts, keywords, domains), domains)
    else:
        kw_rep = None
    misrouted = [{"text": held_texts[i], "domain": domains[y_held[i]],
                  "predicted": domains[int(ort_probs[i].argmax())],
                  "probability": round(float(ort_probs[i].max()), 3)}
                 for i in range(len(held_idx)) if ort_probs[i].argmax() != y_held[i]]

    data_sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
    trained = {
        "by": "hublab-tools train-router", "data": data_path.name, "data_sha256": data_sha,
        "seed": args.seed, "epochs": args.epochs, "holdout": args.holdout,
        "hidden": args.hidden, "parameters": n_params, "lr": args.lr,
        "weight_decay": args.weight_decay, "dropout": args.dropout,
        "label_smoothing": args.label_smoothing, "batch_size": args.batch_size,
        "n_train": int(len(train_idx)), "n_holdout": int(len(held_idx)),
        "extra": extra_record, "n_train_extra": len(extra_texts),
        "calibrate_folds": args.calibrate_folds, "temperature": round(temperature, 4),
        "accuracy": model_rep["accuracy"], "macro_f1": model_rep["macro_f1"],
        "ece": model_rep["ece"], "ece_uncalibrated": model_rep["ece_uncalibrated"],
        "keyword_accuracy": kw_rep["accuracy"] if kw_rep else None,
        "onnx_max_abs_diff": diff, "torch": torch.__version__,
    }
    metrics = {"domains": domains, "trained": trained, "holdout": model_rep,
               "keyword_router": kw_rep, "misrouted": misrouted}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ONNX_FILE, onnx_bytes)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / DOMAINS_FILE, {"domains": domains, "features": spec.to_dict(),
                                           "trained": trained})
    print(format_report(model_rep, domains, "router (ONNX) on the held-out split"))
    if kw_rep:
        print(format_report(kw_rep, domains, "keyword router on the same split"))
    print(f"calibration: temperature {temperature:.3f} (fitted on {args.calibrate_folds}-fold "
          f"out-of-fold logits of the training split); held-out ECE "
          f"{model_rep['ece_uncalibrated']:.4f} -> {model_rep['ece']:.4f}, mean top "
          f"probability {model_rep['mean_top_probability']:.3f} vs accuracy "
          f"{model_rep['accuracy']:.3f}")
    print(f"ONNX vs PyTorch max abs difference {diff:.2e} (limit {ONNX_TOLERANCE})")
    print(f"{n_params} parameters; wrote {out / ONNX_FILE}, {out / DOMAINS_FILE}, "
          f"{out / 'metrics.json'} in {time.perf_counter() - started:.1f} s")
    return metrics


@main_guard
def main(argv: list[str] | None = None) -> int:
    """Train the router (see the module docstring)."""
    train_router(build_parser().parse_args(argv))
    return 0


main.__doc__ = __doc__

if __name__ == "__main__":
    sys.exit(main())
