"""A training or evaluation step never waits for the device.

On CUDA the steps run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
synchronising call. On the CPU the same steps run with the tensor methods that read a value
back to the host (``item``, ``tolist``, ``bool``/``float``/``int``, ``nonzero``, ``cpu``,
``numpy``) replaced by ones that raise, so a host read added to the step fails here too.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch

from driftprompt.engine.config import validate
from driftprompt.engine.run import build

from ..conftest import TINY_OPTIONS, tiny_config

STRATEGIES = ["l2p", "dualprompt", "coda_prompt"]
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy", "bincount", "unique", "masked_select")
# operators whose output size depends on the data: on CUDA they read a value back to size it
# (bincount reads the largest index, nonzero and unique the count)
SIZED_BY_DATA = ("bincount", "unique", "nonzero", "masked_select", "repeat_interleave")


@contextlib.contextmanager
def host_reads_raise(allowed: set[int]) -> Iterator[list[str]]:
    """Make every host read of a tensor raise, except for the tensors whose ids are ``allowed``."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def guard(name: str) -> Any:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if id(self) in allowed:
                return original(self, *args, **kwargs)
            seen.append(name)
            raise AssertionError(f"host read Tensor.{name} of a {tuple(self.shape)} tensor inside a step")

        return read

    functions = {name: getattr(torch, name) for name in SIZED_BY_DATA}

    def guard_function(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append(f"torch.{name}")
            raise AssertionError(f"torch.{name} inside a step: its output size is read back from the device")

        return call

    for name in READS:
        setattr(torch.Tensor, name, guard(name))
    for name in SIZED_BY_DATA:
        setattr(torch, name, guard_function(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in functions.items():
            setattr(torch, name, original)


def prepared_run(name: str, device: str, **train: Any) -> Any:
    cfg = tiny_config(strategies=[{"name": name, **TINY_OPTIONS[name]}], device=device)
    cfg["train"].update({"grad_clip": 1.0, **train})
    return build(validate(cfg), run_dir=None)


def batches(run: Any, device: str) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    out = []
    for images, targets, extras in run.stream[0].train.batches(8):
        # sample ids stay on the host (the query cache keys by them): a list, never a device read
        out.append((images.to(device), targets.to(device), {"index": extras["index"].tolist()}))
    return out


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
def test_train_and_eval_steps_read_nothing_back_to_the_host(name: str) -> None:
    with prepared_run(name, "cpu") as run:
        loop, state = run.loop, run.state
        loop._init()
        allowed = loop.begin_experience(0)
        data = batches(run, "cpu")
        loop.train_step(*data[0], allowed)  # the first step creates the optimizer's moments
        # Adam's step counters are host tensors off CUDA (its unfused loop reads them as numbers)
        steps = {id(s["step"]) for s in state.optimizer.state.values() if "step" in s}
        with host_reads_raise(steps) as seen:
            for batch in data:
                loop.train_step(*batch, allowed)
            state.phase = "eval"
            state.eval_experience = run.stream[0]
            loop.eval_step(*data[0], allowed)
        assert seen == []
        assert state.step == 1 + len(data)


def test_the_guard_catches_a_host_read() -> None:
    x = torch.ones(2)
    with host_reads_raise(set()) as seen, pytest.raises(AssertionError, match="host read Tensor.item"):
        x.sum().item()
    assert seen == ["item"]
    assert x.sum().item() == 2.0  # restored
    with host_reads_raise(set()) as seen, pytest.raises(AssertionError, match="torch.bincount inside a step"):
        torch.bincount(torch.tensor([0, 1]))
    assert torch.bincount(torch.tensor([0, 1])).tolist() == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode only watches CUDA synchronisations")
@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_steps_run_under_sync_debug_mode_error(name: str, compile_: bool) -> None:
    with prepared_run(name, "cuda", compile=compile_, data_on_device=True) as run:
        loop, state = run.loop, run.state
        loop._init()
        allowed = loop.begin_experience(0)
        data = batches(run, "cuda")
        for _ in range(2):  # warm-up: optimizer moments, and each layout's graph (compiled on its second pass)
            for batch in data:
                loop.train_step(*batch, allowed)
            state.phase = "eval"
            state.eval_experience = run.stream[0]
            loop.eval_step(*data[0], allowed)
            state.phase, state.eval_experience = "train", None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in data:
                loop.train_step(*batch, allowed)
            state.phase = "eval"
            state.eval_experience = run.stream[0]
            loop.eval_step(*data[0], allowed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
