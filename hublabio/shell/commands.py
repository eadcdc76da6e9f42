"""The shell's command table: name -> function, filled by the `@command` decorator.

A command is a function `(ctx, args)` whose docstring is its help (first line = summary shown
by `help`). `args` is the shlex-split list of words after the command name, or, with
`raw=True`, the rest of the line as one string (`?question`). A command reports failure by
raising a `HublabError` (the shell prints `Error: <message>`); it prints through `ctx.out`.

Other modules add commands the same way; every `hublabio/shell/commands_*.py` module (for
example `commands_moe.py`, `commands_pkg.py`) is imported by `load_plugins()`:

    from hublabio.shell.commands import command, UsageError

    @command("moe route", usage="moe route <question>", complete=None)
    def moe_route(ctx, args):
        '''Show which experts the router picks for a question.'''
        data = ctx.client.call("moe.route", query=" ".join(args))
        ctx.out.line(...)

`ctx.stream(op, **params)` streams an answer exactly as `?question` does (AI: prefix, info
lines, Ctrl-C cancels) and returns the final result dict.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from hublabio import params, paths
from hublabio.errors import Cancelled, DaemonUnavailable, HublabError
from hublabio.shell import render

Completion = Iterable[str] | Callable[["ShellContext"], Iterable[str]] | None


class UsageError(HublabError):
    """A command was called with the wrong arguments."""

    code = "usage"


class ExitShell(Exception):
    """Raised by `exit`/`quit` to end the loop that runs commands."""


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable[..., Any]
    help: str
    usage: str
    complete: Completion = None
    raw: bool = False

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join(self.help.split("\n\n", 1)[0].split())

    @property
    def short_usage(self) -> str:
        """The usage for the `help` list: long ones shortened to `name ...`."""
        return self.usage if len(self.usage) <= 34 else f"{self.name} ..."

    def candidates(self, ctx: "ShellContext") -> list[str]:
        """Values offered by tab completion for this command's argument."""
        if self.complete is None:
            return []
        values = self.complete(ctx) if callable(self.complete) else self.complete
        return list(values)


COMMANDS: dict[str, Command] = {}


def command(name: str, *, usage: str | None = None, complete: Completion = None,
            raw: bool = False):
    """Register `func` as the shell command `name` (one or more words, e.g. "ai load")."""
    def register(func):
        if name in COMMANDS:
            raise ValueError(f"shell command {name!r} is registered twice "
                             f"({COMMANDS[name].func.__module__} and {func.__module__})")
        COMMANDS[name] = Command(name=name, func=func, help=inspect.getdoc(func) or "",
                                 usage=usage or name, complete=complete, raw=raw)
        return func
    return register


_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every `hublabio.shell.commands_*` module so its commands register. Returns the
    warnings for modules that failed to import (the shell still runs without them)."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    warnings = []
    package_dir = Path(__file__).resolve().parent
    for mod in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if not mod.name.startswith("commands_"):
            continue
        try:
            importlib.import_module(f"hublabio.shell.{mod.name}")
        except Exception as exc:  # a broken add-on must not take the whole shell down
            warnings.append(f"warning: shell commands in hublabio/shell/{mod.name}.py "
                            f"not loaded: {type(exc).__name__}: {exc}")
    return warnings


class Output:
    """Where a command prints. `newline` is "\\r\\n" on a serial line."""

    def __init__(self, write: Callable[[str], Any], flush: Callable[[], Any] | None = None,
                 error_write: Callable[[str], Any] | None = None, newline: str = "\n"):
        self._write = write
        self._flush = flush or (lambda: None)
        self._error_write = error_write
        self.newline = newline

    @classmethod
    def for_streams(cls, out=None, err=None) -> "Output":
        out = out or sys.stdout
        err = err or sys.stderr

        def write_err(text: str) -> None:
            out.flush()
            err.write(text)
            err.flush()

        return cls(out.write, out.flush, write_err)

    def write(self, text: str) -> None:
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        self._write(text)
        self._flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def error(self, text: str) -> None:
        if self._error_write is None:
            self.line(text)
            return
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        self._error_write(text + self.newline)


