"""Generation speed through hublabd vs raw llama-cpp-python, interleaved in one run.

Both sides use the same GGUF, thread count, prompt, token count and greedy decoding
(temperature 0, no repeat penalty). The daemon runs as a real subprocess
(`python -m hublabio.daemon.main`) and is driven through hublabio.client over its Unix socket;
the raw side is `llama_cpp.Llama` in this process. Each repetition uses a fresh prompt prefix so
neither side reuses the previous prompt's KV cache, and the order alternates (raw first, then
daemon first) so drift on a shared machine hits both.

Reported per side: CPU time per token (this process, plus the daemon process for the daemon
side — the cost that decides speed on an idle board, and far less noisy than wall time on a
shared machine), decode tok/s = (tokens - 1) / (last token - first token), and time to first
token (TTFT, request sent → first token received, prompt processing included). Targets:
daemon/raw tok/s ratio >= 0.97 and added TTFT (daemon - raw, paired per repetition) <= 10 ms.
Because that paired difference carries the machine's noise, the daemon's own overhead is also
measured inside each request: client-side TTFT minus the TTFT the engine reports (socket,
queue, worker thread, settings, pool lease and the token's way back).

  python bench/bench_daemon.py [--model PATH] [--threads 1] [--tokens 64] [--reps 9] [--engine]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import psutil

from hublabio.client import Client
from hublabio.paths import embedded_model_path

DAEMON: "psutil.Process | None" = None  # set once the daemon runs


def cpu_s(with_daemon: bool = False) -> float:
    """CPU seconds used so far by this process (+ the daemon's when asked): unlike wall time,
    barely affected by other programs competing for the cores."""
    total = time.process_time()
    if with_daemon and DAEMON is not None:
        t = DAEMON.cpu_times()
        total += t.user + t.system
    return total


PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
          "bottle. Describe the sea, the weather and every room of the lighthouse.")


def raw_run(llm: llama_cpp.Llama, prompt: str, n: int) -> dict:
    c0 = cpu_s(False)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    text = []
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1,
                                       top_p=1.0, repeat_penalty=1.0, stream=True):
        if chunk["choices"][0]["finish_reason"] is not None:
            break  # the closing chunk carries no token
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
        text.append(chunk["choices"][0]["text"])
    cpu = cpu_s(False) - c0
    return {"ttft": first - t0, "tokens": count, "tps": (count - 1) / (last - first),
            "cpu_ms_per_token": cpu * 1e3 / count,
            "text": "".join(text)}


def daemon_run(client: Client, prompt: str, n: int) -> dict:
    c0 = cpu_s(True)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    text = []
    engine_ttft = None
    for ev in client.stream("generate", prompt=prompt, options={
            "max_tokens": n, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "repeat_penalty": 1.0}):
        if ev["type"] == "result":
            engine_ttft = ev["data"]["ttft_s"]
        if ev["type"] != "token":
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
        text.append(ev["text"])
    cpu = cpu_s(True) - c0
    return {"ttft": first - t0, "tokens": count, "tps": (count - 1) / (last - first),
            "cpu_ms_per_token": cpu * 1e3 / count,
            "text": "".join(text), "overhead": first - t0 - engine_ttft}


def engine_run(engine, prompt: str, n: int) -> dict:
    from hublabio.engine import SamplingOptions

    opts = SamplingOptions(max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
    c0 = cpu_s(False)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    text = []
    for tok in engine.generate(prompt, opts):
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
        text.append(tok.text)
    cpu = cpu_s(False) - c0
    return {"ttft": first - t0, "tokens": count, "tps": (count - 1) / (last - first),
            "cpu_ms_per_token": cpu * 1e3 / count,
            "text": "".join(text)}


def start_daemon(model: Path, threads: int, workdir: Path):
    models = workdir / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "bench"\npath = "{model}"\n\n[inference]\ncontext_size = 512\n'
        f"threads = {threads}\nmax_tokens = 512\n")
    sock = workdir / "d.sock"
    env = {**os.environ, "HUBLAB_STATE_DIR": str(workdir / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "hublabio.daemon.main", "--models-dir",
                             str(models), "--socket", str(sock), "--threads", str(threads),
                             "--budget-mb", "4096", "--log-level", "WARNING"], env=env)
    global DAEMON
    DAEMON = psutil.Process(proc.pid)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            return proc, Client(sock, timeout=600)
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("hublabd did not start within 60 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=embedded_model_path())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--engine", action="store_true", help="also time hublabio.engine in this "
                    "process (splits the daemon's cost into engine vs socket/queue)")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = ap.parse_args()

    from hublabio.llama import backend, repack_policy

    backend.apply_policy(repack_policy("auto"))  # the raw side: hublabd's buffer types, no AMX
    llm = llama_cpp.Llama(str(args.model), n_ctx=512, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    engine = None
    if args.engine:
        from hublabio.engine import Engine

        engine = Engine(args.model, n_ctx=512, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="hlb", dir="/tmp") as tmp:
        proc, client = start_daemon(args.model, args.threads, Path(tmp))
        try:
            client.call("models.load", name="bench")
            sides = {"raw": lambda p, n: raw_run(llm, p, n),
                     "daemon": lambda p, n: daemon_run(client, p, n)}
            if engine is not None:
                sides["engine"] = lambda p, n: engine_run(engine, p, n)
            for fn in sides.values():  # page in the weights, build the graphs
                fn("Warm up: " + PROMPT, 8)
            rtts = []
            for _ in range(50):  # the transport floor: a quick op's round trip
                t0 = time.perf_counter()
                client.call("hello")
                rtts.append((time.perf_counter() - t0) * 1e3)
            names = list(sides)
            rows = []
            for rep in range(args.reps):
                prompt = f"Story number {rep + 1}. {PROMPT}"
                order = names[rep % len(names):] + names[:rep % len(names)]
                row = {name: sides[name](prompt, args.tokens) for name in order}
                row["same_text"] = row["raw"]["text"] == row["daemon"]["text"]
                rows.append(row)
                print(f"rep {rep + 1:2d}: " + " | ".join(
                    f"{n} {row[n]['tps']:6.1f} tok/s ttft {row[n]['ttft'] * 1e3:6.1f} ms "
                    f"({row[n]['tokens']} tok)" for n in names), flush=True)
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)

    med = statistics.median
    print()
    print(f"model {args.model.name}, threads {args.threads}, {args.tokens} tokens, {args.reps} reps "
          f"(order rotated), {platform.machine()} {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print("| side | median tok/s | median TTFT ms | median CPU ms per token (prompt included) |")
    print("| --- | --- | --- | --- |")
    labels = {"raw": "raw llama-cpp-python (Llama)", "daemon": "hublabd via Unix socket",
              "engine": "hublabio.engine in-process"}
    for n in names:
        print(f"| {labels[n]} | {med(r[n]['tps'] for r in rows):.1f} | "
              f"{med(r[n]['ttft'] for r in rows) * 1e3:.1f} | "
              f"{med(r[n]['cpu_ms_per_token'] for r in rows):.2f} |")
    ratio = med(r["daemon"]["tps"] / r["raw"]["tps"] for r in rows)
    add = med((r["daemon"]["ttft"] - r["raw"]["ttft"]) * 1e3 for r in rows)
    print(f"\nratio daemon/raw tok/s (median of paired reps): {ratio:.3f}  (target >= 0.97: "
          f"{'met' if ratio >= 0.97 else 'NOT met'})")
    print(f"added TTFT daemon - raw (median of paired reps): {add:+.1f} ms  (target <= 10 ms: "
          f"{'met' if add <= 10 else 'NOT met'})")
    if engine is not None:
        eratio = med(r["daemon"]["tps"] / r["engine"]["tps"] for r in rows)
        eadd = med((r["daemon"]["ttft"] - r["engine"]["ttft"]) * 1e3 for r in rows)
        print(f"daemon vs in-process engine: tok/s ratio {eratio:.3f}, added TTFT {eadd:+.1f} ms "
              "(the socket + queue + thread hand-off alone)")
    same = [r for r in rows if r["raw"]["tokens"] == r["daemon"]["tokens"]] or rows
    cpu_ratio = med(r["raw"]["cpu_ms_per_token"] / r["daemon"]["cpu_ms_per_token"] for r in same)
    print(f"CPU-time ratio raw/daemon per token (median of {len(same)} paired reps with equal token "
          f"counts; daemon = daemon process + client): {cpu_ratio:.3f}  (what the speed ratio "
          f"would be on an otherwise idle machine)")
    over = [r["daemon"]["overhead"] * 1e3 for r in rows]
    print(f"daemon's own TTFT overhead, measured inside each request (client TTFT - the engine's "
          f"TTFT): median {med(over):.2f} ms, min {min(over):.2f} ms, max {max(over):.2f} ms")
    print(f"round trip of a quick op (hello) over the socket: median {med(rtts):.2f} ms, "
          f"min {min(rtts):.2f} ms")
    print(f"identical greedy text raw vs daemon in {sum(r['same_text'] for r in rows)}/{len(rows)} reps")
    if args.json:
        print(json.dumps({"rows": rows, "ratio": ratio, "added_ttft_ms": add}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
