"""Tab completion for the REPL: command names word by word, then each command's argument
values (model names come from the daemon through the context's cache)."""

from __future__ import annotations

from typing import Iterable

from prompt_toolkit.completion import Completer, Completion

from hublabio.errors import HublabError
from hublabio.shell.commands import COMMANDS, ShellContext


def complete_line(ctx: ShellContext, text: str) -> list[tuple[str, int]]:
    """Completions for `text` (the line up to the cursor) as (replacement, start_position)
    pairs, start_position <= 0 counted from the cursor as prompt-toolkit expects."""
    if text.lstrip().startswith("?"):
        return []
    words = text.split()
    partial = "" if (not words or text[-1].isspace()) else words[-1]
    done = words[:-1] if partial else words

    out: list[tuple[str, int]] = []
    seen = set()
    for name in sorted(COMMANDS):
        parts = name.split()
        if len(parts) > len(done) and parts[:len(done)] == done:
            word = parts[len(done)]
            if word.startswith(partial) and word not in seen:
                seen.add(word)
                out.append((word, -len(partial)))
    # Argument values: the text after the longest command name typed so far.
    for n in range(len(done), 0, -1):
        cmd = COMMANDS.get(" ".join(done[:n]))
        if cmd is None:
            continue
        arg_text = text.lstrip()
        for word in done[:n]:
            arg_text = arg_text[arg_text.index(word) + len(word):]
        arg_text = arg_text.lstrip()
        for value in _safe_candidates(cmd, ctx):
            if value.startswith(arg_text) and value != arg_text:
                out.append((value, -len(arg_text)))
        break
    return out


def _safe_candidates(cmd, ctx) -> Iterable[str]:
    try:
        return cmd.candidates(ctx)
    except (HublabError, OSError):
        return []  # completion never prints errors; the command itself will report them


class ShellCompleter(Completer):
    def __init__(self, ctx: ShellContext):
        self.ctx = ctx

    def get_completions(self, document, complete_event):
        for text, start in complete_line(self.ctx, document.text_before_cursor):
            yield Completion(text, start_position=start)
