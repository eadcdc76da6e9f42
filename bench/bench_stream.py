"""Streaming through hublabd's HTTP API vs plain llama-cpp-python, interleaved in one run.

Three sides, same GGUF, threads, prompt, token count and greedy decoding:
- raw:    llama_cpp.Llama in this process, `create_completion(stream=True)`;
- stream: POST /v1/completions with "stream": true to a real hublabd subprocess on loopback,
          read chunk by chunk with http.client (what an OpenAI client does);
- whole:  the same request without streaming (speed and TTFT from the engine's `timings`, so
          its TTFT leaves out the HTTP round trip).
Decode tok/s = (tokens - 1) / (last token - first token) as the client sees them. Each rep uses
a fresh prompt prefix (no KV reuse) and rotates the order. The raw side gets the same CPU
policy as the daemon (hublabio.llama.cpu, "auto": no AMX buffers, other repacks kept) so that
it does not crash on an AMX host and compares like with like.

  python bench/bench_stream.py [--threads N] [--tokens 64] [--reps 6] [--model PATH]

--threads defaults to what a user gets: the board's default (every core on a generic host).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hublabio.board import detect_board
from hublabio.llama import backend, repack_policy
from hublabio.paths import embedded_model_path

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
          "bottle. Describe the sea, the weather and every room of the lighthouse.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model: Path, threads: int, workdir: Path, port: int) -> subprocess.Popen:
    models = workdir / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "bench"\npath = "{model}"\n\n[inference]\ncontext_size = 512\n'
        "max_tokens = 512\n")
    env = {**os.environ, "HUBLAB_STATE_DIR": str(workdir / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "hublabio.daemon.main", "--models-dir",
                             str(models), "--socket", str(workdir / "d.sock"), "--threads",
                             str(threads), "--threads-batch", str(threads), "--budget-mb", "4096",
                             "--http", f"127.0.0.1:{port}", "--log-level", "WARNING"], env=env)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("hublabd did not start within 60 s")


def body(prompt: str, n: int, stream: bool) -> bytes:
    return json.dumps({"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "top_k": 1, "repeat_penalty": 1.0, "stream": stream,
                       "stream_options": {"include_usage": True}}).encode()


def http_stream(port: int, prompt: str, n: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body(prompt, n, True),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    count, text = 0, []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        piece = "".join(c.get("text", "") for c in chunk.get("choices") or [])
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
            text.append(piece)
    conn.close()
    return {"ttft": first - t0, "tokens": count, "tps": (count - 1) / (last - first),
            "text": "".join(text)}


def http_whole(port: int, prompt: str, n: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body(prompt, n, False),
                 {"Content-Type": "application/json"})
    data = json.loads(conn.getresponse().read())
    conn.close()
    t = data["timings"]
    return {"ttft": t["ttft_ms"] / 1e3, "tokens": t["predicted_n"],
            "tps": t["predicted_per_second"], "text": data["choices"][0]["text"],
            "wall": time.perf_counter() - t0}


def raw_stream(llm, prompt: str, n: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    count, text = 0, []
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1,
                                       repeat_penalty=1.0, stream=True):
        piece = chunk["choices"][0]["text"]
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
        text.append(piece)
    return {"ttft": first - t0, "tokens": count, "tps": (count - 1) / (last - first),
            "text": "".join(text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=embedded_model_path())
    ap.add_argument("--threads", type=int, default=0, help="0 = the board's default")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    threads = args.threads or detect_board().threads

    import llama_cpp

    backend.apply_policy(repack_policy("auto"))  # the raw side: same buffer types as hublabd
    llm = llama_cpp.Llama(str(args.model), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False,
                          flash_attn=True)  # llama.cpp's auto on CPU, as in hublabd
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hlb", dir="/tmp") as tmp:
        proc = start_daemon(args.model, threads, Path(tmp), port)
        try:
            sides = {"raw": lambda p, n: raw_stream(llm, p, n),
                     "stream": lambda p, n: http_stream(port, p, n),
                     "whole": lambda p, n: http_whole(port, p, n)}
            for fn in sides.values():  # page in the weights, build the graphs
                fn("Warm up: " + PROMPT, 8)
            names = list(sides)
            rows = []
            for rep in range(args.reps):
                # raw and stream answer the same prompt (compared below); whole gets its own, so
                # that no side finds its prompt in the daemon's KV cache
                prompts = {"raw": f"Story number {rep + 1}. {PROMPT}",
                           "stream": f"Story number {rep + 1}. {PROMPT}",
                           "whole": f"Story number {rep + 1}, told again. {PROMPT}"}
                order = names[rep % len(names):] + names[:rep % len(names)]
                rows.append({name: sides[name](prompts[name], args.tokens) for name in order})
                print(f"rep {rep + 1:2d}: " + " | ".join(
                    f"{n} {rows[-1][n]['tps']:6.1f} tok/s ({rows[-1][n]['tokens']} tok)"
                    for n in names), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    med = statistics.median
    print(f"\nmodel {args.model.name}, threads {threads}, {args.tokens} tokens, {args.reps} reps "
          f"(order rotated), {platform.machine()} {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print("| side | median tok/s | median TTFT ms |\n| --- | --- | --- |")
    labels = {"raw": "llama-cpp-python Llama, stream=True", "stream": "hublabd HTTP, stream: true",
              "whole": "hublabd HTTP, stream: false"}
    for n in names:
        print(f"| {labels[n]} | {med(r[n]['tps'] for r in rows):.1f} | "
              f"{med(r[n]['ttft'] for r in rows) * 1e3:.1f} |")
    for a, b in (("stream", "raw"), ("stream", "whole")):
        ratio = med(r[a]["tps"] / r[b]["tps"] for r in rows)
        print(f"{a} / {b} tok/s (median of paired reps): {ratio:.3f} (goal >= 0.97: "
              f"{'met' if ratio >= 0.97 else 'NOT met'})")
    same = sum(r["stream"]["text"] == r["raw"]["text"] for r in rows)
    print(f"identical greedy text raw vs stream in {same}/{len(rows)} reps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
