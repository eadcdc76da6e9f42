"""Write a small, real LoRA adapter GGUF for a llama-architecture base (SmolLM2), in the layout
llama.cpp's adapter loader expects (src/llama-adapter.cpp):

- KV: general.type = "adapter", general.architecture = <base's>, adapter.type = "lora",
  adapter.lora.alpha = alpha.
- For each adapted weight W (GGUF shape ne0 = n_in, ne1 = n_out) two F32 tensors
  ``<name>.lora_a`` with ne0 = n_in, ne1 = r and ``<name>.lora_b`` with ne0 = r, ne1 = n_out.
  GGUFWriter takes numpy arrays whose shape is the reverse of the GGUF order, so lora_a is a
  numpy (r, n_in) array and lora_b a numpy (n_out, r) array — the same shapes as PEFT's lora_A
  and lora_B weights.

The delta applied is scale * (alpha / r) * B @ A; values come from a seeded generator, so two
seeds give two different adapters (two "experts") over the same base; the default strength
(std_b = 0.12) changes SmolLM2's greedy answers while keeping them coherent.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def make_lora_adapter(base: str | Path, out: str | Path, *, seed: int = 0, rank: int = 8,
                      alpha: float = 16.0, targets: tuple[str, ...] = ("attn_q", "attn_v"),
                      layers: range | None = None, std_b: float = 0.12) -> Path:
    base, out = Path(base), Path(out)
    reader = gguf.GGUFReader(str(base))
    arch = reader.fields["general.architecture"].contents()
    shapes = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors
              if len(t.shape) == 2}
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    layers = range(n_layers) if layers is None else layers
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", f"test-lora-seed{seed}")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    count = 0
    for il in layers:
        for target in targets:
            name = f"blk.{il}.{target}.weight"
            if name not in shapes:
                raise ValueError(f"{base}: base has no tensor {name}")
            n_in, n_out = shapes[name]
            a = rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, std_b, size=(n_out, rank)).astype(np.float32)
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
            count += 1
    if count == 0:
        raise ValueError("no tensors selected for the adapter")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
