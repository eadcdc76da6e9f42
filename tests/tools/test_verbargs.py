"""Verb options declared once (hublabio_tools.verbargs): the precedence flag > recipe > the
verb's defaults > the field's, one declaration per option for train, finetune and train-expert,
and a recipe key that is no option refused by name."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from hublabio_tools.common import ToolError, load_recipe
from hublabio_tools.experts import build_parser as expert_parser
from hublabio_tools.finetune import FINETUNE_LOOP, build_parser as finetune_parser
from hublabio_tools.loop import LoopConfig
from hublabio_tools.train import TRAIN_LOOP, TRAIN_ONLY, build_parser as train_parser
from hublabio_tools.verbargs import option_names, resolve


def train_loop(argv, recipe):
    args = train_parser().parse_args(["--data", "d", "--out", "o", *argv])
    return resolve(LoopConfig, args, recipe=recipe, defaults=TRAIN_LOOP, skip=TRAIN_ONLY)


def test_flag_beats_recipe_beats_verb_default_beats_field_default():
    recipe = {"lr": 1e-3, "weight_decay": 0.05, "seq_len": 64}
    loop = train_loop(["--lr", "5e-4"], recipe)
    assert loop["lr"] == 5e-4                     # the flag
    assert loop["weight_decay"] == 0.05           # the recipe
    assert loop["micro_batch"] == 8               # train's own default (TRAIN_LOOP)
    assert loop["grad_accum"] == 1                # LoopConfig's field default
    assert train_loop([], {})["weight_decay"] == 0.1  # one default per verb, not four
    ft = finetune_parser().parse_args(["--base", "b", "--data", "d", "--out", "o"])
    assert resolve(LoopConfig, ft, defaults=FINETUNE_LOOP)["weight_decay"] == 0.0
    assert (ft.lr, ft.grad_accum, ft.patience, ft.max_steps) == (2e-4, 4, 3, None)


def test_every_shipped_recipe_uses_only_declared_train_keys():
    from hublabio_tools.common import RECIPES_DIR

    for path in sorted(RECIPES_DIR.glob("*.toml")):
        recipe = load_recipe(str(path))
        train_loop([], recipe["train"])  # raises on an undeclared key


def test_an_unknown_recipe_key_is_named():
    with pytest.raises(ToolError, match=r"recipe \[train\]: unknown key 'weigth_decay'; known: "):
        train_loop([], {"weigth_decay": 0.1})


def test_each_option_is_declared_once_and_train_expert_reuses_finetunes():
    loop_flags = {"--" + n.replace("_", "-") for n in option_names(LoopConfig)}
    for parser in (train_parser(), finetune_parser(), expert_parser()):
        flags = [s for a in parser._actions for s in a.option_strings]
        assert len(flags) == len(set(flags))
        assert {"--lr", "--micro-batch", "--seed"} <= set(flags) <= set(flags) | loop_flags
    expert = expert_parser().parse_args(["python", "--out", "m"])
    finetune = finetune_parser().parse_args(["--base", "b", "--data", "d", "--out", "o"])
    shared = set(vars(expert)) & set(vars(finetune))
    assert {"lr", "epochs", "max_len", "patience", "rank", "dropout"} <= shared
    assert expert.lr == finetune.lr and expert.rank == 8 and finetune.rank == 64
    assert all(f.name in {"out", "tensorboard"} or "help" in f.metadata
               for f in fields(LoopConfig))
    assert isinstance(train_parser(), argparse.ArgumentParser)
