"""ModelPool and the daemon's Service through the engine factory seam, with a fake engine: the
load settings each engine gets, eviction, and the token/result events of a generation. (The
real-model versions of these paths are in tests/integration.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from hublabio.budget import estimate_memory, extra_context_mb
from hublabio.config import DaemonSettings, load_model_config
from hublabio.daemon.service import Service
from hublabio.engine import GenerationStats
from hublabio.errors import BudgetError
from hublabio.gguf_info import read_gguf_info
from hublabio.pool import LoadSettings, ModelPool
from hublabio.textstream import Piece, TokenInfo


class FakeEngine:
    """What the pool and the service need of an engine, with a scripted answer."""
    made: list["FakeEngine"] = []
    words = ("Hello", ",", " world")

    def __init__(self, path, **kwargs):
        self.path, self.kwargs = Path(path), kwargs
        self.closed = False
        self.adapters: list[Path] = []
        self.calls: list[dict] = []
        FakeEngine.made.append(self)

    def load_adapter(self, path) -> None:
        self.adapters.append(Path(path).resolve())

    def generate(self, prompt, opts, *, adapter=None, adapter_scale=1.0, cancel=None):
        self.calls.append({"prompt": prompt, "opts": opts, "adapter": adapter})
        stats = GenerationStats(prompt_tokens=7)
        for i, word in enumerate(self.words[:opts.max_tokens]):
            stats.completion_tokens += 1
            stats.logprobs.append(-0.5 * (i + 1))
            yield Piece(word, [TokenInfo(i, word.encode(), -0.5 * (i + 1),
                                         ((i, word, -0.5 * (i + 1)),), word)])
        stats.finish_reason = "length" if opts.max_tokens < len(self.words) else "stop"
        return stats

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _fresh():
    FakeEngine.made.clear()


def _cfg(folder: Path, name: str, gguf: Path, inference: str = "") -> object:
    f = folder / f"{name}.toml"
    f.write_text(f'[model]\nname = "{name}"\npath = "{gguf}"\n\n[inference]\n'
                 f"context_size = 256\n{inference}\n")
    return load_model_config(f)


def test_a_model_toml_overrides_the_daemon_load_settings(tmp_path, smollm2_path):
    defaults = LoadSettings(threads=4, threads_batch=4, mmap=True, mlock=False, repack="auto")
    pool = ModelPool(4096, load=defaults, engine_factory=FakeEngine)
    pool.ensure_loaded(_cfg(tmp_path, "a", smollm2_path,
                            "threads = 2\nmmap = false\nrepack = false"))
    [made] = FakeEngine.made
    assert made.kwargs == {"n_ctx": 256, "threads": 2, "threads_batch": 4, "mmap": False,
                           "mlock": False, "repack": False}


def test_fit_says_whether_the_budget_holds_the_model_at_its_context(tmp_path, smollm2_path):
    info = read_gguf_info(smollm2_path)
    f = tmp_path / "a.toml"
    f.write_text(f'[model]\nname = "a"\npath = "{smollm2_path}"\n\n[inference]\n'
                 "context_size = 8192\n")
    cfg = load_model_config(f)
    at = lambda n: estimate_memory(info, n).total_mb  # noqa: E731 - the pool's own count
    assert ModelPool(at(8192) + 1, engine_factory=FakeEngine).fit(cfg, info)["fits"] == "yes"
    fit = ModelPool(at(2048) + 1, engine_factory=FakeEngine).fit(cfg, info)
    assert fit["fits"] == "ctx" and fit["max_ctx"] == 2048
    assert fit["needs_mb"] == round(at(8192), 1)
    assert ModelPool(at(256) - 1, engine_factory=FakeEngine).fit(cfg, info) == {
        "needs_mb": round(at(8192), 1), "fits": "no", "max_ctx": None}
    assert FakeEngine.made == []  # nothing was loaded to answer


def test_eviction_closes_the_least_recently_used_engine(tmp_path, smollm2_path, gemma_path):
    need = lambda p: estimate_memory(read_gguf_info(p), 256).total_mb  # noqa: E731
    pool = ModelPool(max(need(smollm2_path), need(gemma_path)) + 1, engine_factory=FakeEngine)
    pool.ensure_loaded(_cfg(tmp_path, "smol", smollm2_path))
    pool.ensure_loaded(_cfg(tmp_path, "gemma", gemma_path))
    first, second = FakeEngine.made
    assert first.closed and not second.closed
    assert [r.names for r in pool.resident()] == [{"gemma"}]


def test_a_refused_load_makes_no_engine(tmp_path, smollm2_path):
    pool = ModelPool(10, engine_factory=FakeEngine)
    with pytest.raises(BudgetError):
        pool.ensure_loaded(_cfg(tmp_path, "smol", smollm2_path))
    assert FakeEngine.made == []


def _service(tmp_path: Path, gguf: Path) -> Service:
    models = tmp_path / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "m"\npath = "{gguf}"\n\n[inference]\ncontext_size = 256\n'
        'system_prompt = "Be brief."\n')
    pool = ModelPool(4096, engine_factory=FakeEngine)
    return Service(DaemonSettings(models_dir=models), board="test board", pool=pool)


def test_generation_events_and_the_stats_from_the_return_value(tmp_path, smollm2_path):
    svc = _service(tmp_path, smollm2_path)
    events = list(svc.run("generate", {"messages": [{"role": "user", "content": "Hi"}],
                                       "options": {"max_tokens": 2}}))
    assert [e["type"] for e in events] == ["info", "token", "token", "result"]
    assert [e["text"] for e in events[1:3]] == ["Hello", ","]
    assert [e["logprob"] for e in events[1:3]] == [-0.5, -1.0]
    assert "tokens" not in events[1]  # per-token detail only when asked for
    result = events[-1]["data"]
    assert result["text"] == "Hello," and result["completion_tokens"] == 2
    assert result["finish_reason"] == "length" and result["prompt_tokens"] == 7
    call = FakeEngine.made[0].calls[0]
    assert call["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert call["opts"].max_tokens == 2


def test_logprobs_detail_and_every_sampling_option_reach_the_engine(tmp_path, smollm2_path):
    svc = _service(tmp_path, smollm2_path)
    options = {"max_tokens": 3, "logprobs": True, "top_logprobs": 2, "frequency_penalty": 0.5,
               "presence_penalty": 0.25, "logit_bias": {"42": -100}, "seed": 7, "top_k": 5,
               "repeat_penalty": 1.2, "stop": ["x"]}
    events = list(svc.run("generate", {"prompt": "Hi", "options": options}))
    tokens = [t for e in events if e["type"] == "token" for t in e["tokens"]]
    assert [t["text"] for t in tokens] == ["Hello", ",", " world"]
    assert tokens[0]["top"] == [{"text": "Hello", "logprob": -0.5}]
    opts = FakeEngine.made[0].calls[0]["opts"]
    assert (opts.frequency_penalty, opts.presence_penalty, opts.logit_bias, opts.seed,
            opts.top_k, opts.repeat_penalty, opts.stop, opts.top_logprobs) == \
        (0.5, 0.25, {42: -100.0}, 7, 5, 1.2, ("x",), 2)


@pytest.mark.parametrize("options,field", [
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"top_logprobs": 50}, "top_logprobs"), ({"logit_bias": [1]}, "logit_bias")])
def test_bad_options_are_protocol_errors_naming_the_field(tmp_path, smollm2_path, options, field):
    svc = _service(tmp_path, smollm2_path)
    [ev] = list(svc.run("generate", {"prompt": "Hi", "options": options}))
    assert ev["type"] == "error" and ev["code"] == "protocol" and field in ev["message"]


def test_the_daemon_runs_every_generation_on_one_thread(tmp_path, smollm2_path):
    """llama.cpp's OpenMP build keeps one worker team per calling thread; decodes from changing
    threads cut generation to a third. So every queued op runs on the daemon's one llama
    thread, whichever transport or connection asked (here: four sockets, in parallel)."""
    import threading

    import shutil
    import tempfile

    from hublabio.client import Client
    from hublabio.daemon.server import start_in_thread

    seen: set[tuple[int, str]] = set()

    class ThreadRecordingEngine(FakeEngine):
        def generate(self, *args, **kwargs):
            seen.add((threading.get_ident(), threading.current_thread().name))
            return (yield from super().generate(*args, **kwargs))

    models = tmp_path / "models"
    models.mkdir()
    (models / "model-config.toml").write_text(
        f'[model]\nname = "m"\npath = "{smollm2_path}"\n\n[inference]\ncontext_size = 256\n')
    pool = ModelPool(4096, engine_factory=ThreadRecordingEngine)
    sock_dir = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))  # socket paths are short
    handle = start_in_thread(Service(DaemonSettings(models_dir=models), board="b", pool=pool),
                             sock_dir / "d.sock", queue_size=16)
    try:
        def ask():
            with Client(handle.socket_path) as c:
                for _ in range(3):
                    assert c.call("generate", prompt="Hi")["text"] == "Hello, world"

        workers = [threading.Thread(target=ask) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
    finally:
        handle.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert len(seen) == 1 and next(iter(seen))[1].startswith("hublabd-llama")


def test_a_refused_reload_at_a_bigger_context_keeps_the_resident_model(tmp_path, smollm2_path):
    info = read_gguf_info(smollm2_path)
    pool = ModelPool(estimate_memory(info, 512).total_mb + 1, engine_factory=FakeEngine)
    cfg = _cfg(tmp_path, "smol", smollm2_path)
    pool.ensure_loaded(cfg)  # its TOML says 256
    with pytest.raises(BudgetError):
        pool.ensure_loaded(cfg, n_ctx=8192)
    [engine] = FakeEngine.made
    assert not engine.closed and [r.n_ctx for r in pool.resident()] == [256]
    pool.ensure_loaded(cfg, n_ctx=512)  # a reload that fits replaces it
    assert engine.closed and [r.n_ctx for r in pool.resident()] == [512]


@pytest.mark.parametrize("op,params,fragment", [
    ("generate", {"prompt": "hi", "model": 5}, "'model' must be a string or null, got int"),
    ("generate", {"prompt": "hi", "model": ["a"]}, "'model' must be a string or null, got list"),
    ("generate", {"prompt": "hi", "options": [1]}, "'options' must be an object or null"),
    ("models.load", {"name": "m", "n_ctx": 1.5}, "'n_ctx' must be an integer or null"),
    ("models.load", {"name": "m", "n_ctx": True}, "'n_ctx' must be an integer or null, got bool"),
    ("config.set", {"key": 5, "value": 1}, "'key' must be a string, got int"),
    ("generate", {"prompt": "\ud800"}, "prompt contains a lone surrogate"),
    ("generate", {"messages": [{"role": "user", "content": "a\udc00"}]},
     "messages[0].content contains a lone surrogate"),
])
def test_wrong_types_and_lone_surrogates_are_protocol_errors(tmp_path, smollm2_path, op, params,
                                                              fragment):
    svc = _service(tmp_path, smollm2_path)
    [ev] = list(svc.run(op, params))
    assert ev["type"] == "error" and ev["code"] == "protocol", ev
    assert fragment in ev["message"]
    assert FakeEngine.made == []  # refused before anything ran


def test_config_reset_op_moves_a_damaged_file_aside(tmp_path, smollm2_path):
    from hublabio.paths import settings_file

    svc = _service(tmp_path, smollm2_path)
    settings_file().parent.mkdir(parents=True, exist_ok=True)
    settings_file().write_text("garbage = [")
    [err] = list(svc.run("config.get", {}))
    assert err["type"] == "error" and "ai config reset" in err["message"]
    data = svc.call("config.reset")
    assert data["reset"] and Path(data["kept_as"]).read_text() == "garbage = ["
    assert svc.call("config.set", key="temperature", value="0.2")["value"] == 0.2


def test_fewer_slots_load_where_the_asked_ones_do_not_fit(tmp_path, smollm2_path):
    """Every slot has its own KV cache, which the estimate counts: a budget that fits two slots
    of this model, not four, loads it with two (no refusal), and asking again reloads nothing."""
    info = read_gguf_info(smollm2_path)
    two, four = (estimate_memory(info, 256, parallel=n).total_mb for n in (2, 4))
    assert four - two == pytest.approx(2 * estimate_memory(info, 256).kv_mb, rel=0.05)
    pool = ModelPool((two + four) / 2, load=LoadSettings(parallel=4), engine_factory=FakeEngine)
    cfg = _cfg(tmp_path, "smol", smollm2_path)
    res = pool.ensure_loaded(cfg)
    assert (res.parallel, res.parallel_asked) == (2, 4)
    assert FakeEngine.made[0].kwargs["parallel"] == 2
    assert pool.ensure_loaded(cfg) is res and len(FakeEngine.made) == 1
    with pytest.raises(BudgetError):  # not even one slot fits: the refusal names the numbers
        ModelPool(estimate_memory(info, 256).total_mb - 1, load=LoadSettings(parallel=4),
                  engine_factory=FakeEngine).ensure_loaded(cfg)


class ContextEngine(FakeEngine):
    """A fake engine that can add a context (Engine.add_context)."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.contexts = 1

    def add_context(self) -> None:
        self.contexts += 1


