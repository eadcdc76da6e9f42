"""The ABI check of hublabio.llama: a field or function the layer relies on that the binding
lacks is an error naming it and the version, and no attribute is ever set silently."""

from __future__ import annotations

import ctypes
import types

import pytest

from hublabio.llama import abi
from hublabio.llama.abi import C as binding  # the pinned binding the layer imported
from hublabio.llama.abi import LlamaABIError, check, set_fields


def test_the_pinned_binding_passes():
    check(binding)  # what runs at import; repeated here so a failure is a test failure
    assert abi.VERSION == abi.PINNED


def test_a_renamed_field_is_named_with_the_version():
    class llama_model_params(ctypes.Structure):  # noqa: N801 - the C name
        _fields_ = [("use_mmap", ctypes.c_bool), ("use_mlock", ctypes.c_bool)]

    fake = types.SimpleNamespace(__version__="0.3.16", llama_model_params=llama_model_params)
    with pytest.raises(LlamaABIError) as err:
        check(fake, fields={"llama_model_params": ("load_mode", "use_extra_bufts")}, functions=())
    msg = str(err.value)
    assert "llama_model_params.load_mode is missing" in msg
    assert "llama_model_params.use_extra_bufts is missing" in msg
    assert "0.3.16" in msg and abi.PINNED in msg


def test_a_missing_struct_or_function_is_named():
    fake = types.SimpleNamespace(__version__="9.9")
    with pytest.raises(LlamaABIError, match="struct llama_batch is missing.*function "
                                            "llama_decode is missing"):
        check(fake, fields={"llama_batch": ("n_tokens",)}, functions=("llama_decode",))


def test_set_fields_refuses_what_ctypes_would_accept_silently():
    params = binding.llama_model_default_params()
    params.use_mmap = False  # ctypes: no error, and nothing reaches llama.cpp
    with pytest.raises(LlamaABIError, match="use_mmap"):
        set_fields(params, use_mmap=False)
    set_fields(params, load_mode=binding.LLAMA_LOAD_MODE_NONE)
    assert params.load_mode == binding.LLAMA_LOAD_MODE_NONE


def test_every_declared_field_exists_in_the_binding():
    for struct, wanted in abi.FIELDS.items():
        assert set(wanted) <= abi.struct_fields(getattr(binding, struct)), struct
