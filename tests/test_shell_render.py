"""Unit tests of the shell's pure parts: rendering results (plain dicts), parsing command
lines, the command table, completion. The daemon is exercised in tests/integration."""

from __future__ import annotations

import pytest

from hublabio.errors import ModelNotFound
from hublabio.shell import render
from hublabio.shell.commands import (COMMANDS, Output, ShellContext, UsageError, command,
                                     execute, parse)
from hublabio.shell.completer import complete_line


# ------------------------------------------------------------------------------- render

def test_model_loaded_line_matches_the_seed_format():
    text = render.model_loaded({"name": "smollm2-135m", "parameters_human": "135M",
                                "quantization": "Q4_1", "context_size": 2048,
                                "memory_mb": 121.4, "load_s": 0.31})
    lines = text.splitlines()
    assert lines[0] == "Model loaded: 135M parameters, Q4_1 quantization"
    assert "Context size: 2048 tokens" in lines
    assert "Memory: 121.4 MiB (loaded in 0.31 s)" in lines


def test_model_loaded_formats_raw_parameter_count():
    text = render.model_loaded({"parameters": 134_515_008, "quantization": "Q4_K_M"})
    assert text.startswith("Model loaded: 135M parameters, Q4_K_M quantization")


@pytest.mark.parametrize("n,expected", [(134_515_008, "135M"), (268_098_176, "268M"),
                                        (1_240_000_000, "1.2B"), (7_000_000_000, "7B"),
                                        (8_000, "8K"), (950, "950"), (None, "-")])
def test_human_params(n, expected):
    assert render.human_params(n) == expected


def test_human_mb():
    assert render.human_mb(82.46) == "82.5 MiB"
    assert render.human_mb(3584) == "3.50 GiB"
    assert render.human_mb(None) == "-"


def test_model_list_marks_loaded_and_missing():
    text = render.model_list([
        {"name": "smollm2-135m", "type": "gguf", "size_mb": 82.5, "loaded": True,
         "quantization": "Q4_1", "parameters_human": "135M"},
        {"name": "gemma", "type": "gguf", "size_mb": 241.0, "loaded": False,
         "quantization": "Q4_K_M", "parameters": 268_098_176},
        {"name": "gone", "type": "gguf", "size_mb": None, "loaded": False, "missing": True},
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "SIZE", "PARAMS", "QUANT", "FITS"]
    row = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in lines[1:4]}
    assert row["smollm2-135m"].startswith("*") and "82.5 MiB" in row["smollm2-135m"]
    assert row["gemma"].startswith(" ") and "268M" in row["gemma"] and "Q4_K_M" in row["gemma"]
    assert "missing" in row["gone"]
    assert lines[-1] == "(* = loaded; FITS: the memory estimate at its context)"


def test_model_list_reports_skipped_configs_and_unreadable_files():
    text = render.model_list(
        [{"name": "a", "type": "gguf", "size_mb": 1.0, "loaded": False, "missing": None,
          "error": "/m/a.gguf: not a GGUF file (magic b'JUNK')"},
         {"name": "b", "type": "gguf", "size_mb": None, "loaded": False,
          "missing": "file not found: /m/b.gguf"}],
        [{"path": "/m/bad.toml", "key": "temperature",
          "message": "/m/bad.toml: [inference] temperature: expected a number"}])
    assert "(* = loaded; FITS: the memory estimate at its context)\n" in text
    assert "  skipped: /m/bad.toml: [inference] temperature: expected a number" in text
    assert "  a: /m/a.gguf: not a GGUF file" in text
    assert "  b: file not found: /m/b.gguf" in text


def test_model_list_says_what_fits_the_budget():
    rows = [{"name": n, "type": "gguf", "size_mb": 1.0, "loaded": False, **fit}
            for n, fit in (("small", {"fits": "yes", "max_ctx": 8192}),
                           ("big", {"fits": "ctx", "max_ctx": 1536}),
                           ("huge", {"fits": "no", "max_ctx": None}),
                           ("remote", {}))]
    lines = render.model_list(rows, budget_mb=3584).splitlines()
    fits = {line.split()[0]: line.split()[-1] for line in lines[1:5]}
    assert fits == {"small": "yes", "big": "1536", "huge": "no", "remote": "-"}
    assert "ctx 1536" in lines[2]
    assert lines[-1].endswith("in the 3.50 GiB budget)")


def test_model_list_empty_says_what_to_do():
    assert "model-config.toml" in render.model_list([])


def test_info_shows_memory_used_over_budget_and_speed():
    text = render.info({"model": "smollm2-135m", "parameters_human": "135M",
                        "quantization": "Q4_1", "memory_used_mb": 120.0, "budget_mb": 3500.0,
                        "last_tps": 48.25})
    assert "Model:" in text and "smollm2-135m" in text
    assert "120.0 MiB used / 3.42 GiB budget" in text
    assert "Tokens/sec:   48.2 (the last answer)" in text or "Tokens/sec:   48.3" in text
    assert "Q4_1" in text and "135M" in text


