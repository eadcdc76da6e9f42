"""hublab-tools: turn data into the models a HubLab IO device runs.

Usage: hublab-tools <verb> [options]     (hublab-tools <verb> --help for each verb)

Exit status, for every verb: 0 done, 1 failed (the message names the file or option at fault),
2 usage error (unknown or malformed options), 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys

from hublabio.errors import HublabError
from hublabio_tools.common import EXIT_FAILURE, EXIT_USAGE

# verb -> (module inside hublabio_tools, one-line summary). The module is imported only when its
# verb runs; each exposes main(argv: list[str]) -> int whose argparse help is its docstring.
VERBS: dict[str, tuple[str, str]] = {
    "prepare-data": ("data", "jsonl -> chat-formatted, deduplicated train/validation dataset"),
    "train": ("train", "train a model from scratch (Llama architecture, sequence packing)"),
    "finetune": ("finetune", "LoRA / QLoRA fine-tuning of an HF checkpoint or a GGUF"),
    "merge": ("finetune", "merge a LoRA adapter into its base -> HF checkpoint"),
    "train-expert": ("experts", "fine-tune a domain expert and write its device TOML"),
    "expert-from-adapter": ("experts", "a finetune adapter (or adapter GGUF) -> device expert TOML"),
    "train-router": ("router_train", "train the ONNX router from labelled queries"),
    "convert": ("convert", "HF checkpoint -> GGUF (F32/F16/BF16/Q8_0)"),
    "convert-lora": ("convert_lora", "peft adapter -> GGUF LoRA adapter"),
    "random-model": ("random_model", "a random-weight GGUF in a recipe's shape (0.5b..7b), quantized"),
    "quantize": ("quantize", "GGUF -> any llama.cpp quantization, optionally with an imatrix"),
    "imatrix": ("imatrix", "compute an importance matrix from calibration text"),
    "eval": ("evaluate", "perplexity of a GGUF on a text file"),
    "card": ("card", "write a model card (README.md) with measured numbers"),
    "deploy": ("deploy", "lay out a models directory / SD-card package with package.toml"),
    "publish": ("deploy", "add a package folder to a package repository (index.json + files)"),
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = [__doc__.strip(), "", "Verbs:"]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"hublab-tools: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(f"hublabio_tools.{VERBS[verb][0]}")
    entry = getattr(module, "main_" + verb.replace("-", "_"), None) or module.main
    try:
        return int(entry(rest) or 0)
    except HublabError as err:  # every verb's errors derive from it (common.ToolError)
        print(f"hublab-tools {verb}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
