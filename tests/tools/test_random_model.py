"""hublab-tools random-model: a recipe's shape as a random-weight GGUF with a real tokenizer,
streamed to disk and quantized by the project's own quantizer; llama.cpp loads and runs it."""

from __future__ import annotations

import pytest

from hublabio.engine import Engine, SamplingOptions
from hublabio.gguf_info import read_gguf_info
from hublabio_tools import cli


@pytest.mark.parametrize("ftype", ["Q8_0", "F16"])
def test_a_recipe_becomes_a_gguf_llama_cpp_runs(tmp_path, smollm2_path, ftype, capsys):
    out = tmp_path / f"tiny-{ftype}.gguf"
    assert cli.main(["random-model", "hublabio-tiny", "--out", str(out), "--type", ftype]) == 0
    info = read_gguf_info(out)
    assert (info.architecture, info.layers, info.embedding_length, info.heads, info.kv_heads) \
        == ("llama", 2, 64, 4, 2)
    assert info.quantization == ftype
    assert info.vocab_size == read_gguf_info(smollm2_path).vocab_size  # SmolLM2's tokenizer
    assert info.metadata["hublab.recipe_vocab_size"] == 512
    assert not list(tmp_path.glob("*.f16.gguf")) or ftype == "F16"  # the intermediate is gone
    with Engine(out, n_ctx=128, threads=1) as e:
        assert e.model.tokenize("Hello world", add_special=False)  # a real tokenizer
        _, pieces, stats = e.complete("Hello", SamplingOptions(max_tokens=4, temperature=0))
        assert stats.completion_tokens >= 1


def test_a_shape_that_does_not_divide_is_refused(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "bad"\n[model]\nhidden_size = 100\nintermediate_size = 256\n'
                      'num_hidden_layers = 1\nnum_attention_heads = 3\n[train]\n')
    assert cli.main(["random-model", str(recipe), "--out", str(tmp_path / "x.gguf")]) == 1
    assert "hidden_size must be a multiple of num_attention_heads" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_recipe_info_is_the_header_random_model_writes(tmp_path, smollm2_path, ftype):
    """recipe_info quantizes a probe with 8 rows per matrix; the types llama.cpp picks and the
    bytes computed for the full shapes must be those of the real file."""
    from hublabio_tools.random_model import recipe_info

    out = tmp_path / "tiny.gguf"
    assert cli.main(["random-model", "hublabio-tiny", "--out", str(out), "--type", ftype]) == 0
    real = read_gguf_info(out)
    est = recipe_info("hublabio-tiny", ftype, n_vocab=real.vocab_size)
    assert sorted((t.name, t.shape, t.type_name, t.n_bytes) for t in est.tensors) \
        == sorted((t.name, t.shape, t.type_name, t.n_bytes) for t in real.tensors)
    assert est.tensor_types == real.tensor_types and est.tensor_bytes == real.tensor_bytes
    assert est.parameters == real.parameters
    assert (est.layers, est.kv_elements_per_token) == (real.layers, real.kv_elements_per_token)
    # by default the rows are the recipe's own 512-token vocabulary
    assert recipe_info("hublabio-tiny", ftype).vocab_size == 512
