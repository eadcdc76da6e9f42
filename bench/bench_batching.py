"""Several clients at once: hublabd (continuous batching) against llama-server -np N.

For each client count N (default 1, 2, 4, 8) and round, both servers are started fresh as
subprocesses on the same GGUF with the same threads, N slots and a 512-token context per slot,
and N clients each send the same greedy streamed /v1/completions request at once, with no
repeat penalty (--server-defaults: each server's own, 1.1 for hublabd, 1.0 for llama-server);
the two servers alternate within each round (hublabd first in even rounds, llama-server first in odd
ones) so drift on a shared machine hits both. Reported per server and N: total decode tok/s
(every client's completion tokens / the wall time from the first request to the last answer),
decode tok/s (the tokens after each client's first / the time from the first first token to the
last answer: fair when the answers differ in length, as at each server's own defaults) and
p50 / p90 time to first token over all clients and rounds.

hublabd runs at its defaults (repack "auto" of hublabio.llama.cpu); llama-server gets
--no-repack on an Intel AMX host (its AMX kernels segfault there, llama.cpp #20824).

  python bench/bench_batching.py --llama-server /tmp/llama-build/bin/llama-server \\
      [--threads N] [--tokens 64] [--clients 1,2,4,8] [--rounds 2]
  python bench/bench_batching.py --moe [--adapters] [--threads N] [--tokens 64] [--rounds 3]

  python bench/bench_batching.py --raw [--threads N]
  python bench/bench_batching.py --switch [--threads N] [--rounds 10]
  python bench/bench_batching.py --contexts [--threads N] [--rounds 10]

--switch: time to first token of an expert (LoRA adapter A) asked again right after itself
(a cache hit) and right after another expert (adapter B) on the same engine, each expert
keeping its prefix in a slot of its own: 2 slots of one context (it re-applies the adapter set
on every switch) against 2 contexts of one slot (Engine.add_context: each keeps its set),
interleaved; the adapters are random LoRA GGUFs of the test fixture's shape
(tests/integration/lora_fixture.py).

--contexts: MoE-R TopK(2) over two experts with different random LoRA adapters, with one
context and with a context per adapter set (adapter_contexts 1 and 2), two pools in one process
alternating query by query.

--raw: the floor under both servers: one llama_decode of N sequences' next tokens (N = 1, 2, 4,
8, in a bare loop on hublabio.llama's Context, no server, no Python between decodes).
--moe: MoE-R wall time of Single, TopK(2) and All (the five shipped prompt-only experts over
the embedded SmolLM2, greedy, `tokens` each, synthesis best) with continuous batching (5
slots: the experts answer at once) and with batch_mode off (one after another), interleaved.
--moe --adapters: the four domain experts get a random LoRA adapter each (the test fixture's);
batching on is run twice, with the board's adapter_contexts (the daemon's default: a context
per adapter set in use, up to it) and with one context (its adapter set changes per expert).

Build llama-server from the llama.cpp tree vendored in the pinned llama-cpp-python sdist:
  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DLLAMA_CURL=OFF
  cmake --build /tmp/llama-build --target llama-server -j
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from hublabio.board import detect_board
from hublabio.paths import embedded_model_path

STREAM = True
SERVER_DEFAULTS = False  # --server-defaults: each server's own repeat penalty (hublabd 1.1)
REPEAT_PENALTY = 1.0  # --repeat-penalty: sent to both servers (unless --server-defaults)
NO_EOS: dict[str, float] = {}  # --no-eos: {end-of-generation token id: -100} for both servers
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
          "bottle. Describe the sea, the weather and every room of the lighthouse.\n\nStory:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


@contextmanager
def hublabd(model: Path, n: int, threads: int, tokens: int, extra: str = ""):
    """`extra`: more [inference] lines for the model's TOML."""
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "model-config.toml").write_text(
            f'[model]\nname = "bench"\npath = "{model}"\n[inference]\nmax_tokens = {tokens}\n'
            f"context_size = 512\nparallel = {n}\n{extra}")
        port = free_port()
        env = {**os.environ, "HUBLAB_STATE_DIR": str(Path(tmp) / "state")}
        with serving(port, [sys.executable, "-m", "hublabio.daemon.main", "--models-dir",
                            str(models), "--socket", str(Path(tmp) / "d.sock"), "--http",
                            f"127.0.0.1:{port}", "--threads", str(threads), "--threads-batch",
                            str(threads), "--queue-size", "16", "--log-level", "WARNING"],
                     env=env) as served:
            yield served