def test_info_with_daemon_field_names():
    text = render.info({"model": "smollm2-135m", "parameters_human": "135M",
                        "quantization": "Q4_1", "used_mb": 118.2, "budget_mb": 400,
                        "loaded": True, "last_tps": None, "context_size": 2048,
                        "resident": [{"names": ["smollm2-135m"], "memory_mb": 118.2}]})
    assert "118.2 MiB used / 400.0 MiB budget" in text
    assert "Loaded:" in text and "yes" in text
    assert "In memory:" in text and "Context size:" in text and "2048 tokens" in text


def test_stats_lists_resident_models_one_per_line():
    text = render.stats({"requests": 2, "resident": [{"names": ["a"], "memory_mb": 1.5},
                                                     {"names": ["b"], "memory_mb": 2.0}]})
    assert "resident[0]: names=a memory_mb=1.5" in text
    assert "resident[1]: names=b memory_mb=2" in text


def test_info_without_a_model():
    text = render.info({"model": None, "memory_used_mb": 0, "budget_mb": 400, "last_tps": None})
    assert "(none loaded)" in text
    assert "Tokens/sec:" in text and text.rstrip().endswith("-")


def test_config_lists_sorted_keys_and_marks_overrides():
    text = render.config({"temperature": 0.2, "max_tokens": 16, "top_k": 40},
                         {"temperature": 0.2}, "smollm2-135m")
    assert text.splitlines() == ["Settings for smollm2-135m:", "max_tokens  = 16",
                                 "temperature = 0.2   (set with ai config)", "top_k       = 40"]


def test_stats_flattens_nested_counters():
    text = render.stats({"requests": 3, "tokens": {"generated": 48}, "uptime_s": 12.5})
    assert "requests:" in text and "tokens.generated:" in text and "12.5" in text