def test_another_adapter_set_gets_a_context_of_its_own_while_the_budget_has_room(
        tmp_path, smollm2_path):
    """Experts over one base with different adapters: each adapter set in use beyond the first
    gets a context (up to adapter_contexts), counted at extra_context_mb, one more lease each;
    never when the budget has no room for it (nothing is evicted for it)."""
    info = read_gguf_info(smollm2_path)
    base, extra = estimate_memory(info, 256).total_mb, extra_context_mb(info, 256)
    for name in ("a", "b"):
        (tmp_path / f"{name}.gguf").write_bytes(b"\0" * 1024)  # the fake never reads it

    def cfgs():
        out = []
        for name, line in (("plain", ""), ("ea", 'adapter = "a.gguf"\n'),
                           ("eb", 'adapter = "b.gguf"\n')):
            f = tmp_path / f"{name}.toml"
            f.write_text(f'[model]\nname = "{name}"\npath = "{smollm2_path}"\n{line}\n'
                         "[inference]\ncontext_size = 256\n")
            out.append(load_model_config(f))
        return out

    plain, ea, eb = cfgs()
    pool = ModelPool(base + extra + 1, load=LoadSettings(adapter_contexts=2),
                     engine_factory=ContextEngine)
    res = pool.ensure_loaded(plain)
    assert (res.contexts, res.leases, res.engine.contexts) == (1, 1, 1)
    pool.ensure_loaded(ea)  # a second adapter set: a second context
    assert (res.contexts, res.leases, res.engine.contexts) == (2, 2, 2)
    assert res.mb == pytest.approx(base + extra + 1024 / 2**20)
    pool.ensure_loaded(eb)  # a third set: adapter_contexts = 2 is the most
    assert (res.contexts, res.engine.contexts) == (2, 2)

    for load, budget in ((LoadSettings(adapter_contexts=2), base + extra / 2),
                         (LoadSettings(adapter_contexts=1), base + 2 * extra),
                         (LoadSettings(adapter_contexts=2, batch_mode="off"), base + 2 * extra)):
        FakeEngine.made.clear()
        pool = ModelPool(budget, load=load, engine_factory=ContextEngine)
        for cfg in (plain, ea, eb):
            res = pool.ensure_loaded(cfg)
        assert (res.contexts, res.engine.contexts, res.leases) == (1, 1, 1), load
