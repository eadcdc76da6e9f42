"""A GGUF's own chat template (tokenizer.chat_template, Jinja2), rendered the way
llama-cpp-python and transformers render it (sandboxed environment, tojson, loop controls,
add_generation_prompt), with limits: a template comes with the model file, and one that never
finishes must not hold the only generation slot. Rendering stops with a TemplateError after
`time_limit_s`, past `max_chars` of output, or with Cancelled as soon as `cancel` is set (the check runs on
the rendering thread's line events and on every output chunk). Models without a template get a
plain `role: content` transcript."""

from __future__ import annotations

import sys
import threading
import time

from hublabio.errors import Cancelled, TemplateError

TIME_LIMIT_S = 2.0
MAX_CHARS = 1 << 20


class ChatTemplate:
    def __init__(self, template: str | None, *, bos: str, eos: str,
                 time_limit_s: float = TIME_LIMIT_S, max_chars: int = MAX_CHARS):
        self.template = template
        self.time_limit_s, self.max_chars = time_limit_s, max_chars
        self._formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            try:
                self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos,
                                                      bos_token=bos, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - jinja2 syntax errors and the like
                raise TemplateError(f"the model's chat template does not compile: {exc}") from None

    def render(self, messages: list[dict], cancel: threading.Event | None = None) -> str:
        """The prompt text for `messages`, ready for the assistant's turn."""
        if self._formatter is None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        f = self._formatter

        def raise_exception(message: str):
            raise TemplateError(f"the model's chat template refused the messages: {message}")

        deadline = time.monotonic() + self.time_limit_s

        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled while rendering the chat template")
            if time.monotonic() > deadline:
                raise TemplateError(f"the model's chat template ran for more than "
                                    f"{self.time_limit_s:g} s")

        events = 0

        def tracer(frame, event, arg):
            nonlocal events
            events += 1
            if events % 256 == 0:
                check()
            return tracer

        parts, size = [], 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in f._environment.generate(
                    messages=messages, eos_token=f.eos_token, bos_token=f.bos_token,
                    raise_exception=raise_exception, add_generation_prompt=True,
                    strftime_now=f.strftime_now, functions=None, function_call=None,
                    tools=None, tool_choice=None):
                size += len(chunk)
                if size > self.max_chars:
                    raise TemplateError(f"the model's chat template wrote more than "
                                        f"{self.max_chars} characters")
                parts.append(chunk)
                check()
        except (TemplateError, Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a template can raise
            raise TemplateError(f"the model's chat template failed: {exc}") from None
        finally:
            sys.settrace(previous)
        return "".join(parts)
