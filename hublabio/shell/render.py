"""Pure functions that turn daemon results (plain dicts) into the text the shell prints.

Nothing here talks to the daemon or writes to a terminal; every function returns a string
(lines joined with "\\n", no trailing newline) so the REPL, `-c`, piped stdin and the serial
console print exactly the same thing, and tests can check it with plain dicts.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

AI_PREFIX = "AI: "


def human_mb(mb: float | None) -> str:
    """82.46 -> '82.5 MiB', 3584 -> '3.50 GiB'; None -> '-'."""
    if mb is None:
        return "-"
    mb = float(mb)
    if abs(mb) >= 1024:
        return f"{mb / 1024:.2f} GiB"
    return f"{mb:.1f} MiB"


def human_params(n: int | float | None) -> str:
    """134515008 -> '135M', 1_240_000_000 -> '1.2B', 8_000 -> '8K'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + unit
    return f"{n:.0f}"


def _params_text(data: Mapping[str, Any]) -> str:
    value = data.get("parameters_human") or data.get("parameters")
    return value if isinstance(value, str) else human_params(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          align: str | None = None) -> str:
    """A plain-text table; `align` is one letter per column, 'l' or 'r' (default all 'l')."""
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    align = align or "l" * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(headers)] + [fmt(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> str:
    """A llama-bench style markdown table (`| a | b |` with `---:` for right-aligned columns)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    widths = [max(w, 3) for w in widths]

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(parts) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                             for w, a in zip(widths, align)) + " |"
    return "\n".join([fmt(headers), rule] + [fmt(r) for r in rows])


def _fits_text(m: Mapping[str, Any]) -> str:
    if m.get("fits") == "yes":
        return "yes"
    if m.get("fits") == "ctx":
        return f"ctx {m.get('max_ctx')}"
    return "no" if m.get("fits") == "no" else "-"


def model_list(models: Sequence[Mapping[str, Any]],
               errors: Sequence[Mapping[str, Any]] = (), *, paths: bool = False,
               budget_mb: float | None = None) -> str:
    """`ai list`: one row per model on disk, `*` marks the loaded ones; FITS says whether the
    memory estimate admits it in the budget at its context (`yes`), only at a smaller one
    (`ctx N`, the largest) or not at all (`no`); with `paths`, each one's file. Then the
    problems (config files that were skipped, model files that cannot be read or are
    missing)."""
    problems = [f"skipped: {e.get('message') or e.get('path')}" for e in errors]
    problems += [f"{m.get('name')}: {m['missing'] if isinstance(m.get('missing'), str) else m['error']}"
                 for m in models if isinstance(m.get("missing"), str) or m.get("error")]
    notes = "".join(f"\n  {p}" for p in problems)
    if not models:
        return ("No models found (put a model-config.toml and a .gguf in the models "
                "directory)." + notes)
    rows = []
    for m in models:
        mark = "*" if m.get("loaded") else " "
        size = "missing" if m.get("missing") else human_mb(m.get("size_mb"))
        rows.append([mark, m.get("name", "?"), m.get("type", ""), size,
                     _params_text(m), m.get("quantization") or "-", _fits_text(m)]
                    + ([m.get("path") or "-"] if paths else []))
    headers = [" ", "NAME", "TYPE", "SIZE", "PARAMS", "QUANT", "FITS"] + (["PATH"] if paths else [])
    body = table(headers, rows, "lllrrll" + ("l" if paths else ""))
    budget = f" in the {human_mb(budget_mb)} budget" if budget_mb is not None else ""
    return body + f"\n(* = loaded; FITS: the memory estimate at its context{budget})" + notes


def model_loaded(data: Mapping[str, Any]) -> str:
    """`ai load`: 'Model loaded: 135M parameters, Q4_1 quantization' and the details."""
    lines = [f"Model loaded: {_params_text(data)} parameters, "
             f"{data.get('quantization') or 'unknown'} quantization"]
    if data.get("name"):
        lines.append(f"Name: {data['name']}")
    if data.get("context_size") is not None:
        lines.append(f"Context size: {data['context_size']} tokens")
    if data.get("memory_mb") is not None:
        mem = f"Memory: {human_mb(data['memory_mb'])}"
        if data.get("already_loaded"):
            mem += " (already loaded)"
        elif data.get("load_s") is not None:
            mem += f" (loaded in {float(data['load_s']):.2f} s)"
        lines.append(mem)
    if data.get("used_mb") is not None and data.get("budget_mb") is not None:
        lines.append(f"In use: {human_mb(data['used_mb'])} of {human_mb(data['budget_mb'])} budget")
    evicted = data.get("evicted") or []
    if evicted:
        lines.append("Unloaded to make room: " + ", ".join(map(str, evicted)))
    return "\n".join(lines)


def model_unloaded(data: Mapping[str, Any]) -> str:
    names = data.get("unloaded")
    if names is None and data.get("name"):
        names = [data["name"]]
    if isinstance(names, str):
        names = [names]
    if not names:
        return "No model was loaded."
    return "Model unloaded: " + ", ".join(map(str, names))


def _kv_lines(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)


def info(data: Mapping[str, Any]) -> str:
    """`ai info`: model, parameters, quantization, memory used / budget, Tokens/sec (of the last
    answer), and what is resident (weights' buffers, threads, repack)."""
    model = data.get("model")
    tps = data.get("last_tps")
    pairs: list[tuple[str, Any]] = [("Model", model or "(none loaded)")]
    if model:
        pairs += [("Parameters", _params_text(data)),
                  ("Quantization", data.get("quantization") or "-")]
        if data.get("context_size") is not None:
            pairs.append(("Context size", f"{data['context_size']} tokens"))
        if data.get("batch_mode"):
            pairs.append(("Batching", f"{data['batch_mode']}, {data.get('parallel', 1)} "
                                      f"slot{'s' if data.get('parallel', 1) != 1 else ''} "
                                      "(ai config parallel N | batch_mode off)"))
    used = data.get("memory_used_mb", data.get("used_mb"))
    pairs.append(("Memory", f"{human_mb(used)} used / {human_mb(data.get('budget_mb'))} budget"))
    loaded = data.get("loaded")
    if isinstance(loaded, bool) and model:
        pairs.append(("Loaded", "yes" if loaded else "no (loads on the first question)"))
    rows = data.get("resident") or []
    resident = [n for r in rows for n in r.get("names", [])]
    if resident:
        pairs.append(("In memory", ", ".join(map(str, resident))))
    for r in rows:
        if r.get("buffers_mb"):
            bufs = ", ".join(f"{k} {human_mb(v)}" for k, v in sorted(r["buffers_mb"].items()))
            if len(rows) > 1:
                bufs += f" ({', '.join(map(str, r.get('names', [])))})"
            pairs.append(("Weights", bufs))
        if r.get("threads"):
            pairs.append(("Threads", f"{r['threads']} generation, "
                                     f"{r.get('threads_batch') or r['threads']} prompt"))
        if r.get("repack"):
            pairs.append(("Repack", r["repack"]))
        if r.get("contexts", 1) > 1:
            pairs.append(("Contexts", f"{r['contexts']}, one per LoRA adapter set in use "
                                      "(ai config adapter_contexts N)"))
        if r.get("parallel", 1) != data.get("parallel", r.get("parallel", 1)):
            pairs.append(("Slots", f"{r['parallel']} ({', '.join(map(str, r.get('names', [])))}:"
                                   " as many as the memory budget allows)"))
    if data.get("board"):
        pairs.append(("Board", data["board"]))
    pairs.append(("Tokens/sec", f"{float(tps):.1f} (the last answer)" if tps else "-"))
    return _kv_lines(pairs)


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if not math.isnan(value) else "nan"
    if isinstance(value, (list, tuple)):
        return ", ".join(_scalar(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={_scalar(v)}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)


def config(settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
           model: str | None = None) -> str:
    """`ai config` with no arguments: `key = value` lines, sorted; values set with
    `ai config` are marked."""
    if not settings:
        return "(no settings)"
    overrides = overrides or {}
    width = max(len(k) for k in settings)
    lines = [f"Settings for {model}:"] if model else []
    for key in sorted(settings):
        value = settings[key]
        text = _scalar(value)
        if isinstance(value, str):
            text = repr(value if len(value) <= 60 else value[:57] + "...")
        mark = "   (set with ai config)" if key in overrides else ""
        lines.append(f"{key.ljust(width)} = {text}{mark}")
    return "\n".join(lines)


def config_set(data: Mapping[str, Any]) -> str:
    text = f"{data.get('key')} = {_scalar(data.get('value'))} (saved)"
    if data.get("note"):
        text += f"; {data['note']}"
    return text


def flat_pairs(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts flattened to dotted keys, in insertion order."""
    pairs: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            pairs += flat_pairs(value, name + ".")
        else:
            pairs.append((name, value))
    return pairs


def stats(data: Mapping[str, Any]) -> str:
    """`ai stats`: every counter the daemon reports, one per line (resident models: one line
    each)."""
    pairs = []
    for key, value in flat_pairs(data):
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            pairs += [(f"{key}[{i}]", _scalar({k: x for k, x in v.items() if k != "path"}))
                      for i, v in enumerate(value)]
        else:
            pairs.append((key, _scalar(value)))
    if not pairs:
        return "(no statistics yet)"
    return _kv_lines(pairs)


def _tps(mean: Any, std: Any) -> str:
    if mean is None:
        return "-"
    text = f"{float(mean):.2f}"
    if std is not None:
        text += f" ± {float(std):.2f}"
    return text


def benchmark(data: Mapping[str, Any]) -> str:
    """`ai benchmark`: a llama-bench style table, one row for prompt processing (ppN) and one
    for generation (tgN), tokens per second."""
    model = data.get("model") or data.get("name") or "?"
    quant = data.get("quantization")
    label = f"{model} {quant}" if quant else str(model)
    size = human_mb(data.get("size_mb")) if data.get("size_mb") is not None else "-"
    params = _params_text(data)
    threads = data.get("threads", "-")
    rows = []
    if data.get("pp_tps") is not None:
        rows.append([label, size, params, "CPU", threads, f"pp{data.get('pp', '')}",
                     _tps(data["pp_tps"], data.get("pp_std"))])
    if data.get("tg_tps") is not None:
        rows.append([label, size, params, "CPU", threads, f"tg{data.get('tg', '')}",
                     _tps(data["tg_tps"], data.get("tg_std"))])
    if not rows:
        return "(the benchmark returned no measurements)"
    return markdown_table(["model", "size", "params", "backend", "threads", "test", "t/s"],
                          rows, "lrrlrrr")


def help_list(commands: Iterable[Any]) -> str:
    """`help`: each command with the first line of its docstring."""
    commands = sorted(commands, key=lambda c: (c.name != "?", c.name))
    width = max(len(c.short_usage) for c in commands)
    lines = [f"  {c.short_usage.ljust(width)}  {c.summary}" for c in commands]
    return "Commands:\n" + "\n".join(lines) + "\nType `help <command>` for details."


def help_one(cmd: Any) -> str:
    """`help <command>`: the command's full docstring."""
    return f"{cmd.usage}\n\n{cmd.help}" if cmd.help else cmd.usage


def history(entries: Sequence[str]) -> str:
    if not entries:
        return "(history is empty)"
    width = len(str(len(entries)))
    return "\n".join(f"{str(i).rjust(width)}  {e}" for i, e in enumerate(entries, 1))


def error(message: Any) -> str:
    return f"Error: {message}"


class StreamPrinter:
    """Prints a streamed answer: `info` events as their own lines (for MoE: `[Router] ...`),
    then `AI: ` once, then each token as it arrives. `write` receives text pieces."""

    def __init__(self, write: Callable[[str], None], prefix: str = AI_PREFIX):
        self.write = write
        self.prefix = prefix
        self.started = False
        self.at_line_start = True
        self.tokens = 0

    def info(self, text: str) -> None:
        if self.started:
            self._newline()
        self.write(text.rstrip("\n") + "\n")
        self.at_line_start = True

    def token(self, text: str) -> None:
        if not self.started:
            if not self.at_line_start:
                self.write("\n")
            self.write(self.prefix)
            self.started = True
            text = text.lstrip() if self.tokens == 0 else text
        self.tokens += 1
        if text:
            self.write(text)
            self.at_line_start = text.endswith("\n")

    def event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token":
            self.token(event.get("text", ""))
        elif kind == "info":
            self.info(str(event.get("text", "")))

    def finish(self, result: Mapping[str, Any] | None = None) -> None:
        """End the answer line. If no token came, print the final text from the result."""
        if not self.started:
            text = (result or {}).get("text", "")
            self.token(text)
        self._newline()

    def cancelled(self) -> None:
        self._newline()
        self.write("[cancelled]\n")
        self.at_line_start = True

    def _newline(self) -> None:
        if not self.at_line_start:
            self.write("\n")
            self.at_line_start = True