@contextmanager
def llama_server(binary: str, model: Path, n: int, threads: int):
    port = free_port()
    amx = "amx" in Path("/proc/cpuinfo").read_text()
    cmd = [binary, "-m", str(model), "-np", str(n), "-c", str(512 * n), "-t", str(threads),
           "-tb", str(threads), "--port", str(port), "--host", "127.0.0.1", "--log-disable"]
    if amx:
        cmd.append("--no-repack")
    with serving(port, cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as served:
        yield served


@contextmanager
def serving(port: int, cmd: list[str], **popen):
    """Run a server until the block ends; yields (base URL, model name) once it is healthy."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}", "bench"
    finally:
        proc.terminate()
        proc.wait(30)


def one_request(base: str, model: str, tokens: int, out: list, i: int) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": STREAM, "stream_options": {"include_usage": True}}
    if not SERVER_DEFAULTS:
        body["repeat_penalty"] = REPEAT_PENALTY  # the same sampling on both sides
    if NO_EOS:
        body["logit_bias"] = NO_EOS  # every answer runs to max_tokens on both servers
    t0 = time.perf_counter()
    ttft, n, first_at = None, 0, t0
    if not STREAM:
        body.pop("stream_options")
        r = httpx.post(base + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        out[i] = (time.perf_counter() - t0, r.json()["usage"]["completion_tokens"],
                  time.perf_counter(), time.perf_counter())
        return
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
                first_at = time.perf_counter()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    out[i] = (ttft, n, time.perf_counter(), first_at)


def clients(base: str, model: str, n: int, tokens: int
            ) -> tuple[float, list[float], int, float]:
    one_request(base, model, 4, [None], 0)  # warm-up: the model loaded, the threads started
    out: list = [None] * n
    threads = [threading.Thread(target=one_request, args=(base, model, tokens, out, i))
               for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o[2] for o in out) - t0
    # decode only: the tokens after each first one, from the first first token to the last end
    # (answers of different lengths, as at each server's own defaults, compare fairly here)
    decode = sum(o[1] - 1 for o in out) / max(max(o[2] for o in out) - min(o[3] for o in out),
                                              1e-9)
    return sum(o[1] for o in out) / wall, [o[0] for o in out], sum(o[1] for o in out), decode


ROUTINGS = (("single", 1), ("topk", 2), ("all", 5))


def bench_experts(tmp: Path, threads: int, tokens: int, adapters: bool) -> list:
    """The shipped expert TOMLs over the embedded SmolLM2, greedy, `tokens` each, in `tmp`;
    `adapters`: the four domain experts get a random LoRA adapter each (the test fixture's)."""
    import tomllib

    import tomli_w

    from hublabio.config import load_experts

    shipped = Path(__file__).resolve().parents[1] / "models" / "experts"
    folder = tmp / "experts"
    folder.mkdir()
    for i, f in enumerate(sorted(shipped.glob("*.toml"))):
        data = tomllib.loads(f.read_text())
        data["inference"].update(max_tokens=tokens, temperature=0.0, repeat_penalty=1.0,
                                 context_size=512, threads=threads, threads_batch=threads)
        if adapters and f.stem != "general":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" /
                                   "integration"))
            from lora_fixture import make_lora_adapter

            make_lora_adapter(embedded_model_path(), folder / f"{f.stem}.lora.gguf", seed=i)
            data["model"]["adapter"] = f"{f.stem}.lora.gguf"
        (folder / f.name).write_text(tomli_w.dumps(data))
    experts, errors = load_experts(tmp)
    assert not errors, errors
    return experts


