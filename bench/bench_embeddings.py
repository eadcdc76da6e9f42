"""What /v1/embeddings costs and what its vectors are worth, on the embedded SmolLM2.

Speed: input tokens per second of Engine.embed (chunks of EMBED_CHUNK tokens, every token an
output) against plain prompt processing of the same tokens (Engine.bench's pp), interleaved,
at the board's default thread count. Quality: cosine similarity of paraphrase pairs against
unrelated pairs — mean-pooled hidden states of a chat model, not a trained sentence encoder.

  python bench/bench_embeddings.py [--threads N] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from hublabio.board import detect_board
from hublabio.engine import Engine
from hublabio.paths import embedded_model_path

PARAPHRASES = [
    ("How do I read a CSV file with pandas?", "Load a comma-separated file into a DataFrame."),
    ("Why does the borrow checker reject my code?", "Rust says my value was moved; why?"),
    ("How do I list open ports on Linux?", "Which command shows the listening sockets?"),
    ("What is gradient descent?", "How does a neural network's training minimise the loss?"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="0 = the board's default")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    threads = args.threads or detect_board().threads
    e = Engine(embedded_model_path(), n_ctx=512, threads=threads)
    tokens = e.embed_tokens("The quick brown fox jumps over the lazy dog. " * 20)[:256]
    emb, pp = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        e.embed(tokens)
        emb.append(len(tokens) / (time.perf_counter() - t0))
        pp.append(e.bench(pp=len(tokens), tg=1)["pp_tps"])
    print(f"threads {threads}, {len(tokens)} tokens, {args.rounds} rounds interleaved")
    print(f"embed: {statistics.median(emb):.0f} tok/s   prompt processing: "
          f"{statistics.median(pp):.0f} tok/s   ratio {statistics.median(emb) / statistics.median(pp):.2f}")

    vec = {t: e.embed(e.embed_tokens(t)) for pair in PARAPHRASES for t in pair}
    same = [float(vec[a] @ vec[b]) for a, b in PARAPHRASES]
    other = [float(vec[a] @ vec[PARAPHRASES[(i + 1) % len(PARAPHRASES)][1]])
             for i, (a, _) in enumerate(PARAPHRASES)]
    print(f"cosine, paraphrases: {' '.join(f'{c:.3f}' for c in same)} (mean {statistics.mean(same):.3f})")
    print(f"cosine, unrelated:   {' '.join(f'{c:.3f}' for c in other)} (mean {statistics.mean(other):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
