"""On-device train augmentation, and the loop's handling of online and task-incremental streams."""

from __future__ import annotations

import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.run import build

from ..conftest import registry_with


class Capture:
    def __init__(self) -> None:
        self.inputs: dict[tuple[str, int, int], torch.Tensor] = {}
        self.batches = 0

    @hookimpl
    def before_forward(self, state):
        key = (state.phase, state.experience.index, state.batch_index)
        self.inputs.setdefault(key, state.inputs.clone())
        self.batches += state.phase == "train"


def _capture(make_config, strategies, **changes):
    run = build(make_config(strategies=strategies, **changes), run_dir=None, registry=registry_with(capture=Capture))
    run.fit()
    return run, dict(run.strategies)["capture"]


def test_augment_changes_training_batches_only_and_is_reproducible(make_config):
    _, plain = _capture(make_config, ["finetune", "capture"])
    run, augmented = _capture(make_config, ["finetune", "augment", "capture"])
    _, again = _capture(make_config, ["finetune", "augment", "capture"])
    train_keys = [k for k in plain.inputs if k[0] == "train"]
    eval_keys = [k for k in plain.inputs if k[0] == "eval"]
    assert all(not torch.equal(plain.inputs[k], augmented.inputs[k]) for k in train_keys)
    assert all(torch.equal(plain.inputs[k], augmented.inputs[k]) for k in eval_keys)
    assert all(torch.equal(augmented.inputs[k], again.inputs[k]) for k in train_keys)
    assert augmented.inputs[train_keys[0]].shape == plain.inputs[train_keys[0]].shape


def test_augment_runs_before_other_strategies_batch_start(make_config):
    # ncm sums features in batch_start: listed before augment, it must still see augmented images
    run_plain = build(make_config(strategies=["ncm"]), run_dir=None)
    run_plain.fit()
    run_aug = build(make_config(strategies=["ncm", "augment"]), run_dir=None)
    run_aug.fit()
    ncm_plain, ncm_aug = run_plain.strategies[0][1], run_aug.strategies[0][1]
    assert not torch.allclose(ncm_plain.sums, ncm_aug.sums)


def test_online_stream_is_a_single_ordered_pass(make_config):
    stream = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 16}}
    run = build(make_config(strategies=["finetune", "capture"], stream=stream, train={"epochs": 3, "batch_size": 8}), run_dir=None, registry=registry_with(capture=Capture))
    run.stream.online = True
    run.fit()
    capture = dict(run.strategies)["capture"]
    assert capture.batches == 4  # 2 experiences x 16 images / 8, one epoch despite train.epochs=3


def test_task_incremental_evaluation_predicts_within_the_task(make_config):
    run = build(make_config(strategies=["finetune"]), run_dir=None)
    run.stream.scenario = "task_incremental"
    seen = []

    class Spy:
        @hookimpl
        def eval_batch_end(self, state):
            seen.append((state.eval_experience.index, state.logits.argmax(1).unique().tolist()))

    run.hooks.pm.register(Spy())
    run.fit()
    for j, predicted in seen:
        assert set(predicted) <= set(run.stream[j].classes)
