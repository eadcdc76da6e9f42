"""MoE-R over the OpenAI-compatible API, with the official `openai` SDK against the real daemon:
`moe` and every expert are models, `model: "moe"` routes through the experts (streamed too),
the routing comes back in the answer, and a request may choose its routing and synthesis."""

from __future__ import annotations

import openai
import pytest

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, api_daemon, openai_client, write_model_config
from .test_moe import write_experts

PANDAS = "How do I read a CSV file with pandas in python?"


@pytest.fixture(scope="module")
def api(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("models")
    write_model_config(models, smollm2_path)
    write_experts(models, smollm2_path, max_tokens=6)  # five prompt-only experts, one base
    with api_daemon(models) as base_url:
        yield openai_client(base_url)


def ask(client, content=PANDAS, **kw):
    return client.chat.completions.create(
        model="moe", messages=[{"role": "user", "content": content}], **kw)


def test_moe_and_every_expert_are_models(api):
    models = {m.id: m for m in api.models.list()}
    assert {MODEL, "moe", "python-expert", "rust-expert", "system-expert", "ai-expert",
            "general-expert"} <= set(models)
    moe = models["moe"].model_extra["hublab"]
    assert moe["kind"] == "moe" and moe["routing"] == "topk 2" and moe["synthesis"] == "best"
    assert sorted(moe["experts"]) == ["ai", "general", "python", "rust", "system"]
    assert models["rust-expert"].model_extra["hublab"] == {"kind": "expert", "domain": "rust"}
    assert api.models.retrieve("python-expert").id == "python-expert"


def test_moe_routes_answers_and_shows_the_routing(api):
    out = ask(api, extra_body={"hublab": {"routing": "single"}})
    assert out.model == "moe" and out.choices[0].message.content
    routing = out.model_extra["hublab"]
    assert [s["domain"] for s in routing["selected"]] == ["python"]
    assert routing["routing"] == "single" and routing["chosen"] == ["python"]
    assert routing["experts"][0]["model"] == "python-expert"
    assert out.usage.completion_tokens == routing["experts"][0]["tokens"] > 0


def test_moe_streams_the_same_answer(api):
    whole = ask(api, extra_body={"hublab": {"routing": "single"}}).choices[0].message.content
    chunks = list(ask(api, stream=True, stream_options={"include_usage": True},
                      extra_body={"hublab": {"routing": "single"}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole  # greedy experts: the stream is the answer
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["hublab"]["selected"][0]["domain"] == "python"
    assert chunks[-1].usage.completion_tokens > 0


def test_a_request_chooses_its_routing_and_synthesis(api):
    out = ask(api, "How do I load a pandas DataFrame into a pytorch neural network in python?",
              extra_body={"hublab": {"routing": "topk 2", "synthesis": "concatenate"}})
    routing = out.model_extra["hublab"]
    assert len(routing["selected"]) == 2 and routing["synthesis"] == "concatenate"
    text = out.choices[0].message.content
    assert all(f"### {s['domain']}" in text for s in routing["selected"])
    # and the daemon's own [moe] settings are untouched
    assert api.models.retrieve("moe").model_extra["hublab"]["routing"] == "topk 2"


def test_an_expert_by_name_answers_alone(api):
    out = api.chat.completions.create(model="rust-expert",
                                      messages=[{"role": "user", "content": PANDAS}])
    routing = out.model_extra["hublab"]
    assert out.model == "rust-expert"
    assert [s["domain"] for s in routing["selected"]] == ["rust"]  # not what the router says
    assert routing["routing"] == "chosen by the request"


def test_the_conversation_reaches_the_experts(api):
    alone = ask(api, "And in rust?", extra_body={"hublab": {"routing": "single"}})
    convo = api.chat.completions.create(model="moe", extra_body={"hublab": {"routing": "single"}},
                                        messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": PANDAS},
                                                  {"role": "assistant", "content": "Use read_csv."},
                                                  {"role": "user", "content": "And in rust?"}])
    # routed on the last user turn, with the earlier turns in every expert's prompt
    assert convo.model_extra["hublab"]["selected"] == alone.model_extra["hublab"]["selected"]
    assert convo.usage.prompt_tokens > alone.usage.prompt_tokens + 15


@pytest.mark.parametrize("kwargs,fragment", [
    ({"model": "moe", "logprobs": True}, "logprobs are not available"),
    ({"model": MODEL, "extra_body": {"hublab": {"routing": "single"}}}, "apply to model 'moe'"),
    ({"model": "moe", "extra_body": {"hublab": {"routing": "sideways"}}}, "routing"),
    ({"model": "moe", "extra_body": {"hublab": {"colour": "red"}}}, "routing"),
    ({"model": "rust-expert", "extra_body": {"hublab": {"routing": "all"}}}, "one expert")])
def test_what_cannot_apply_is_a_400(api, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(messages=[{"role": "user", "content": PANDAS}], **kwargs)
    assert fragment in str(err.value)
