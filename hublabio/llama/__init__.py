"""hublabio.llama — the only owner of llama.cpp's C API in this project.

The device engine (hublabio.engine), every hublab-tools verb that runs llama.cpp (eval,
imatrix, quantize), the tests and the benchmarks go through this package:

- abi:      the pinned binding, every struct field and function checked at import
- cpu:      the CPU policy (repack "auto" | true | false; AMX never used under "auto")
- backend:  one locked backend init, the policy applied before each load, libggml prototypes
- log:      one log policy (quiet; recent errors; weight buffer types per load)
- handles:  Model, LoraAdapter, Context, Batch, SamplerChain — one class per C handle
- quantize: llama_model_quantize with an importance matrix and metadata overrides
"""

from hublabio.errors import LlamaError
from hublabio.llama import abi  # noqa: F401 - checks the binding on import
from hublabio.llama.abi import LlamaABIError
from hublabio.llama.backend import extra_buffer_types
from hublabio.llama.cpu import RepackPolicy, parse_repack
from hublabio.llama.cpu import decide as repack_policy
from hublabio.llama.handles import (
           Batch,
           Context,
           LoraAdapter,
           Model,
           SamplerChain,
           owned,
)

__all__ = ["LlamaError", "LlamaABIError", "Model", "LoraAdapter", "Context", "Batch",
           "SamplerChain", "owned", "RepackPolicy", "repack_policy", "parse_repack",
           "extra_buffer_types"]