def moe_answer(moe, question: str) -> dict:
    gen = moe.query(question)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def moe_child(mode: str, threads: int, tokens: int, round_no: int, adapters: bool) -> None:
    """One process, one batch mode: a warm-up query, then Single, TopK(2) and All once each
    on a question of this round's own (no prompt cache from another round); prints JSON."""
    from hublabio.moe import MoE, MoESettings
    from hublabio.pool import LoadSettings, ModelPool
    from hublabio.router import KeywordRouter

    question = (f"Question {round_no}: how do I read a CSV file with pandas in Python and plot "
                "it on Linux?")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        experts = bench_experts(Path(tmp), threads, tokens, adapters)
        # "continuous": the daemon's defaults here (adapter contexts: the board's);
        # "one-context": the same with one context, whose adapter set changes per expert
        contexts = 1 if mode == "one-context" else detect_board().adapter_contexts
        pool = ModelPool(4096, load=LoadSettings(
            threads=threads, parallel=5, batch_mode="off" if mode == "off" else "continuous",
            adapter_contexts=contexts))
        try:
            for label, (routing, k) in [("warm-up", ROUTINGS[2]), *((r, (r, k)) for r, k in ROUTINGS)]:
                moe = MoE(pool, experts, KeywordRouter(experts),
                          MoESettings(routing=routing, k=k, synthesis="best"))
                t0 = time.perf_counter()
                result = moe_answer(moe, question if label != "warm-up" else "Hello there.")
                out[label] = (time.perf_counter() - t0,
                              [st.completion_tokens for _, st in result["generations"]])
        finally:
            pool.close()
    print(json.dumps(out))


def contexts_part(threads: int, tokens: int, rounds: int) -> None:
    """TopK(2) over two experts with different adapters, adapter_contexts 1 against 2: two
    pools in one process (every decode on the one decoder thread), alternating query by
    query, a question of each round's own."""
    from hublabio.moe import MoE, MoESettings
    from hublabio.pool import LoadSettings, ModelPool
    from hublabio.router import KeywordRouter

    with tempfile.TemporaryDirectory() as tmp:
        experts = bench_experts(Path(tmp), threads, tokens, True)
        pools = {n: ModelPool(4096, load=LoadSettings(threads=threads, parallel=5,
                                                      adapter_contexts=n)) for n in (1, 2)}
        walls: dict[int, list[float]] = {1: [], 2: []}
        try:
            for n, pool in pools.items():  # every expert once: each keeps a slot's prefix
                moe_answer(MoE(pool, experts, KeywordRouter(experts),
                               MoESettings(routing="all")), "Hello there.")
            for r in range(rounds):
                for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                    moe = MoE(pools[n], experts, KeywordRouter(experts),
                              MoESettings(routing="topk", k=2, synthesis="best"))
                    t0 = time.perf_counter()
                    moe_answer(moe, f"Question {r}: how do I read a CSV file with pandas in "
                                    "Python and plot it on Linux?")
                    walls[n].append(time.perf_counter() - t0)
            got = {n: pools[n].resident()[0].contexts for n in pools}
        finally:
            for pool in pools.values():
                pool.close()
    print(f"TopK(2) over two adapter experts, {tokens} tokens each, threads {threads}, "
          f"median of {rounds}, interleaved")
    for n in (1, 2):
        print(f"adapter_contexts {n} ({got[n]} contexts): {statistics.median(walls[n]):.3f} s")


