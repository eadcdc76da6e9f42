"""Tool calling through the OpenAI API with the `openai` SDK, on SmolLM2 (whose chat template
knows no tools: the grammar-based format of hublabio.daemon.http_tools): calls come back in
OpenAI's shape with arguments valid for the tool's schema, streamed too, and a tool result
round-trips into the next answer."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, api_daemon, openai_client, write_model_config

WEATHER = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The current weather in a city."}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                           "parameters": {"type": "object", "properties": {
                                               "zone": {"type": "string", "maxLength": 40}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def api(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("models")
    write_model_config(models, smollm2_path, max_tokens=120)
    with api_daemon(models) as base_url:
        yield openai_client(base_url)


def chat(api, messages=ASK, **kw):
    return api.chat.completions.create(model=MODEL, temperature=0, messages=messages,
                                       tools=TOOLS, **kw)


def test_a_required_call_comes_back_in_openais_shape(api):
    out = chat(api, tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_named_tool_is_the_one_called(api):
    out = chat(api, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_auto_gives_a_call_or_an_answer(api):
    msg = chat(api).choices[0].message
    assert bool(msg.tool_calls) != bool(msg.content)  # exactly one of the two
    if msg.tool_calls:
        json.loads(msg.tool_calls[0].function.arguments)


def test_a_tool_result_round_trips_into_the_answer(api):
    call = chat(api, tool_choice={"type": "function",
                                  "function": {"name": "get_weather"}}).choices[0].message
    history = ASK + [call.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.tool_calls[0].id,
                      "content": '{"temperature": 21, "unit": "celsius", "sky": "sunny"}'}]
    out = chat(api, history, tool_choice="none")  # now answer from the result
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


def test_a_streamed_call(api):
    chunks = list(chat(api, tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}]},
     "the keyword 'pattern' is not supported"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "no response_format"),
    ({"tool_choice": "required"}, "tool_choice needs tools")])
def test_what_cannot_be_used_is_a_400(api, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=ASK, **kwargs)
    assert fragment in str(err.value)
