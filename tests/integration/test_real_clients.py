"""Real third-party OpenAI clients against the real daemon over loopback: LangChain's
ChatOpenAI (invoke, stream, with_structured_output, bind_tools and a tool round trip) and the
`llm` CLI through an OpenAI-compatible model entry (plain, streamed, --schema). The openai SDK
has its own files: test_http_moe.py, test_structured_output.py, test_tools.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import langchain_openai
import pytest

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, api_daemon, write_model_config


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("models")
    write_model_config(models, smollm2_path, max_tokens=80)
    with api_daemon(models) as url:
        yield url


@pytest.fixture(scope="module")
def chat(base_url):
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused",
                                       temperature=0, max_retries=0, timeout=300)


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


def test_langchain_invoke_and_stream(chat):
    whole = chat.invoke("Count to three.").content
    streamed = "".join(c.content for c in chat.stream("Count to three."))
    assert whole and streamed == whole


def test_langchain_structured_output(chat):
    from pydantic import BaseModel

    class Developer(BaseModel):
        name: str
        age: int

    dev = chat.with_structured_output(Developer).invoke("Describe a developer named Ana.")
    assert isinstance(dev, Developer) and dev.name and isinstance(dev.age, int)


def test_langchain_bind_tools_and_a_tool_round_trip(chat):
    from langchain_core.messages import HumanMessage, ToolMessage

    ask = HumanMessage("What is the weather in Paris?")
    call = chat.bind_tools([get_weather]).invoke([ask])
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]
    assert isinstance(call.tool_calls[0]["args"]["city"], str)
    result = ToolMessage(get_weather(**call.tool_calls[0]["args"]),
                         tool_call_id=call.tool_calls[0]["id"])
    answer = chat.bind_tools([get_weather], tool_choice="none").invoke([ask, call, result])
    assert answer.content and not answer.tool_calls


def _llm(base_url: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    (home / "extra-openai-models.yaml").write_text(
        f'- model_id: hublab\n  model_name: {MODEL}\n  api_base: "{base_url}"\n'
        "  supports_schema: true\n")
    env = dict(os.environ, LLM_USER_PATH=str(home), OPENAI_API_KEY="unused")
    exe = Path(sys.executable).with_name("llm")
    return subprocess.run([str(exe), "-m", "hublab", "-o", "temperature", "0", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_llm_cli(base_url, tmp_path):
    streamed = _llm(base_url, tmp_path, "Say hi")
    whole = _llm(base_url, tmp_path, "--no-stream", "Say hi")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() and streamed.stdout == whole.stdout
    schema = _llm(base_url, tmp_path, "--schema", "name, age int", "Describe a developer named Ana")
    assert schema.returncode == 0, schema.stderr
    obj = json.loads(schema.stdout)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