def test_benchmark_table_is_llama_bench_style():
    text = render.benchmark({"model": "smollm2-135m", "quantization": "Q4_1", "size_mb": 82.5,
                             "parameters_human": "135M", "threads": 2, "pp": 64, "tg": 32,
                             "pp_tps": 812.345, "tg_tps": 61.2, "tg_std": 1.5})
    lines = text.splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    assert set(lines[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    assert "pp64" in lines[2] and "812.35" in lines[2]
    assert "tg32" in lines[3] and "61.20 ± 1.50" in lines[3]
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_stream_printer_prefixes_once_and_puts_info_lines_first():
    out: list[str] = []
    printer = render.StreamPrinter(out.append)
    printer.event({"type": "info", "text": "[Router] Selected expert: python"})
    printer.event({"type": "token", "text": " Paris", "logprob": -0.1})
    printer.event({"type": "token", "text": " is", "logprob": -0.2})
    printer.finish({"text": "Paris is"})
    assert "".join(out) == "[Router] Selected expert: python\nAI: Paris is\n"


def test_stream_printer_cancel_and_empty_answer():
    out: list[str] = []
    printer = render.StreamPrinter(out.append)
    printer.token("Once")
    printer.cancelled()
    assert "".join(out) == "AI: Once\n[cancelled]\n"
    out.clear()
    printer = render.StreamPrinter(out.append)
    printer.finish({"text": "done"})
    assert "".join(out) == "AI: done\n"


def test_history_numbers_entries():
    assert render.history(["ai list", "?hi"]) == "1  ai list\n2  ?hi"
    assert render.history([]) == "(history is empty)"


# ------------------------------------------------------------------- the command table

class ScriptedClient:
    """A fake daemon client for the pure command logic (answers from a dict of ops)."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def call(self, op, **params):
        self.calls.append((op, params))
        answer = self.answers[op]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_ctx(answers=None):
    out, err = [], []
    client = ScriptedClient(answers or {})
    ctx = ShellContext(connect=lambda: client, out=Output(out.append, error_write=err.append))
    return ctx, client, out, err


def test_parse_picks_longest_command_and_splits_args():
    cmd, args = parse("ai load  'my model' --ctx 512")
    assert cmd.name == "ai load" and args == ["my model", "--ctx", "512"]
    cmd, text = parse("?What's 2+2?")
    assert cmd.name == "?" and text == "What's 2+2?"


def test_unknown_command_suggests_the_closest():
    with pytest.raises(UsageError, match="unknown command 'ai lod'. Did you mean 'ai load'"):
        parse("ai lod x")
    with pytest.raises(UsageError, match="needs a subcommand: benchmark, config"):
        parse("ai")


def test_execute_prints_errors_and_reports_failure():
    ctx, client, out, err = make_ctx({"models.load": ModelNotFound("no model named 'nosuch'")})
    assert execute(ctx, "ai load nosuch") is False
    assert err == ["Error: no model named 'nosuch'\n"]
    assert client.calls == [("models.load", {"name": "nosuch"})]
    assert execute(ctx, "ai stat") is False
    assert "Did you mean 'ai stats'" in err[-1]


def test_ai_config_sends_the_pair_and_prints_the_daemons_answer():
    ctx, client, out, err = make_ctx({"config.set": {"key": "temperature", "value": 0.2,
                                                     "note": "applies to the next request"}})
    assert execute(ctx, "ai config temperature 0.2")
    assert client.calls[-1] == ("config.set", {"key": "temperature", "value": "0.2"})
    assert out[-1] == "temperature = 0.2 (saved); applies to the next request\n"
    assert not execute(ctx, "ai config temperature")
    assert err[-1] == "Error: usage: ai config [<key> <value> | reset]\n"


def test_ai_config_reset_says_where_the_old_file_went():
    ctx, client, out, err = make_ctx({"config.reset": {"reset": True,
                                                       "kept_as": "/s/settings.toml.damaged-1"}})
    assert execute(ctx, "ai config reset")
    assert client.calls[-1] == ("config.reset", {})
    assert out[-1] == "Settings reset; the old file is kept as /s/settings.toml.damaged-1\n"


def test_ai_load_path_is_resolved_and_a_path_not_here_goes_to_the_daemon(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ctx, client, out, err = make_ctx({"models.load": {"parameters_human": "1K",
                                                      "quantization": "F16"}})
    assert execute(ctx, f"ai load {gguf} --ctx 256")
    assert client.calls[-1] == ("models.load", {"path": str(gguf), "n_ctx": 256})
    # the daemon may know it: the seed writes /models/x.gguf (test_seed_layout checks that)
    assert execute(ctx, "ai load /models/model-q4_k_m.gguf")
    assert client.calls[-1] == ("models.load", {"path": "/models/model-q4_k_m.gguf"})


def test_help_lists_every_command_with_its_docstring_summary():
    ctx, _, out, _ = make_ctx()
    assert execute(ctx, "help")
    text = "".join(out)
    for name, cmd in COMMANDS.items():
        assert f"  {cmd.short_usage} " in text and cmd.summary in text
    out.clear()
    assert execute(ctx, "help ai load")
    assert "".join(out).startswith("ai load <name|path>")


def test_add_on_modules_register_with_the_decorator():
    @command("zz test echo", usage="zz test echo <words>")
    def echo(ctx, args):
        """Echo the words back."""
        ctx.out.line(" ".join(args))

    try:
        ctx, _, out, _ = make_ctx()
        assert execute(ctx, "zz test echo a 'b c'")
        assert out == ["a b c\n"]
        with pytest.raises(ValueError, match="registered twice"):
            command("zz test echo")(echo)
    finally:
        del COMMANDS["zz test echo"]


def test_completion_of_commands_and_model_names():
    ctx, client, _, _ = make_ctx({"models.list": {"models": [{"name": "smollm2-135m"},
                                                             {"name": "gemma3"}]}})
    assert sorted(t for t, _ in complete_line(ctx, "ai l")) == ["list", "load"]
    assert ("ai", -1) in complete_line(ctx, "a")
    assert complete_line(ctx, "ai load sm") == [("smollm2-135m", -2)]
    assert complete_line(ctx, "ai config temp") == [("temperature", -4)]
    assert ("ai load", -4) in complete_line(ctx, "help ai l")
    # names are cached: a second completion does not ask the daemon again
    complete_line(ctx, "ai unload ")
    assert [op for op, _ in client.calls] == ["models.list"]


def test_output_uses_crlf_on_a_serial_line():
    sent = []
    out = Output(sent.append, newline="\r\n")
    out.line("a\nb")
    assert sent == ["a\r\nb\r\n"]


def test_info_shows_the_buffer_types_threads_and_repack_policy():
    text = render.info({"model": "gemma", "used_mb": 300, "budget_mb": 4000, "resident": [
        {"names": ["gemma"], "buffers_mb": {"CPU_Mapped": 241.0, "CPU_REPACK": 12.7},
         "threads": 2, "threads_batch": 4,
         "repack": "auto; AMX buffer type excluded (llama.cpp issue #20824)"}]})
    assert "CPU_REPACK" in text and "CPU_Mapped" in text
    assert "2 generation, 4 prompt" in text
    assert "AMX buffer type excluded" in text


def test_settings_moe_in_the_seeds_words():
    from hublabio.shell.commands_moe import render_settings

    text = render_settings({
        "enabled": True, "routing": "topk 2", "synthesis": "best", "router": "onnx",
        "active_experts": ["python", "rust", "web"],
        "expert_sizes": {"python": {"model": "python-expert", "kind": "adapter", "mb": 1.8},
                         "rust": {"model": "rust-expert", "kind": "model", "mb": 101.2},
                         "web": {"model": "web-expert", "kind": "remote", "mb": None}},
        "unavailable_experts": {"ai": "ai.lora.gguf not found"}})
    assert text.splitlines() == [
        "MoE-R: enabled", "Routing Strategy: TopK (2)", "Synthesis Strategy: Best",
        "Router: onnx", "Active Experts:", "  - python (python-expert, 1.8 MiB adapter)",
        "  - rust (rust-expert, 101.2 MiB model)", "  - web (web-expert, remote)",
        "  unavailable: ai: ai.lora.gguf not found"]


def test_ai_info_says_tokens_per_second():
    from hublabio.shell import render

    line = next(ln for ln in render.info({"model": "m", "last_tps": 12.34}).splitlines()
                if ln.startswith("Tokens/sec:"))
    assert line.split(None, 1)[1] == "12.3 (the last answer)"
