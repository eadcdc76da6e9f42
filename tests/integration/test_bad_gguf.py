"""GGUF headers that make llama.cpp abort the process (issue: a block_count of 0 or 600 killed
the whole daemon): refused by the header check with the reason, and, where a check is missing,
caught by the child-process probe. The daemon keeps serving the good model either way."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hublabio.client import Client
from hublabio.config import DaemonSettings
from hublabio.daemon.server import start_in_thread
from hublabio.errors import GGUFError
from hublabio.gguf_check import problems
from hublabio.gguf_info import read_gguf_info
from hublabio.llama.probe import Prober, probe

from .test_daemon import short_dir


def patched(src: Path, dst: Path, key: str, value, *, fmt: str = "<I", gguf_type: int = 4):
    """A copy of `src` with one scalar metadata value changed in place (uint32 by default;
    fmt "<f", gguf_type 6 for a float32)."""
    data = bytearray(src.read_bytes())
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, at)[0] == gguf_type
    struct.pack_into(fmt, data, at + 4, value)
    dst.write_bytes(data)
    return dst


def daemon_over(models: Path, threads: int, **ggufs: Path):
    """A daemon over `models` with one config per name = GGUF."""
    for name, gguf in ggufs.items():
        (models / f"{name}.toml").write_text(
            f'[model]\nname = "{name}"\npath = "{gguf}"\n\n[inference]\ncontext_size = 256\n'
            f"max_tokens = 3\ntemperature = 0.0\nthreads = {threads}\n")
    return start_in_thread(DaemonSettings(models_dir=models, idle_ttl_s=0, budget_mb=2048),
                           short_dir() / "d.sock")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> Path:
    from hublabio_tools.gguf_float import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_path)


@pytest.mark.parametrize("value,fragment", [
    (0, "llama.block_count must be an integer in [1, 512], got 0"),
    (600, "llama.block_count must be an integer in [1, 512], got 600"),
    (1, "llama.block_count is 1 but the file has tensors for block 1")])
def test_the_header_check_names_the_bad_value(tiny, tmp_path, value, fragment):
    bad = patched(tiny, tmp_path / "bad.gguf", "llama.block_count", value)
    assert fragment in "; ".join(problems(read_gguf_info(bad)))
    assert problems(read_gguf_info(tiny)) == []


@pytest.mark.parametrize("value", [0, 600])
def test_the_probe_survives_llama_cpps_abort(tiny, tmp_path, value):
    bad = patched(tiny, tmp_path / "bad.gguf", "llama.block_count", value)
    with pytest.raises(GGUFError, match=r"aborted \(SIGABRT\).*n_layer_all"):
        probe(bad)  # in a child process: this test process lives on
    prober = Prober()
    prober.check(tiny)  # a good file passes, and is remembered
    assert len(prober._good) == 1


@pytest.mark.parametrize("value", [float("nan"), -1e-5])
def test_a_bad_norm_epsilon_is_refused_and_its_abort_at_compute_caught(tiny, tmp_path, value):
    """Found by the fault suite: a NaN or negative rms epsilon loads fine and then aborts the
    process in ggml's rms_norm at the first batch (GGML_ASSERT(eps >= 0.0f))."""
    bad = patched(tiny, tmp_path / "bad.gguf", "llama.attention.layer_norm_rms_epsilon", value,
                  fmt="<f", gguf_type=6)
    assert "llama.attention.layer_norm_rms_epsilon must be" in "; ".join(
        problems(read_gguf_info(bad)))
    # and were the check missing, the probe's first batch would catch the abort in its child
    with pytest.raises(GGUFError, match=r"aborted \(SIGABRT\) while computing a first batch"
                                        r".*eps >= 0"):
        probe(bad)


def test_a_refused_shape_is_a_clear_message(tiny, tmp_path):
    bad = patched(tiny, tmp_path / "bad.gguf", "llama.attention.head_count_kv", 3)
    assert problems(read_gguf_info(bad)) == []  # not something the header check knows
    with pytest.raises(GGUFError, match="wrong shape"):
        probe(bad)


