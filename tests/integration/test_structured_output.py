"""Structured output on the real SmolLM2: grammars from hublabio.grammar run in llama.cpp's
grammar sampler, and what the model writes parses and validates against the schema (the
`jsonschema` package checks it). Then the same through the OpenAI API with the `openai` SDK:
response_format json_schema / json_object, `parse()` with a pydantic model, and a 400 naming
what cannot be enforced."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from hublabio.engine import Engine, SamplingOptions, collect
from hublabio.grammar import json_grammar

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, api_daemon, openai_client, write_model_config

DEV = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
       "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                      "languages": {"type": "array", "maxItems": 3,
                                    "items": {"type": "string", "maxLength": 20}}}}
SCHEMAS = [
    DEV,
    {"type": "object", "required": ["answer", "confidence"],
     "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}}},
    {"type": "object", "required": ["city", "country"], "properties": {
        "city": {"type": "string", "maxLength": 40}, "country": {"const": "France"},
        "population": {"type": ["integer", "null"]}}},
    {"$defs": {"step": {"type": "object", "required": ["n", "text"], "properties": {
        "n": {"type": "integer"}, "text": {"type": "string", "maxLength": 40}}}},
     "type": "array", "minItems": 2, "maxItems": 3, "items": {"$ref": "#/$defs/step"}},
]
PROMPT = "Describe a software developer named Ana as JSON."


@pytest.fixture(scope="module")
def engine(smollm2_path, test_threads):
    e = Engine(smollm2_path, n_ctx=1024, threads=test_threads)
    yield e
    e.close()


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "const-null", "ref-array"])
def test_what_the_model_writes_under_the_grammar_validates(engine, schema):
    opts = SamplingOptions(max_tokens=200, temperature=0.0, grammar=json_grammar(schema))
    text, _, stats = collect(engine.generate([{"role": "user", "content": PROMPT}], opts))
    assert stats.finish_reason == "stop", text  # the grammar completed, then end of text
    jsonschema.validate(json.loads(text), schema)


def test_without_the_grammar_the_same_prompt_is_not_json(engine):
    """The test above can fail: the model alone answers in prose."""
    text, _, _ = collect(engine.generate([{"role": "user", "content": PROMPT}],
                                         SamplingOptions(max_tokens=60, temperature=0.0)))
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(text), DEV)


def test_a_sampled_answer_under_the_grammar_validates_too(engine):
    for seed in (1, 2, 3):
        opts = SamplingOptions(max_tokens=200, temperature=0.8, seed=seed,
                               grammar=json_grammar(DEV))
        text, _, stats = collect(engine.generate([{"role": "user", "content": PROMPT}], opts))
        assert stats.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), DEV)


# ---- through the OpenAI API ------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("models")
    write_model_config(models, smollm2_path, max_tokens=200)
    with api_daemon(models) as base_url:
        yield openai_client(base_url)


def chat(api, **kw):
    return api.chat.completions.create(model=MODEL, temperature=0,
                                       messages=[{"role": "user", "content": PROMPT}], **kw)


def test_response_format_json_schema(api):
    out = chat(api, response_format={"type": "json_schema",
                                     "json_schema": {"name": "dev", "schema": DEV, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), DEV)


def test_response_format_json_object(api):
    out = api.chat.completions.create(model=MODEL, temperature=0, max_tokens=100,
                                      response_format={"type": "json_object"},
                                      messages=[{"role": "user",
                                                 "content": 'Return {"ok": true} as JSON.'}])
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_the_sdks_parse_with_a_pydantic_model(api):
    from pydantic import BaseModel

    class Developer(BaseModel):
        name: str
        age: int
        languages: list[str]

    out = api.chat.completions.parse(model=MODEL, temperature=0, response_format=Developer,
                                     messages=[{"role": "user", "content": PROMPT}])
    dev = out.choices[0].message.parsed
    assert isinstance(dev, Developer) and isinstance(dev.age, int)


def test_a_streamed_structured_answer_is_the_same_json(api):
    fmt = {"type": "json_schema", "json_schema": {"name": "dev", "schema": DEV}}
    whole = chat(api, response_format=fmt).choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in
                   chat(api, response_format=fmt, stream=True) if c.choices)
    assert text == whole


@pytest.mark.parametrize("kwargs,fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}},
     "properties.n: the keyword 'minimum' is not supported"),
    ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "'functions' is not supported"),
    ({"extra_body": {"suffix": "x"}}, "'suffix' is not supported"),
    ({"extra_body": {"mirostat": 2}}, "Unrecognized request argument supplied: mirostat"),
    ({"extra_body": {"temprature": 0.1}}, "Unrecognized request argument supplied: temprature")])
def test_what_cannot_be_honoured_is_a_400(api, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        chat(api, **kwargs)
    assert fragment in str(err.value)


def test_a_field_that_changes_nothing_is_accepted(api):
    """`user` is the caller's own id for its records (OpenAI's too): no effect, no error."""
    plain = chat(api).choices[0].message.content
    assert chat(api, user="ana").choices[0].message.content == plain
