"""/v1/embeddings through the real daemon and llama.cpp, with the openai SDK (which asks for
base64 by default) and LangChain's OpenAIEmbeddings; and Engine.embed itself."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from hublabio.engine import Engine, SamplingOptions

from .test_daemon import _remove_short_dirs  # noqa: F401 - removes the socket folders
from .test_daemon import MODEL, api_daemon, openai_client, write_model_config

TEXTS = ["How do I read a CSV with pandas?", "Why does the borrow checker reject this?"]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, smollm2_path):
    models = tmp_path_factory.mktemp("models")
    write_model_config(models, smollm2_path, max_tokens=24)  # context_size 512
    with api_daemon(models) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url)


def test_the_openai_sdk_gets_one_unit_vector_per_input(client):
    got = client.embeddings.create(model=MODEL, input=TEXTS)  # base64 on the wire
    assert [d.index for d in got.data] == [0, 1] and got.model == MODEL
    vecs = np.array([d.embedding for d in got.data])
    assert vecs.shape == (2, 576)  # SmolLM2-135M's hidden width
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert float(vecs[0] @ vecs[1]) < 0.999  # two texts, two vectors
    assert got.usage.prompt_tokens == got.usage.total_tokens > 10
    alone = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    # each input is embedded on its own: batching them changes nothing; float = base64
    assert np.array_equal(np.array(alone.data[0].embedding, dtype=np.float32),
                          vecs[1].astype(np.float32))


def test_langchain_embeddings(base_url, client):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=MODEL, base_url=base_url, api_key="unused",
                           check_embedding_ctx_length=False)  # no tiktoken download
    docs = emb.embed_documents(TEXTS)
    query = emb.embed_query(TEXTS[0])
    assert len(docs) == 2 and len(query) == 576
    assert np.allclose(docs[0], query, atol=1e-6)


def test_an_embedding_leaves_generation_as_it_was(client):
    """The embedding pass uses and clears the KV cache: the next greedy answer is the same."""
    def answer():
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
            temperature=0, max_tokens=16).choices[0].message.content

    before = answer()
    client.embeddings.create(model=MODEL, input="something else entirely " * 5)
    assert answer() == before


@pytest.mark.parametrize("body, param, fragment", [
    ({"model": "moe", "input": "x"}, "model", "routes chat questions"),
    ({"input": "x", "dimensions": 8}, "dimensions", "not supported"),
    ({"input": []}, "input", "must be a string"),
    ({"input": ""}, "input", "is empty"),
    ({"input": [[1, 2], [10 ** 9]]}, "input", "not in this model's vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float or base64"),
])
def test_bad_embedding_requests_are_400s_naming_the_field(client, body, param, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/embeddings", body={"model": MODEL, **body}, cast_to=dict)
    err = info.value.body
    assert fragment in err["message"] and (err.get("param") in (param, None))


def test_an_input_longer_than_the_context_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="word " * 700)
    assert info.value.body["code"] == "context_length_exceeded"


def test_engine_embedding_does_not_depend_on_the_chunking(smollm2_path):
    with Engine(smollm2_path, n_ctx=256, threads=1) as e:
        tokens = e.embed_tokens("the quick brown fox jumps over the lazy dog " * 6)
        small = e.embed(tokens)
        e.EMBED_CHUNK = 256  # the whole input in one decode
        whole = e.embed(tokens)
        # batched matmul kernels round differently; the direction stays
        assert float(small @ whole) > 0.999
        text, _, _ = e.complete("Hello", SamplingOptions(temperature=0, max_tokens=4))
        assert text
