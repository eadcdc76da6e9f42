"""MoE-R end to end on real models: the shipped expert configs over the real SmolLM2 GGUF, real
LoRA adapter GGUFs (written by lora_fixture), Gemma 3 as a second base, the real pool, daemon,
HTTP endpoint (as a remote expert) and shell."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import tomli_w

from hublabio import paths, synth
from hublabio.budget import estimate_memory
from hublabio.client import Client
from hublabio.config import load_experts
from hublabio.engine import SamplingOptions
from hublabio.errors import Cancelled, ConfigError
from hublabio.gguf_info import read_gguf_info
from hublabio.moe import MoE, MoESettings, set_moe_setting
from hublabio.pool import ModelPool
from hublabio.router import KeywordRouter

from .lora_fixture import make_lora_adapter
from .test_daemon import make_daemon, write_model_config

THREADS = int(os.environ.get("HUBLAB_TEST_THREADS", "1"))
SHIPPED = paths.REPO_ROOT / "models" / "experts"
DOMAINS = ("python", "rust", "system", "ai", "general")
GREEDY = {"temperature": 0.0, "max_tokens": 8}
# keywords of python (pandas, python), ai (pytorch, neural network) and rust (cargo)
MIXED = "How do I load a pandas DataFrame into a pytorch neural network in python?"


def write_experts(models: Path, base: Path | None, *, adapters: dict[str, int] | None = None,
                  domains=DOMAINS, max_tokens: int = 8, paths_by_domain=None,
                  remote: dict[str, tuple[str, str]] | None = None) -> Path:
    """Copy the shipped experts/<domain>.toml into `models`, pointing at `base` (or a per-domain
    GGUF), short answers, one thread, greedy; `adapters` {domain: seed} adds a real LoRA GGUF."""
    folder = models / "experts"
    folder.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        data = tomllib.loads((SHIPPED / f"{domain}.toml").read_text())
        model, inf = data["model"], data["inference"]
        if remote and domain in remote:
            url, name = remote[domain]
            model.update(type="remote", url=url, remote_model=name)
            model.pop("path", None)
        else:
            model["path"] = str((paths_by_domain or {}).get(domain, base))
        model.pop("adapter", None)  # a shipped adapter fits the shipped base only
        if adapters and domain in adapters:
            gguf = (paths_by_domain or {}).get(domain, base)
            make_lora_adapter(gguf, folder / f"{domain}.lora.gguf", seed=adapters[domain])
            model["adapter"] = f"{domain}.lora.gguf"
        inf.update(max_tokens=max_tokens, context_size=512, threads=THREADS, temperature=0.0)
        (folder / f"{domain}.toml").write_text(tomli_w.dumps(data))
    return models


def load(models: Path):
    experts, errors = load_experts(models)
    assert not errors, errors
    return experts


def drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def infos(events) -> list[str]:
    return [e["text"] for e in events if e["type"] == "info"]


def answers_of(result) -> list[synth.ExpertAnswer]:
    return [synth.ExpertAnswer(**a) for a in result["experts"]]


# ------------------------------------------------------------------ shared base, five experts

@pytest.fixture(scope="module")
def shared(tmp_path_factory, smollm2_path):
    models = write_experts(tmp_path_factory.mktemp("models"), smollm2_path,
                           adapters={"python": 1, "rust": 2, "system": 3, "ai": 4})
    experts = load(models)
    pool = ModelPool(2048, n_threads=THREADS)
    yield models, experts, pool
    pool.close()


@pytest.fixture(scope="module")
def all_answers(shared):
    """Every expert answers MIXED once (routing all, concatenate): real answers for the
    synthesis tests."""
    models, experts, pool = shared
    moe = MoE(pool, experts, KeywordRouter(experts),
              MoESettings(routing="all", synthesis="concatenate"))
    events, result = drain(moe.query(MIXED, options=GREEDY))
    return events, result


def test_all_five_experts_answer_over_one_resident_base(shared, all_answers, smollm2_path):
    models, experts, pool = shared
    events, result = all_answers
    resident = pool.resident()
    assert len(resident) == 1, [r.path for r in resident]
    assert resident[0].path.resolve() == smollm2_path.resolve()
    assert resident[0].names == {e.name for e in experts}
    assert sorted(p.name for p in resident[0].engine.adapters) == sorted(
        f"{d}.lora.gguf" for d in ("python", "rust", "system", "ai"))
    answers = answers_of(result)
    assert sorted(a.domain for a in answers) == sorted(DOMAINS)
    for a in answers:
        assert 1 <= a.tokens <= 8 and a.text
        assert a.mean_logprob < 0 and 0 < a.confidence < 1
        assert a.confidence == pytest.approx(math.exp(a.mean_logprob))
    assert len({a.tokenizer_key for a in answers}) == 1
    lines = infos(events)
    assert lines[0].startswith("[Router] Selected expert: ")
    assert sum(line.startswith("[Expert] ") for line in lines) == 5
    assert any(line.startswith("[Synthesizer] concatenate") for line in lines)
    for a in answers:
        assert f"### {a.domain} (confidence {a.confidence:.2f})\n{a.text}" in result["text"]


def test_experts_over_one_batching_base_answer_at_once_with_the_same_text(tmp_path,
                                                                         smollm2_path):
    """With continuous batching (5 slots) the five prompt-only experts (one base, no adapter)
    generate in threads of their own and share decode steps; each answer is the one it gives
    when the experts run one after another (one slot)."""
    from hublabio.batching import shared_decoder
    from hublabio.pool import LoadSettings

    experts = load(write_experts(tmp_path / "models", smollm2_path))
    answers = {}
    for parallel in (1, 5):
        pool = ModelPool(2048, load=LoadSettings(threads=THREADS, parallel=parallel))
        try:
            moe = MoE(pool, experts, KeywordRouter(experts),
                      MoESettings(routing="all", synthesis="concatenate"))
            decoder = shared_decoder()
            before = decoder.batched, decoder.batches
            events, result = drain(moe.query(MIXED, options=GREEDY))
            answers[parallel] = {a.domain: a.text for a in answers_of(result)}
            together = "[Experts] 5 answer at once (one batched base model)" in infos(events)
            assert together == (parallel == 5)
            if parallel == 5:
                assert decoder.batched - before[0] > 1.3 * (decoder.batches - before[1]), \
                    "the experts' steps were not batched"
        finally:
            pool.close()
    assert answers[5] == answers[1] and len(answers[1]) == 5


def test_experts_with_different_adapters_run_one_after_another(tmp_path, smollm2_path):
    """They cannot share a decode (adapters apply per context) and alternating them cost more
    than running them in turn (docs/BENCHMARKS.md): only one adapter set batches together."""
    from hublabio.pool import LoadSettings

    experts = {c.expert.domain: c for c in load(write_experts(
        tmp_path / "models", smollm2_path, adapters={"python": 1, "rust": 2}))}
    moe = MoE(ModelPool(2048, load=LoadSettings(parallel=5)), list(experts.values()),
              KeywordRouter(list(experts.values())), MoESettings())
    assert not moe.batches_together([experts["python"], experts["rust"]])
    assert not moe.batches_together([experts["python"], experts["general"]])
    assert moe.batches_together([experts["system"], experts["general"]])  # no adapter: one set
    off = MoE(ModelPool(2048, load=LoadSettings(parallel=5, batch_mode="off")),
              list(experts.values()), KeywordRouter(list(experts.values())), MoESettings())
    assert not off.batches_together([experts["system"], experts["general"]])


def test_topk2_over_two_adapters_gives_each_its_own_context_and_the_same_answers(
        tmp_path, smollm2_path):
    """adapter_contexts 2: the engine gets a second context once the experts use a second
    adapter set, each set stays applied in its own, and the answers are those of one context."""
    from hublabio.pool import LoadSettings

    experts = load(write_experts(tmp_path / "models", smollm2_path,
                                 adapters={"python": 1, "rust": 2}))
    by = {c.expert.domain: c for c in experts}
    out = {}
    for n in (1, 2):
        pool = ModelPool(2048, load=LoadSettings(threads=THREADS, parallel=2,
                                                 adapter_contexts=n))
        try:
            moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="topk", k=2))
            results = [drain(moe.query("How do I run a python script from a cargo build?",
                                       options=GREEDY))[1] for _ in range(2)]
            (res,) = pool.resident()
            out[n] = [[(a["domain"], a["text"]) for a in r["experts"]] for r in results]
            assert (res.contexts, res.engine.contexts, res.leases) == (n, n, 1 + n)
            if n == 2:
                applied = {lane.ctx.adapter_set for lane in res.engine._lanes}
                assert applied == {((by["python"].adapter.resolve(), 1.0),),
                                   ((by["rust"].adapter.resolve(), 1.0),)}
        finally:
            pool.close()
    assert out[2] == out[1] and out[1][0] == out[1][1]
    assert sorted(d for d, _ in out[2][0]) == ["python", "rust"]


def test_best_weighted_and_voting_on_real_answers(all_answers):
    answers = answers_of(all_answers[1])
    post, basis = synth.posterior(answers)
    assert basis == "confidence"  # one base model: comparable log-probabilities
    beta = synth.DEFAULT_CONFIDENCE_WEIGHT
    logits = [math.log(max(a.router_probability, synth.ROUTER_FLOOR)) + beta * a.mean_logprob
              for a in answers]
    assert post == pytest.approx([math.exp(v) / sum(math.exp(x) for x in logits)
                                  for v in logits])
    top = max(range(len(answers)), key=lambda i: post[i])
    best = synth.collect(synth.best(MIXED, answers))
    assert best.chosen == [answers[top].domain]

    votes = synth.support(answers, post)
    vote = synth.collect(synth.voting(MIXED, answers))
    assert vote.chosen[0] == answers[max(range(len(answers)), key=lambda i: votes[i])].domain

    weights, basis, plan = synth.weighted_plan(answers)
    assert weights == pytest.approx(post)
    assert plan[0].domain == answers[top].domain
    result = synth.collect(synth.weighted(MIXED, answers))
    assert result.text.startswith(answers[top].text)
    for seg in plan[1:]:
        assert seg.included == (seg.reason == "supported")
        if seg.included:
            assert seg.support >= 0.5 and seg.text in result.text


def test_switching_adapters_changes_the_answer_without_reloading(shared):
    models, experts, pool = shared
    python = next(e for e in experts if e.expert.domain == "python")
    rust = next(e for e in experts if e.expert.domain == "rust")
    msgs = [{"role": "user", "content": "What is a Python list?"}]
    opts = SamplingOptions(max_tokens=8, temperature=0)
    texts = {}
    with pool.acquire(python) as engine:
        loaded_at = pool.resident()[0].load_s, id(engine)
        for name, adapter in (("python", python.adapter), ("rust", rust.adapter), ("base", None),
                              ("python again", python.adapter)):
            texts[name] = engine.complete(msgs, opts, adapter=adapter)[0]
        texts["scale 0"] = engine.complete(msgs, opts, adapter=python.adapter,
                                           adapter_scale=0.0)[0]
    with pool.acquire(rust) as engine:
        assert (pool.resident()[0].load_s, id(engine)) == loaded_at  # same engine, no reload
    assert len({texts["python"], texts["rust"], texts["base"]}) == 3, texts
    assert texts["python again"] == texts["python"]
    assert texts["scale 0"] == texts["base"]


def test_summarize_has_the_general_expert_write_the_answer(shared):
    models, experts, pool = shared
    moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="topk", k=2,
                                                                 synthesis="summarize"))
    events, result = drain(moe.query(MIXED, options=GREEDY))
    assert result["synthesis"] == "summarize"
    assert len(result["experts"]) == 2 and "general" not in result["chosen"]
    assert [name for name, _ in result["generations"]][-1] == "general-expert"
    streamed = "".join(e["text"] for e in events if e["type"] == "token").strip()
    assert streamed == result["text"] and result["text"]
    assert result["text"] not in [a["text"] for a in result["experts"]]
    assert "[Synthesizer] summarize: general fuses 2 answers" in infos(events)


def test_routing_strategies_with_the_keyword_router(shared):
    models, experts, pool = shared
    router = KeywordRouter(experts)
    scores = router.score(MIXED)

    def route(**s):
        return MoE(pool, experts, router, MoESettings(**s)).route(MIXED)

    ranked = sorted((d for d in scores if scores[d] > 0), key=lambda d: -scores[d])
    assert [r.domain for r in route(routing="topk", k=2).selected] == ranked[:2]
    assert [r.domain for r in route(routing="single").selected] == ranked[:1]
    assert len(route(routing="all").selected) == 5
    t = sorted(scores.values())[-2]  # the second-best score passes, lower ones do not
    assert [r.domain for r in route(routing="threshold", threshold=t).selected] == ranked[:2]
    # topk skips domains the router all but rules out
    fake = type("R", (), {"score": lambda self, q: {"rust": 0.97, "python": 0.03}})()
    r = MoE(pool, experts, fake, MoESettings(routing="topk", k=2)).route("E0382")
    assert [x.domain for x in r.selected] == ["rust"]
    off_topic = MoE(pool, experts, router, MoESettings(routing="topk")).route("Good morning!")
    assert off_topic.fallback and [r.domain for r in off_topic.selected] == ["general"]


def test_shipped_router_routes_real_questions(shared):
    """The router the install ships (ONNX from train-router, or the keyword fallback)."""
    models, experts, pool = shared
    moe, warnings = MoE.from_models_dir(pool, paths.REPO_ROOT / "models", MoESettings())
    r = moe.route("My cargo build fails with error E0382: borrow of moved value")
    assert r.selected[0].domain == "rust", r
    r = moe.route("pip install fails inside my virtualenv with ModuleNotFoundError")
    assert r.selected[0].domain == "python", r


def test_shipped_python_expert_answers_with_its_trained_adapter(shared):
    """models/experts/python.toml ships a real adapter: it loads over the shared base and
    changes what the model believes (the mean log-prob of the same greedy answer differs)."""
    models, experts, pool = shared
    moe, warnings = MoE.from_models_dir(pool, paths.REPO_ROOT / "models",
                                        MoESettings(routing="single"))
    cfg = moe.experts["python"]
    assert cfg.adapter is not None and cfg.adapter.name == "python.lora.gguf"
    assert cfg.adapter.stat().st_size < 2 * 2**20  # r 8 on q,k,v,o in F16: device-sized
    question = "How do I read a CSV file with the csv module?"
    events, result = drain(moe.query(question, options=GREEDY))
    assert any("python-expert + python.lora.gguf" in e.get("text", "") for e in events
               if e["type"] == "info")
    with_adapter = result["experts"][0]
    plain = replace(cfg, adapter=None)
    bare = MoE(pool, [plain], KeywordRouter([plain]), MoESettings(routing="single"))
    _, base_result = drain(bare.query(question, options=GREEDY))
    assert with_adapter["text"].strip()
    assert with_adapter["mean_logprob"] != pytest.approx(base_result["experts"][0]["mean_logprob"],
                                                         abs=1e-4)


def test_threshold_per_expert_override(shared):
    models, experts, pool = shared

    strict = [replace(e, expert=replace(e.expert, threshold=0.99))
              if e.expert.domain == "python" else e for e in experts]
    s = MoESettings(routing="threshold", threshold=0.1).strategy(strict)
    assert s.per_domain == {"python": 0.99}
    assert "python" not in [r.domain for r in s.select({"python": 0.6, "ai": 0.4})]


def test_cancel_stops_between_experts(shared):
    models, experts, pool = shared
    moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="all"))
    cancel = threading.Event()
    gen = moe.query(MIXED, cancel=cancel, options=GREEDY)
    with pytest.raises(Cancelled):
        for ev in gen:
            if ev["type"] == "info" and ev["text"].startswith("[Expert] "):
                cancel.set()


def test_idle_ttl_unloads_experts_through_the_pool(tmp_path, smollm2_path):
    models = write_experts(tmp_path, smollm2_path, domains=("python", "general"))
    experts = load(models)
    pool = ModelPool(2048, idle_ttl_s=30, n_threads=THREADS)
    try:
        moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="single"))
        drain(moe.query("python dict", options={"max_tokens": 2}))
        assert pool.reap_idle() == []  # just used
        assert sorted(pool.reap_idle(now=time.monotonic() + 31)) == ["python-expert"]
        assert pool.resident() == []
    finally:
        pool.close()


# ------------------------------------------------------------------ two bases, room for one

def test_topk2_with_room_for_one_model_runs_experts_one_after_the_other(
        tmp_path, smollm2_path, gemma_path):
    models = write_experts(tmp_path, None, domains=("python", "ai", "general"),
                           paths_by_domain={"python": smollm2_path, "ai": gemma_path,
                                            "general": smollm2_path})
    experts = load(models)
    smol = estimate_memory(read_gguf_info(smollm2_path), 512).total_mb
    gemma = estimate_memory(read_gguf_info(gemma_path), 512).total_mb
    budget = max(smol, gemma) + 5
    assert budget < smol + gemma
    pool = ModelPool(budget, n_threads=THREADS)
    try:
        moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="topk", k=2))
        events, result = drain(moe.query(MIXED, options=GREEDY))
        assert result["errors"] == []
        assert sorted(a["domain"] for a in result["experts"]) == ["ai", "python"]
        assert all(a["text"] for a in result["experts"])
        # different vocabularies: log-probs are not comparable, the router probability decides
        assert len({a["tokenizer_key"] for a in result["experts"]}) == 2
        assert result["basis"] == "router"
        assert result["chosen"] == [result["route"]["selected"][0]["domain"]]
        assert len(pool.resident()) == 1 and pool.used_mb() <= budget
    finally:
        pool.close()


# ------------------------------------------------------------------ settings

def test_settings_are_validated_and_persisted(isolated_state):
    assert MoESettings.load() == MoESettings()
    s = set_moe_setting("routing", "threshold 0.4")
    assert (s.routing, s.threshold) == ("threshold", 0.4)
    s = set_moe_setting("synthesis", "voting")
    s = set_moe_setting("enabled", "off")
    assert MoESettings.load() == MoESettings(enabled=False, routing="threshold", threshold=0.4,
                                             synthesis="voting")
    before = paths.settings_file().read_bytes()
    for key, value, words in (("routing", "fastest", "must be one of 'topk', 'threshold'"),
                              ("routing", "topk 0", r"must be >= 1, got 0"),
                              ("routing", "single 3", "no parameter"),
                              ("threshold", "2", r"must be in \[0.0, 1.0\], got 2"),
                              ("synthesis", "mean", "must be one of 'best', 'weighted'"),
                              ("enabled", "maybe", "on or off"),
                              ("colour", "red", "unknown MoE setting")):
        with pytest.raises(ConfigError, match=words) as err:
            set_moe_setting(key, value)
        assert str(paths.settings_file()) in str(err.value) and "[moe]" in str(err.value)
    assert paths.settings_file().read_bytes() == before  # nothing half-written
    paths.settings_file().write_text('[moe]\nrouting = "fastest"\n')
    with pytest.raises(ConfigError, match=r"\[moe\] routing: must be one of"):
        MoESettings.load()


# ------------------------------------------------------------------ daemon, HTTP, shell

@pytest.fixture(scope="module")
def daemon_models(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("dmodels")
    write_model_config(models, smollm2_path)
    write_experts(models, smollm2_path, adapters={"python": 1})
    return models


@pytest.fixture(scope="module")
def daemon(daemon_models):
    handle = make_daemon(daemon_models, http="127.0.0.1:0")
    yield handle
    handle.stop()


def test_daemon_ops_route_experts_and_ask_through_moe(daemon):
    with Client(daemon.socket_path, timeout=300) as c:
        routed = c.call("moe.route", query="pandas DataFrame groupby in python")
        assert routed["selected"][0]["domain"] == "python"
        assert set(routed["scores"]) == set(DOMAINS)
        events = list(c.stream("ask", question="pandas DataFrame groupby in python",
                               options={"max_tokens": 4}))
        lines = infos(events)
        assert lines[0].startswith("[Router] Selected expert: python")
        assert any(line.startswith("[Expert] python") for line in lines)
        assert events[-1]["type"] == "result" and events[-1]["data"]["text"]
        rows = {r["domain"]: r for r in c.call("moe.experts")["experts"]}
        assert rows["python"]["loaded"] and rows["python"]["memory_mb"] > 50
        assert rows["python"]["adapter"].endswith("python.lora.gguf")
        assert rows["python"]["adapter_loaded"]
        assert rows["rust"]["adapter"] is None and rows["rust"]["loaded"]  # same base
        c.call("settings.moe.set", key="enabled", value="off")
        events = list(c.stream("ask", question="pandas DataFrame groupby in python",
                               options={"max_tokens": 4}))
        assert not any(line.startswith("[Router]") for line in infos(events))
        assert events[-1]["data"]["model"] == "smol"
        # a hand-broken [moe] section: moe ops name the key, `?question` still answers
        paths.settings_file().write_text('[moe]\nrouting = "fastest"\n')
        with pytest.raises(ConfigError, match=r"\[moe\] routing: must be one of .*got 'fastest'"):
            c.call("settings.moe.get")
        events = list(c.stream("ask", question="Say hi.", options={"max_tokens": 2}))
        assert infos(events)[0].startswith("[MoE] not used: ")
        assert events[-1]["type"] == "result" and events[-1]["data"]["model"] == "smol"


def test_remote_expert_over_hublabd_http(daemon, tmp_path, smollm2_path):
    host, port = daemon.http_address
    models = write_experts(tmp_path, smollm2_path, domains=("python", "general"),
                           remote={"python": (f"http://{host}:{port}/v1", "smol")})
    experts = load(models)
    pool = ModelPool(2048, n_threads=THREADS)
    try:
        moe = MoE(pool, experts, KeywordRouter(experts), MoESettings(routing="all"))
        events, result = drain(moe.query("python pandas", options={"max_tokens": 6,
                                                                   "temperature": 0.0}))
        remote = next(a for a in result["experts"] if a["domain"] == "python")
        assert remote["text"] and remote["tokenizer_key"].startswith("remote:http://")
        assert remote["confidence"] is not None and 0 < remote["confidence"] <= 1
        assert remote["confidence"] == pytest.approx(math.exp(remote["mean_logprob"]))
        assert result["basis"] == "router"  # a remote tokenizer is not comparable
        assert [r.names for r in pool.resident()] == [{"general-expert"}]
    finally:
        pool.close()


def hublab(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hublabio.shell.main", *args],
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture
def shell_models(tmp_path, smollm2_path, monkeypatch):
    models = tmp_path / "models"
    write_model_config(models, smollm2_path, max_tokens=4)
    write_experts(models, smollm2_path, domains=("python", "rust", "general"), max_tokens=4)
    monkeypatch.setenv("HUBLAB_MODELS_DIR", str(models))
    return models


def test_shell_moe_commands_and_settings_survive_a_restart(shell_models):
    run = hublab("-c", 'moe route "How do I fix cargo borrow errors in rust?"')
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == 'Query: "How do I fix cargo borrow errors in rust?"'
    assert lines[1] == "  → Expert: rust (confidence: 1.00)"
    assert all(line.startswith("  → Expert: ") for line in lines[1:4])
    assert lines[4] == "  Selected: rust"

    run = hublab("-c", 'moe query "How do I fix cargo borrow errors in rust?"')
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert out[0].startswith("[Router] Selected expert: rust")
    assert out[1].startswith("[Expert] rust")
    assert out[2].startswith("[Synthesizer] ")
    assert out[3] == "" and out[4].startswith("AI: ") and len(out[4]) > 4

    assert hublab("-c", "settings moe routing threshold 0.4").stdout.strip() == \
        "MoE routing: threshold 0.4 (saved)"
    assert hublab("-c", "settings moe synthesis voting").returncode == 0
    run = hublab("-c", "settings moe")  # a new process: a fresh daemon reads the saved file
    assert run.returncode == 0, run.stderr
    assert "Routing Strategy: Threshold (0.4)" in run.stdout
    assert "Synthesis Strategy: Voting" in run.stdout
    active = run.stdout.split("Active Experts:\n", 1)[1].splitlines()
    assert [ln.split()[1] for ln in active if ln.startswith("  - ")] == ["general", "python",
                                                                         "rust"]
    assert "(python-expert, " in run.stdout and " MiB model)" in run.stdout
    run = hublab("-c", "settings moe routing fastest")
    assert run.returncode != 0 and "routing: must be one of 'topk'" in (run.stderr + run.stdout)
    run = hublab("-c", "moe experts")
    assert run.returncode == 0 and "DOMAIN" in run.stdout and "rust-expert" in run.stdout


class _NoLogprobsServer:
    """A minimal OpenAI-style server (real socket) that refuses `logprobs`, like servers that do
    not implement them: the remote expert must retry without and report confidence n/a."""

    def __init__(self, words: list[str]):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append(body)
                if "logprobs" in body:
                    data = json.dumps({"error": {"message": "logprobs is not supported"}}).encode()
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for w in words:
                    chunk = {"choices": [{"index": 0, "delta": {"content": w}}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_without_logprobs_and_unreachable_remote(tmp_path):
    server = _NoLogprobsServer(["Use ", "pandas.read_csv", "."])
    try:
        models = write_experts(tmp_path, None, domains=("python", "rust", "general"),
                               remote={"python": (server.url, "m1"), "rust": (server.url, "m2"),
                                       "general": ("http://127.0.0.1:9/v1", "gone")})
        experts = load(models)
        moe = MoE(ModelPool(64), experts, KeywordRouter(experts),
                  MoESettings(routing="all", synthesis="concatenate"))
        events, result = drain(moe.query("python pandas cargo"))
        by = {a["domain"]: a for a in result["experts"]}
        assert by["python"]["text"] == "Use pandas.read_csv." and by["python"]["confidence"] is None
        assert "### python (confidence n/a)\nUse pandas.read_csv." in result["text"]
        assert result["basis"] == "router"
        assert "general" not in by and len(result["errors"]) == 1
        assert any(line.startswith("[Expert] general failed: remote expert http://127.0.0.1:9/v1 "
                                   "is unreachable") for line in infos(events))
        # each expert asked once with logprobs (refused), then once without
        assert ["logprobs" in b for b in server.bodies] == [True, False, True, False]
        assert server.bodies[1]["model"] == "m1" and server.bodies[1]["stream"] is True
    finally:
        server.close()


def test_fresh_install_shipped_router_and_experts(monkeypatch, isolated_state):
    """`moe route` / `moe query` on the repo's own models dir: the shipped ONNX router and the
    five shipped experts (answers kept short through the user's `ai config` overrides)."""
    monkeypatch.setenv("HUBLAB_MODELS_DIR", str(paths.REPO_ROOT / "models"))
    (isolated_state / "settings.toml").write_text(
        f"[inference]\nmax_tokens = 4\ncontext_size = 512\nthreads = {THREADS}\n")
    question = "My cargo build fails with E0382: borrow of moved value"
    run = subprocess.run([sys.executable, "-m", "hublabio.shell.main"], capture_output=True,
                         text=True, timeout=300, env=os.environ.copy(),
                         input=f'moe route "{question}"\nmoe query "{question}"\n')
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert out[0] == f'Query: "{question}"'
    assert out[1].startswith("  → Expert: rust (confidence: ")
    assert len([line for line in out if line.startswith("  → Expert: ")]) == 5
    selected = next(line for line in out if line.startswith("  Selected: "))
    assert selected.startswith("  Selected: rust")
    q = out.index(next(line for line in out if line.startswith("[Router] ")))
    assert out[q].startswith("[Router] Selected expert: rust")
    assert out[q + 1].startswith("[Expert] rust")
    synth_line = next(i for i in range(q, len(out)) if out[i].startswith("[Synthesizer] "))
    assert out[synth_line + 1] == "" and out[synth_line + 2].startswith("AI: ")
