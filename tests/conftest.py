"""Tiny models and tiny streams shared by the tests: everything builds offline in seconds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from driftprompt.engine import hookimpl
from driftprompt.engine.config import validate
from driftprompt.engine.plugins import Registered, Registry, discover

TINY_BACKBONE: dict[str, Any] = {
    "name": "vit_small_patch16_224",
    "weights": "random",
    "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


# Options that fit the tiny backbone (width 32, 2 blocks); strategies not listed use defaults.
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "l2p": {"pool_size": 4, "prompt_length": 2, "top_k": 2},
    "dualprompt": {"e_pool_size": 4, "g_layers": [0], "e_layers": [1]},
    "coda_prompt": {"pool_size": 4, "prompt_length": 4, "layers": [0, 1]},
    "vpt": {"prompt_length": 2},
    "lora": {"rank": 2, "alpha": 2.0},
    "qprompt": {"prompt_length": 2, "capacity": 4, "prefix_length": 2, "mine_hidden": 8},
    "tpt": {"clip": {"model_config": str(Path(__file__).parent / "assets" / "tiny-clip.json"), "random_init": True}, "views": 8},
    "dynaprompt": {"clip": {"model_config": str(Path(__file__).parent / "assets" / "tiny-clip.json"), "random_init": True}, "views": 8, "buffer_size": 3},
    "tda": {"clip": {"model_config": str(Path(__file__).parent / "assets" / "tiny-clip.json"), "random_init": True}},
}


def tiny_config(**changes: Any) -> dict[str, Any]:
    """2 experiences x 2 classes, 16 training images each: 2 batches of 8 per epoch."""
    cfg: dict[str, Any] = {
        "name": "test",
        "device": "cpu",
        "backbone": copy.deepcopy(TINY_BACKBONE),
        "stream": {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 16, "seed": 0}},
        "train": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}},
        "eval": {"batch_size": 64},
        "log": {"tensorboard": False, "progress": False},
        "strategies": ["finetune"],
    }
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[key] = value
    return cfg


def registry_with(**strategies: type) -> Registry:
    """The installed plugins plus strategies defined inside a test."""
    registry = discover()
    for name, cls in strategies.items():
        registry.strategies[name] = Registered(name, cls, "tests")
    return registry


@pytest.fixture
def make_config():
    def make(**changes: Any):
        return validate(tiny_config(**changes))

    return make


class Interrupt:
    """A strategy that raises KeyboardInterrupt (a kill) when optimizer step ``at_step`` is about to run."""

    def __init__(self, at_step: int = -1) -> None:
        self.at_step = at_step

    @hookimpl
    def batch_start(self, state: Any) -> None:
        if state.step == self.at_step:
            raise KeyboardInterrupt
