"""The few exception types a user can see. Every message names what is wrong and where."""

from __future__ import annotations


class HublabError(Exception):
    """Base of every error meant for a user (the shell prints str(err), nothing more)."""

    code = "error"


class ConfigError(HublabError):
    """A configuration file is wrong: names the file and the key."""

    code = "config"

    def __init__(self, path, key: str | None, message: str):
        self.path = str(path)
        self.key = key
        self.message = message
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


class GGUFError(HublabError):
    """A file is not a readable GGUF (truncated, corrupt, wrong magic...)."""

    code = "gguf"

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class BudgetError(HublabError):
    """A model does not fit in the memory budget, with the numbers."""

    code = "budget"

    def __init__(self, message: str, *, needed_mb: float, budget_mb: float,
                 in_use_mb: float, suggestion: str | None = None):
        self.needed_mb = needed_mb
        self.budget_mb = budget_mb
        self.in_use_mb = in_use_mb
        self.suggestion = suggestion
        super().__init__(message if not suggestion else f"{message} {suggestion}")


class ContextOverflow(HublabError):
    """A prompt does not fit the model's context window."""

    code = "context"


class ModelNotFound(HublabError):
    code = "not_found"


class BusyError(HublabError):
    """The daemon's request queue is full."""

    code = "busy"


class Cancelled(HublabError):
    code = "cancelled"


class ProtocolError(HublabError):
    code = "protocol"


class RouterError(HublabError):
    code = "router"


class PackageError(HublabError):
    code = "package"


class DaemonUnavailable(HublabError):
    code = "unavailable"


class LlamaError(HublabError):
    """llama.cpp refused or failed (load, context, decode, adapter, quantize): the one error
    type of hublabio.llama."""
    code = "engine"


class TemplateError(HublabError):
    """A model's chat template failed, ran too long, or wrote too much."""
    code = "template"