def test_the_daemon_refuses_bad_files_and_keeps_serving(tiny, tmp_path, smollm2_path,
                                                        test_threads):
    models = tmp_path / "models"
    models.mkdir()
    patched(tiny, models / "zero.gguf", "llama.block_count", 0)
    patched(tiny, models / "kv3.gguf", "llama.attention.head_count_kv", 3)
    handle = daemon_over(models, test_threads, good=smollm2_path, zero=models / "zero.gguf",
                         kv3=models / "kv3.gguf")
    try:
        with Client(handle.socket_path) as c:
            rows = {m["name"]: m for m in c.call("models.list")["models"]}
            assert "block_count" in rows["zero"]["error"] and rows["good"]["error"] is None
            for name, fragment in (("zero", "refused before loading"), ("kv3", "wrong shape")):
                with pytest.raises(GGUFError, match=fragment):
                    c.call("generate", model=name, prompt="Hi")
            assert c.call("generate", model="good", prompt="The capital of France is")["text"]
            # `ai list` now shows why kv3 was refused (it passed the header check)
            rows = {m["name"]: m for m in c.call("models.list")["models"]}
            assert "wrong shape" in rows["kv3"]["error"] and rows["good"]["error"] is None
            with pytest.raises(GGUFError, match="wrong shape"):  # at once, no second probe
                c.call("generate", model="kv3", prompt="Hi")
    finally:
        handle.stop()


def retyped(src: Path, dst: Path, key: str, value, vtype=None) -> Path:
    """A copy of `src` whose metadata `key` holds a value of another type."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", key):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    if isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type,
                          raw_shape=[int(x) for x in reversed(t.shape)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_type_confused_headers_are_named_and_ai_list_still_works(tiny, tmp_path, smollm2_path):
    from gguf import GGUFValueType

    from hublabio.daemon.service import Service
    from hublabio.pool import ModelPool

    models = tmp_path / "models"
    models.mkdir()
    retyped(tiny, models / "nested.gguf", "llama.attention.head_count_kv", [[1, 2], [3]])
    retyped(tiny, models / "text.gguf", "llama.block_count", "two", GGUFValueType.STRING)
    for name, gguf in (("good", smollm2_path), ("nested", models / "nested.gguf"),
                       ("text", models / "text.gguf")):
        (models / f"{name}.toml").write_text(f'[model]\nname = "{name}"\npath = "{gguf}"\n')
    svc = Service(DaemonSettings(models_dir=models), board="b", pool=ModelPool(2048))
    rows = {m["name"]: m for m in svc.call("models.list")["models"]}
    assert rows["good"]["error"] is None and rows["good"]["parameters"] == "135M"
    assert "head_count_kv is an array of arrays" in rows["nested"]["error"]
    assert "block_count must be an integer in [1, 512], got 'two'" in rows["text"]["error"]
    with pytest.raises(GGUFError, match="refused before loading"):
        svc.call("models.load", name="text")


def test_an_endless_chat_template_frees_the_slot(tiny, tmp_path, smollm2_path, test_threads):
    from gguf import GGUFValueType

    from hublabio.errors import TemplateError

    models = tmp_path / "models"
    models.mkdir()
    endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}"
               "{% endfor %}{% endfor %}")
    retyped(tiny, models / "endless.gguf", "tokenizer.chat_template", endless,
            GGUFValueType.STRING)
    handle = daemon_over(models, test_threads, good=smollm2_path,
                         endless=models / "endless.gguf")
    try:
        with Client(handle.socket_path) as c:
            with pytest.raises(TemplateError, match="ran for more than"):
                c.call("generate", model="endless", messages=[{"role": "user", "content": "Hi"}])
            out = c.call("generate", model="good", messages=[{"role": "user", "content": "Hi"}])
            assert out["completion_tokens"] >= 1
    finally:
        handle.stop()