@dataclass
class ShellContext:
    """What a command can use: the daemon client, the output, the history."""

    connect: Callable[[], Any]
    out: Output
    history: Callable[[], list[str]] = field(default=lambda: [])
    cache_s: float = 10.0
    _client: Any = None
    _names: tuple[float, list[str]] | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = self.connect()
        return self._client

    def reset_client(self) -> None:
        """Drop the connection (after an interrupted call its state is unknown); the next
        use reconnects. The daemon cancels whatever the old connection was running."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def model_names(self) -> list[str]:
        """Model names for completion, cached for `cache_s` seconds."""
        now = time.monotonic()
        if self._names is None or now - self._names[0] > self.cache_s:
            models = self.client.call("models.list").get("models", [])
            self._names = (now, [m["name"] for m in models if "name" in m])
        return self._names[1]

    def forget_models(self) -> None:
        self._names = None

    def stream(self, op: str, **params) -> Mapping[str, Any]:
        """Stream op's events: info lines, `AI: ` + tokens; Ctrl-C (KeyboardInterrupt) cancels
        the request on the daemon and raises Cancelled. Returns the final result data."""
        printer = render.StreamPrinter(self.out.write)
        events = self.client.stream(op, **params)
        result: Mapping[str, Any] = {}
        try:
            for event in events:
                if event.get("type") == "result":
                    result = event.get("data") or {}
                    break
                printer.event(event)
        except KeyboardInterrupt:
            try:
                events.close()  # sends cancel, skips the request's remaining events
            except (KeyboardInterrupt, HublabError, OSError):
                self.reset_client()  # a second Ctrl-C: drop the connection instead
            printer.cancelled()
            raise Cancelled("answer cancelled") from None
        printer.finish(result)
        if result.get("finish_reason") == "cancelled":
            self.out.line("[cancelled]")
        return result


def parse(line: str) -> tuple[Command, list[str] | str]:
    """Find the command for `line` (longest matching name) and its arguments."""
    text = line.strip()
    if text.startswith("?"):
        return COMMANDS["?"], text[1:].strip()
    words = text.split()
    for n in range(len(words), 0, -1):
        cmd = COMMANDS.get(" ".join(words[:n]))
        if cmd is None:
            continue
        rest = text
        for word in words[:n]:
            rest = rest[rest.index(word) + len(word):]
        rest = rest.strip()
        if cmd.raw:
            return cmd, rest
        try:
            return cmd, shlex.split(rest)
        except ValueError as exc:
            raise UsageError(f"{cmd.name}: cannot parse arguments: {exc}") from None
    raise UsageError(unknown_message(words))


def unknown_message(words: list[str]) -> str:
    best, best_score = None, 0.0
    for name in COMMANDS:
        n = len(name.split())
        score = difflib.SequenceMatcher(None, " ".join(words[:n]), name).ratio()
        if score > best_score:
            best, best_score = name, score
    groups = sorted({n.split()[0] for n in COMMANDS if " " in n})
    typed = " ".join(words[:2] if words and words[0] in groups else words[:1])
    if len(words) == 1 and words[0] in groups:
        subs = sorted(n.split(" ", 1)[1] for n in COMMANDS if n.startswith(words[0] + " "))
        return f"'{typed}' needs a subcommand: {', '.join(subs)}"
    message = f"unknown command '{typed}'"
    if best is not None and best_score >= 0.5:
        message += f". Did you mean '{best}'?"
    return message + " (type `help` for the list)"


def execute(ctx: ShellContext, line: str) -> bool:
    """Run one command line; print its output or `Error: ...`. True if it succeeded.
    `exit` raises ExitShell. Blank lines and `#` comments succeed and do nothing."""
    if not line.strip() or line.lstrip().startswith("#"):
        return True
    try:
        cmd, args = parse(line)
        cmd.func(ctx, args)
        return True
    except ExitShell:
        raise
    except Cancelled:
        return False
    except KeyboardInterrupt:
        # Interrupted between request and reply: the connection's state is unknown.
        ctx.reset_client()
        ctx.out.line("")
        ctx.out.error("[interrupted]")
        return False
    except DaemonUnavailable as exc:
        ctx.reset_client()  # the next command reconnects (or starts a daemon in-process)
        ctx.out.error(render.error(exc))
        return False
    except HublabError as exc:
        ctx.out.error(render.error(exc))
        return False
    except Exception as exc:  # a bug in one command must not end the shell
        ctx.out.error(render.error(f"internal error in `{line.strip()}`: "
                                   f"{type(exc).__name__}: {exc}"))
        return False


def _require(args: list[str], low: int, high: int, usage: str) -> None:
    if not low <= len(args) <= high:
        raise UsageError(f"usage: {usage}")


# ---------------------------------------------------------------- the built-in commands

CONFIG_KEYS = (*params.names(params.INFERENCE, params.USER), "reset")


@command("?", usage="?<question>", raw=True)
def ask(ctx: ShellContext, question: str) -> None:
    """Ask the loaded model (or the MoE experts, when enabled) a question; the answer streams.

    Example: ?What is the capital of France?
    Ctrl-C stops the answer and keeps the shell."""
    if not question:
        raise UsageError("usage: ?<question>   (for example: ?What is the capital of France?)")
    ctx.stream("ask", question=question)


@command("ai list", usage="ai list [--paths]")
def ai_list(ctx: ShellContext, args: list[str]) -> None:
    """List the models in the models directory: size, parameters, quantization; * = loaded.

    FITS: `yes` when the memory estimate at the model's context fits this board's budget
    (other models may be unloaded to make room), `ctx N` when only a context of N tokens or
    fewer does (`ai load <name> --ctx N`), `no` when it does not fit at all.

    `--paths` adds each model's file (the embedded SmolLM2 lives inside its Python package) and
    the models directory."""
    paths = args == ["--paths"]
    if args and not paths:
        raise UsageError("usage: ai list [--paths]")
    data = ctx.client.call("models.list")
    models = data.get("models", [])
    ctx._names = (time.monotonic(), [m["name"] for m in models if "name" in m])
    ctx.out.line(render.model_list(models, data.get("errors") or (), paths=paths,
                                   budget_mb=data.get("budget_mb")))
    if paths:
        ctx.out.line(f"Models directory: {data.get('models_dir')}")


@command("ai load", usage="ai load <name|path> [--ctx N]",
         complete=lambda ctx: ctx.model_names())
def ai_load(ctx: ShellContext, args: list[str]) -> None:
    """Load a model by its name (see `ai list`) or a path to a .gguf file.

    Prints parameters, quantization, context size and memory. `--ctx N` sets the context size
    for this load. A model that does not fit in the memory budget is refused with the numbers;
    least recently used models are unloaded first when that makes room."""
    params: dict[str, Any] = {}
    rest = list(args)
    if "--ctx" in rest:
        i = rest.index("--ctx")
        if i + 1 >= len(rest):
            raise UsageError("usage: ai load <name|path> [--ctx N]")
        params["n_ctx"] = _int_arg("--ctx", rest[i + 1])
        del rest[i:i + 2]
    _require(rest, 1, 1, "ai load <name|path> [--ctx N]")
    target = rest[0]
    if os.sep in target or target.endswith(".gguf"):
        path = Path(target).expanduser()
        # a path that is not here may be one the daemon knows: the seed writes /models/x.gguf
        params["path"] = str(path.resolve()) if path.exists() else str(path)
    else:
        params["name"] = target
    data = ctx.client.call("models.load", **params)
    ctx.forget_models()
    ctx.out.line(render.model_loaded(data))


@command("ai unload", usage="ai unload [name]", complete=lambda ctx: ctx.model_names())
def ai_unload(ctx: ShellContext, args: list[str]) -> None:
    """Unload a model (by default every loaded model) and free its memory."""
    _require(args, 0, 1, "ai unload [name]")
    data = ctx.client.call("models.unload", **({"name": args[0]} if args else {}))
    ctx.forget_models()
    ctx.out.line(render.model_unloaded(data))


@command("ai info")
def ai_info(ctx: ShellContext, args: list[str]) -> None:
    """Show the current model, its parameters and quantization, memory used / budget and the
    last generation speed."""
    _require(args, 0, 0, "ai info")
    ctx.out.line(render.info(ctx.client.call("info")))


@command("ai config", usage="ai config [<key> <value> | reset]", complete=CONFIG_KEYS)
def ai_config(ctx: ShellContext, args: list[str]) -> None:
    """Show the inference settings, or change one; changes are saved and survive a restart.

    Keys: context_size, max_tokens, temperature, top_p, top_k, threads (generation; 0 = the
    board's default), threads_batch (prompt processing), repeat_penalty, parallel (generations
    a model serves at once, batched; 0 = the board's default), batch_mode (continuous | off),
    adapter_contexts (LoRA adapter sets a model keeps applied at once, a context each).
    Example: ai config temperature 0.2. `ai config reset` moves a damaged settings file aside
    (it is kept as settings.toml.damaged-<time>) and starts from the defaults."""
    if args == ["reset"]:
        data = ctx.client.call("config.reset")
        ctx.out.line(f"Settings reset; the old file is kept as {data['kept_as']}"
                     if data["reset"] else "No settings file: nothing to reset.")
        return
    if not args:
        data = ctx.client.call("config.get")
        ctx.out.line(render.config(data.get("settings", data), data.get("overrides"),
                                   data.get("model")))
        return
    _require(args, 2, 2, "ai config [<key> <value> | reset]")
    key, value = args
    # The daemon checks key, type and range (one rule for every client) and converts "0.2".
    ctx.out.line(render.config_set(ctx.client.call("config.set", key=key, value=value)))


@command("ai stats")
def ai_stats(ctx: ShellContext, args: list[str]) -> None:
    """Show the daemon's counters: requests, tokens, speeds, memory, uptime."""
    _require(args, 0, 0, "ai stats")
    ctx.out.line(render.stats(ctx.client.call("stats")))


@command("ai benchmark", usage="ai benchmark [name] [-p N] [-n N]",
         complete=lambda ctx: ctx.model_names())
def ai_benchmark(ctx: ShellContext, args: list[str]) -> None:
    """Measure prompt processing (pp) and generation (tg) speed in tokens/s, llama-bench style.

    -p N: prompt tokens (default 128), -n N: generated tokens (default 32). Runs on the
    current model unless a name is given."""
    params: dict[str, Any] = {"pp": 128, "tg": 32}
    rest = list(args)
    for flag, key in (("-p", "pp"), ("-n", "tg")):
        if flag in rest:
            i = rest.index(flag)
            if i + 1 >= len(rest):
                raise UsageError("usage: ai benchmark [name] [-p N] [-n N]")
            params[key] = _int_arg(flag, rest[i + 1])
            del rest[i:i + 2]
    _require(rest, 0, 1, "ai benchmark [name] [-p N] [-n N]")
    if rest:
        params["name"] = rest[0]
    data = dict(ctx.client.call("benchmark", **params))
    if data.get("size_mb") is None:  # the file size column, as llama-bench prints it
        models = ctx.client.call("models.list").get("models", [])
        data["size_mb"] = next((m.get("size_mb") for m in models
                                if m.get("name") == data.get("model")), None)
    ctx.out.line(render.benchmark(data))


@command("help", usage="help [command]", complete=lambda ctx: sorted(COMMANDS))
def show_help(ctx: ShellContext, args: list[str]) -> None:
    """List the commands, or show one command's help."""
    if not args:
        ctx.out.line(render.help_list(COMMANDS.values()))
        return
    name = " ".join(args).lstrip()
    if name.startswith("?"):
        name = "?"
    if name in COMMANDS:
        ctx.out.line(render.help_one(COMMANDS[name]))
        return
    group = [c for n, c in COMMANDS.items() if n.startswith(name + " ")]
    if group:
        ctx.out.line(render.help_list(group))
        return
    raise UsageError(unknown_message(name.split()))


@command("history")
def show_history(ctx: ShellContext, args: list[str]) -> None:
    """Show the commands typed in earlier sessions (kept in the state directory)."""
    _require(args, 0, 0, "history")
    ctx.out.line(render.history(ctx.history()))


@command("exit")
def exit_shell(ctx: ShellContext, args: list[str]) -> None:
    """Leave the shell (Ctrl-D does the same)."""
    raise ExitShell()


@command("quit")
def quit_shell(ctx: ShellContext, args: list[str]) -> None:
    """Leave the shell (same as `exit`)."""
    raise ExitShell()


def _int_arg(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} expects a whole number, got '{text}'") from None
    if value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}")
    return value


def read_history_file(path: Path | None = None) -> list[str]:
    """The entries of the prompt-toolkit history file, oldest first."""
    from prompt_toolkit.history import FileHistory

    path = path or paths.history_file()
    if not path.exists():
        return []
    return list(reversed(list(FileHistory(str(path)).load_history_strings())))
