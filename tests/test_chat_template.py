"""hublabio.llama.chat: a chat template renders like llama-cpp-python's, and one that never
finishes, writes without end or is cancelled stops with a TemplateError."""

from __future__ import annotations

import threading
import time

import pytest

from hublabio.errors import Cancelled, TemplateError
from hublabio.llama.chat import ChatTemplate

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}" \
          "{% endfor %}{% endfor %}done"


def test_renders_like_llama_cpp_python():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ref = Jinja2ChatFormatter(template=CHATML, eos_token="</s>", bos_token="<s>",
                              add_generation_prompt=True)(messages=MSGS).prompt
    assert ChatTemplate(CHATML, bos="<s>", eos="</s>").render(MSGS) == ref


def test_a_template_that_never_finishes_is_stopped_in_time():
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="ran for more than 0.3 s"):
        ChatTemplate(ENDLESS, bos="", eos="", time_limit_s=0.3).render(MSGS)
    assert time.monotonic() - t0 < 3


def test_a_template_that_writes_without_end_is_stopped():
    big = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="wrote more than 1000 characters"):
        ChatTemplate(big, bos="", eos="", max_chars=1000).render(MSGS)


def test_rendering_can_be_cancelled():
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled, match="cancelled"):
        ChatTemplate(ENDLESS, bos="", eos="", time_limit_s=30).render(MSGS, cancel)


def test_template_errors_are_template_errors():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}", bos="", eos="")
    with pytest.raises(TemplateError, match="refused the messages: no system"):
        ChatTemplate("{{ raise_exception('no system') }}", bos="", eos="").render(MSGS)