def moe_part(threads: int, tokens: int, rounds: int, adapters: bool) -> None:
    """Batching on and off, each in processes of its own (two engines of one model in one
    process would decode on two threads, and two OpenMP teams slow both), interleaved."""
    walls: dict[tuple[str, str], list[float]] = {}
    tokens_of: dict[str, list[int]] = {}
    modes = ("continuous", "one-context", "off") if adapters else ("continuous", "off")
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            run = subprocess.run([sys.executable, __file__, "--moe-child", mode, "--threads",
                                  str(threads), "--tokens", str(tokens), "--rounds", str(r)]
                                 + (["--adapters"] if adapters else []),
                                 capture_output=True, text=True, check=True)
            data = json.loads(run.stdout.strip().splitlines()[-1])
            for routing, _ in ROUTINGS:
                walls.setdefault((mode, routing), []).append(data[routing][0])
                tokens_of[routing] = data[routing][1]
    kind = "four with random LoRA adapters" if adapters else "prompt-only"
    print(f"MoE-R wall time, experts {kind}, {tokens} tokens per expert, threads {threads}, "
          f"median of {rounds}")
    print("| routing | experts | tokens per expert | batching on s | x Single | batching off s "
          "| x Single |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    med = {key: statistics.median(v) for key, v in walls.items()}
    for routing, k in ROUTINGS:
        on, off = med[("continuous", routing)], med[("off", routing)]
        print(f"| {routing} | {k} | {' '.join(map(str, tokens_of[routing]))} | {on:.2f} | "
              f"{on / med[('continuous', 'single')]:.2f} | {off:.2f} | "
              f"{off / med[('off', 'single')]:.2f} |")
    if adapters:
        print("one context (adapter_contexts 1), batching on: " + ", ".join(
            f"{routing} {med[('one-context', routing)]:.2f} s" for routing, _ in ROUTINGS)
              + f"; board's adapter_contexts here: {detect_board().adapter_contexts}")


def switch_part(model: Path, threads: int, rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from lora_fixture import make_lora_adapter

    from hublabio.batching import shared_decoder
    from hublabio.engine import Engine, SamplingOptions

    opts = SamplingOptions(temperature=0, max_tokens=1, repeat_penalty=1.0)
    prompt = [{"role": "system", "content": "You are a careful assistant. " * 20},
              {"role": "user", "content": "Explain what a context window is."}]
    tmp = tempfile.TemporaryDirectory()
    a = make_lora_adapter(model, Path(tmp.name) / "a.gguf", seed=1)
    b = make_lora_adapter(model, Path(tmp.name) / "b.gguf", seed=2)
    # 2 slots in one context (it changes its adapter set on every switch), and 2 contexts of
    # one slot each (Engine.add_context: each keeps its adapter set), both on the decoder
    slots = Engine(model, n_ctx=512, threads=threads, parallel=2)
    contexts = Engine(model, n_ctx=512, threads=threads, decoder=shared_decoder())
    contexts.add_context()
    hit: dict[str, list[float]] = {"slots": [], "contexts": []}
    back: dict[str, list[float]] = {"slots": [], "contexts": []}
    cold = []
    try:
        for e in (slots, contexts):
            for path in (a, b):
                e.complete(prompt, opts, adapter=path)  # each expert's prefix in its slot
        for r in range(rounds):
            for name in (("slots", "contexts") if r % 2 == 0 else ("contexts", "slots")):
                e = slots if name == "slots" else contexts
                st = e.complete(prompt, opts, adapter=a)[2]  # after itself: a cache hit
                hit[name].append(st.ttft_s)
                e.complete(prompt, opts, adapter=b)           # the other expert
                st = e.complete(prompt, opts, adapter=a)[2]  # switched back
                back[name].append(st.ttft_s)
                assert st.cached_tokens == st.prompt_tokens - 1, st
        n = st.prompt_tokens
    finally:
        slots.close()
        contexts.close()
    with Engine(model, n_ctx=512, threads=threads) as one:  # one slot: every switch recomputes
        one.load_adapter(a)
        one.load_adapter(b)
        for _ in range(rounds):
            one.complete(prompt, opts, adapter=b)
            cold.append(one.complete(prompt, opts, adapter=a)[2].ttft_s)
    tmp.cleanup()
    med = statistics.median
    print(f"first token of expert A, {n}-token prompt, threads {threads}, median of {rounds}")
    print("| case | TTFT ms |")
    print("| --- | ---: |")
    for name, label in (("slots", "2 slots in one context"), ("contexts", "2 contexts")):
        print(f"| A after A (cache hit), {label} | {med(hit[name]) * 1e3:.1f} |")
        print(f"| A after B, {label} (A's prefix kept) | {med(back[name]) * 1e3:.1f} |")
    print(f"| A after B, 1 slot (prompt evaluated again) | {med(cold) * 1e3:.1f} |")
    for name in ("slots", "contexts"):
        print(f"switch back / cache hit, {name}: {med(back[name]) / med(hit[name]):.2f}")


def raw_part(model: Path, threads: int) -> None:
    from hublabio.llama import Context, Model

    m = Model(model)
    ctx = Context(m, n_ctx=512 * 8, n_batch=512, n_seq_max=8, threads=threads)
    lens = [37, 41, 52, 60, 33, 45, 49, 56]
    for seq, n in enumerate(lens):
        ctx.decode(list(range(10, 10 + n)), 0, seq=seq)
    print(f"bare batched decode, threads {threads}, 30 steps each")
    print("| sequences | ms per decode | tok/s |")
    print("| ---: | ---: | ---: |")
    for n in (1, 2, 4, 8):
        t0 = time.perf_counter()
        for k in range(30):
            ctx.decode_many([([100 + k], lens[s] + k, s, None) for s in range(n)])
            ctx.settle_outputs()
        dt = (time.perf_counter() - t0) / 30
        print(f"| {n} | {dt * 1e3:.1f} | {n / dt:.0f} |")
        for seq in range(8):
            ctx.keep_prefix(lens[seq], seq=seq)
    ctx.close()
    m.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER",
                                                             "/tmp/llama-build/bin/llama-server"))
    ap.add_argument("--model", type=Path, default=embedded_model_path())
    ap.add_argument("--threads", type=int, default=0, help="0 = the board's default")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--moe", action="store_true", help="MoE-R Single / TopK(2) / All instead")
    ap.add_argument("--raw", action="store_true", help="bare batched decodes instead")
    ap.add_argument("--switch", action="store_true", help="switch-back TTFT instead")
    ap.add_argument("--contexts", action="store_true",
                    help="MoE-R TopK(2) over adapters, adapter_contexts 1 vs 2, in one process")
    ap.add_argument("--server-defaults", action="store_true",
                    help="send no repeat_penalty: each server samples at its own default")
    ap.add_argument("--no-eos", action="store_true",
                    help="bias the end-of-generation token away on both servers, so answers of "
                         "different text still have the same length")
    ap.add_argument("--repeat-penalty", type=float, default=1.0,
                    help="the repeat_penalty both servers get (default 1.0, no penalty)")
    ap.add_argument("--adapters", action="store_true",
                    help="--moe: the domain experts get LoRA adapters")
    ap.add_argument("--moe-child", choices=("continuous", "one-context", "off"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = args.threads or detect_board().threads
    global SERVER_DEFAULTS, REPEAT_PENALTY
    SERVER_DEFAULTS = args.server_defaults
    REPEAT_PENALTY = args.repeat_penalty
    if args.no_eos:
        from hublabio.gguf_info import read_gguf_info

        meta = read_gguf_info(args.model).metadata
        eog = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
        NO_EOS.update({str(t): -100.0 for t in eog if isinstance(t, int)})
    if args.moe_child:
        moe_child(args.moe_child, threads, args.tokens, args.rounds, args.adapters)
        return 0
    if args.moe:
        moe_part(threads, args.tokens, args.rounds, args.adapters)
        return 0
    if args.contexts:
        contexts_part(threads, args.tokens, max(args.rounds, 10))
        return 0
    if args.raw:
        raw_part(args.model, threads)
        return 0
    if args.switch:
        switch_part(args.model, threads, max(args.rounds, 10))
        return 0
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads "
          f"{threads}, {args.model.name}, {args.tokens} tokens per client")
    servers = {"hublabd": lambda n: hublabd(args.model, n, threads, args.tokens),
               "llama-server": lambda n: llama_server(args.llama_server, args.model, n, threads)}
    print("| clients | server | total tok/s (per round) | decode tok/s | TTFT p50 ms | TTFT p90 ms |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for n in [int(x) for x in args.clients.split(",")]:
        tps: dict[str, list[float]] = {k: [] for k in servers}
        ttft: dict[str, list[float]] = {k: [] for k in servers}
        dec: dict[str, list[float]] = {k: [] for k in servers}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                with servers[name](n) as (base, model):
                    rate, firsts, total, decode = clients(base, model, n, args.tokens)
                    if total != n * args.tokens:
                        print(f"  ({name}: {total} tokens, not {n * args.tokens}: an answer "
                              "ended early)", flush=True)
                tps[name].append(rate)
                dec[name].append(decode)
                ttft[name].extend(firsts)
        for name in servers:
            rates = " / ".join(f"{x:.1f}" for x in tps[name])
            print(f"| {n} | {name} | **{statistics.median(tps[name]):.1f}** ({rates}) | "
                  f"{statistics.median(dec[name]):.1f} | "
                  f"{pct(ttft[name], 0.5) * 1e3:.0f} | {pct(ttft[name], 0.9) * 1e3:.0f} |",
                  flush=True)
        ratio = statistics.median(tps["hublabd"]) / statistics.median(tps["llama-server"])
        dratio = statistics.median(dec["hublabd"]) / statistics.median(dec["llama-server"])
        print(f"|  | hublabd / llama-server | {ratio:.2f} | {dratio:.2f} |  |  |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
