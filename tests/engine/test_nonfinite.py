"""Non-finite losses and gradients: stop naming the step, term and strategy, or skip the step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from driftprompt.engine import State, hookimpl
from driftprompt.engine.errors import PluginError
from driftprompt.engine.loggers import read_jsonl
from driftprompt.engine.loop import cross_entropy
from driftprompt.engine.run import build
from driftprompt.plugins.finetune import Finetune
from tests.conftest import registry_with


class NaNAtSteps(Finetune):
    """A head-training strategy whose extra loss term is NaN at the given optimizer steps."""

    def __init__(self, steps: list[int] | None = None, term: str = "bad_term", value: float = float("nan")) -> None:
        super().__init__()
        self.steps = set(steps or [])
        self.term = term
        self.value = value

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor]:
        ce = cross_entropy(state)
        # Multiplying on the device keeps the test free of host syncs, like a real strategy.
        poison = torch.tensor(self.value if state.step in self.steps else 0.0, device=ce.device)
        return {self.term: ce + poison * ce}


class ReplayWithMask(Finetune):
    """Trains the head on targets of an old class while masking logits to the current classes."""

    @hookimpl
    def before_loss(self, state: State) -> None:
        if state.experience is not None and state.experience.index == 1 and state.targets is not None:
            from driftprompt.engine.loop import mask_to_current_experience

            state.targets = torch.zeros_like(state.targets)  # "replayed" samples of class 0
            mask_to_current_experience(state)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor]:
        return {"replay_ce": cross_entropy(state)}


def _run(make_config, tmp_path, strategy: str, registry, **changes):
    config = make_config(strategies=[strategy], **changes)
    return build(config, run_dir=tmp_path / "run", registry=registry)


def test_stop_names_step_term_and_strategy_and_saves_nothing(tmp_path, make_config):
    registry = registry_with(poisoned=lambda: NaNAtSteps([1]))
    with _run(make_config, tmp_path, "poisoned", registry) as run:
        with pytest.raises(PluginError) as info:
            run.fit()
    msg = str(info.value)
    assert "step 1" in msg and "'bad_term'" in msg and "'poisoned'" in msg and "train.nonfinite: skip" in msg
    assert "\n" not in msg
    # stopped before the first experience's checkpoint: no NaN state on disk
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_huge_finite_term_counts_as_non_finite(tmp_path, make_config):
    registry = registry_with(poisoned=lambda: NaNAtSteps([0], value=1e35))
    with _run(make_config, tmp_path, "poisoned", registry) as run:
        with pytest.raises(PluginError, match="step 0"):
            run.fit()


def test_a_masked_target_is_named_as_the_cause(tmp_path, make_config):
    registry = registry_with(replay=ReplayWithMask)
    with _run(make_config, tmp_path, "replay", registry) as run:
        with pytest.raises(PluginError) as info:
            run.fit()
    msg = str(info.value)
    assert "'replay_ce'" in msg and "'replay'" in msg and "masked" in msg and "mask_current" in msg
    # experience 0 finished cleanly and was checkpointed; experience 1 (step 2) is the culprit
    assert "step 2" in msg


def test_skip_counts_bad_steps_and_leaves_parameters_unchanged(tmp_path, make_config):
    holder: dict[str, Any] = {}

    class Watch(NaNAtSteps):
        @hookimpl
        def before_optimizer_step(self, state: State) -> None:
            holder[state.step] = [p.detach().clone() for p in state.head.parameters()]

        @hookimpl
        def after_optimizer_step(self, state: State) -> None:
            holder[(state.step - 1, "after")] = [p.detach().clone() for p in state.head.parameters()]

    registry = registry_with(poisoned=lambda: Watch([1, 2]))
    config = make_config(strategies=["poisoned"], train={"epochs": 1, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "nonfinite": "skip"})
    with build(config, run_dir=tmp_path / "run", registry=registry) as run:
        summary = run.fit()
    for step in (1, 2):  # skipped: parameters untouched
        assert all(torch.equal(a, b) for a, b in zip(holder[step], holder[(step, "after")]))
    for step in (0, 3):  # applied
        assert not all(torch.equal(a, b) for a, b in zip(holder[step], holder[(step, "after")]))
    head = torch.cat([p.detach().flatten() for p in run.state.head.parameters()])
    assert torch.isfinite(head).all()
    assert summary["skipped_nonfinite_steps"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_nonfinite_steps"] == 2
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 1]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in train)  # finite, not NaN


def test_no_host_sync_per_step(tmp_path, make_config, monkeypatch):
    """The flags are read once per epoch, not once per step (.item / float / tolist / bool)."""
    import sys
    from pathlib import Path

    import driftprompt.engine
    import driftprompt.plugins

    calls = {"n": 0}
    package = tuple(str(Path(m.__file__).parent) for m in (driftprompt.engine, driftprompt.plugins))

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):  # type: ignore[no-untyped-def]
            # reads made by the engine or a strategy (the optimizer's CPU step counter is not one)
            if sys._getframe(1).f_code.co_filename.startswith(package):
                calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def syncs(batches_per_epoch: int) -> int:
        registry = registry_with(poisoned=lambda: NaNAtSteps([]))
        stream = {"name": "synthetic", "options": {"num_classes": 2, "n_experiences": 1, "train_per_class": 4 * batches_per_epoch, "test_per_class": 2, "image_size": 16, "seed": 0}}
        config = make_config(strategies=["poisoned"], stream=stream)
        with build(config, run_dir=None, registry=registry) as run:
            calls["n"] = 0
            run.loop._train_experience(0)
            return calls["n"]

    # twice the batches must not add host reads: every step stays on the device
    assert syncs(4) == syncs(2)


def test_a_diverging_learning_rate_is_not_blamed_on_a_masked_target(tmp_path, make_config):
    config = make_config(train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 1e30}})
    with build(config, run_dir=tmp_path / "run") as run:
        with pytest.raises(PluginError) as info:
            run.fit()
    msg = str(info.value)
    assert "'ce'" in msg and "'finetune'" in msg and "learning rate" in msg and "masked" not in msg


def test_nan_logits_in_evaluation_stop_the_run(tmp_path, make_config):
    class NaNHeadAtEval:
        """No training; poisons the head before the evaluation (a strategy state gone bad)."""

        @hookimpl
        def experience_end(self, state: State) -> None:
            with torch.no_grad():
                next(state.head.parameters()).fill_(float("nan"))

    registry = registry_with(finetune_then_nan=NaNHeadAtEval)
    config = make_config(strategies=["finetune", "finetune_then_nan"])
    with build(config, run_dir=tmp_path / "run", registry=registry) as run:
        with pytest.raises(PluginError, match="NaN logits") as info:
            run.fit()
    assert "'finetune_then_nan'" in str(info.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_skipped_steps_are_still_counted_after_a_resume(tmp_path, make_config):
    class StopAfterFirst(NaNAtSteps):
        stopped = False

        @hookimpl
        def experience_end(self, state: State) -> None:
            if not StopAfterFirst.stopped:  # a stop after experience 0, then --resume
                StopAfterFirst.stopped = True
                state.stop = True

    from driftprompt.engine.run import resume

    registry = registry_with(poisoned=lambda: StopAfterFirst([1, 2]))
    config = make_config(strategies=["poisoned"], train={"epochs": 1, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "nonfinite": "skip"})
    with build(config, run_dir=tmp_path / "run", registry=registry) as run:
        assert run.fit()["skipped_nonfinite_steps"] == 1  # step 1 in experience 0
    with resume(tmp_path / "run", registry=registry) as run:
        summary = run.fit()
    assert summary["skipped_nonfinite_steps"] == 2  # step 2 in experience 1, plus the one before the stop


def test_a_non_finite_adaptation_step_stops_the_test_time_run(make_config):
    class NaNAdapt:
        @hookimpl
        def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
            if state.phase != "adapt":
                return None
            return [{"params": list(state.head.parameters()), "name": "head", "role": "head"}]

        @hookimpl
        def loss_terms(self, state: State) -> dict[str, torch.Tensor]:
            probs = state.logits.float().softmax(1)
            return {"entropy": -(probs * probs.log()).sum(1).mean() * torch.tensor(float("nan"))}

    config = make_config(strategies=["nan_adapt"])
    batches = [(torch.rand(1, 3, 16, 16), torch.tensor([0]), {}) for _ in range(3)]
    with build(config, run_dir=None, registry=registry_with(nan_adapt=NaNAdapt)) as run:
        with pytest.raises(PluginError, match="'entropy'.*'nan_adapt'"):
            run.adapt(batches, 3)  # 3 steps: fewer than the periodic check's interval
