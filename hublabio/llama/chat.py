"""A GGUF's own chat template (tokenizer.chat_template, Jinja2), rendered the way
llama-cpp-python and transformers render it (sandboxed environment, tojson, loop controls,
add_generation_prompt). Models without a template get a plain `role: content` transcript."""

from __future__ import annotations


class ChatTemplate:
    def __init__(self, template: str | None, *, bos: str, eos: str):
        self.template = template
        self._formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos,
                                                  bos_token=bos, add_generation_prompt=True)

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ready for the assistant's turn."""
        if self._formatter is None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self._formatter(messages=messages).prompt
