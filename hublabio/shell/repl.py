"""The interactive shell on a terminal: prompt-toolkit reads a line (persistent history, tab
completion), `commands.execute` evaluates it. Ctrl-C at the prompt clears the line, Ctrl-C
during an answer cancels it, Ctrl-D (or `exit`) leaves."""

from __future__ import annotations

from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory

from hublabio.shell.commands import ExitShell, ShellContext, execute, read_history_file
from hublabio.shell.completer import ShellCompleter

PROMPT = "hublab> "


def read_lines(session: PromptSession):
    """Yield each line typed at the prompt; Ctrl-C discards the line, Ctrl-D ends."""
    while True:
        try:
            line = session.prompt(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        yield line


def run(ctx: ShellContext, history_path: Path, banner: str | None = None) -> int:
    history_path.parent.mkdir(parents=True, exist_ok=True)
    ctx.history = lambda: read_history_file(history_path)
    session = PromptSession(history=FileHistory(str(history_path)),
                            completer=ShellCompleter(ctx), complete_while_typing=False)
    if banner:
        ctx.out.line(banner)
    for line in read_lines(session):
        try:
            execute(ctx, line)
        except ExitShell:
            break
    return 0
