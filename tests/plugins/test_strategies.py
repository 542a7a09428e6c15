"""Built-in strategies: a parametrised smoke run, and each against a plain reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftprompt.engine.plugins import discover
from driftprompt.engine.run import build
from driftprompt.streams import TensorImageDataset, iterate

from ..conftest import TINY_OPTIONS

BUILTIN = sorted(name for name, entry in discover().strategies.items() if entry.source == "driftprompt")


def test_builtins_are_registered():
    assert {"finetune", "ncm"} <= set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_strategy_runs_two_batches_and_one_test_sample(name, make_config):
    run = build(make_config(strategies=[{"name": name, **TINY_OPTIONS.get(name, {})}], stream={"name": "synthetic", "options": {"num_classes": 2, "n_experiences": 1, "train_per_class": 8, "test_per_class": 4, "image_size": 16}}), run_dir=None)
    summary = run.fit()
    assert len(summary["accuracy"]) == 1 and 0.0 <= summary["accuracy"][0][0] <= 100.0
    sample = TensorImageDataset(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), torch.tensor([0]))
    result = run.adapt(iterate(sample, 1), total=1)
    assert result["samples"] == 1


def test_finetune_lowers_the_training_loss(make_config):
    losses = []

    run = build(make_config(train={"epochs": 6, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}}), run_dir=None)
    original = run.loop._optimize

    def spy(clip):
        original(clip)
        losses.append(float(run.state.loss.detach()))

    run.loop._optimize = spy
    run.fit()
    first_exp = losses[: len(losses) // 2]
    assert sum(first_exp[-2:]) < sum(first_exp[:2])


def test_finetune_mask_current_masks_old_classes_during_training(make_config):
    run = build(make_config(strategies=[{"name": "finetune", "mask_current": True}]), run_dir=None)
    seen = {}

    original = run.loop._optimize

    def spy(clip):
        original(clip)  # the mask is applied in before_loss, inside this call
        if run.state.experience.index == 1:
            seen["logits"] = run.state.logits.detach()

    run.loop._optimize = spy
    run.fit()
    logits = seen["logits"]
    old = run.stream[0].classes
    assert torch.all(logits[:, old] == torch.finfo(logits.dtype).min)
    new = run.stream[1].classes
    assert torch.all(logits[:, new] > torch.finfo(logits.dtype).min)


def test_finetune_without_mask_forgets_more_than_ncm(make_config):
    stream = {"name": "synthetic", "options": {"num_classes": 6, "n_experiences": 3, "train_per_class": 16, "test_per_class": 8, "image_size": 16}}
    finetune = build(make_config(strategies=["finetune"], stream=stream, train={"epochs": 3, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}}), run_dir=None).fit()
    ncm = build(make_config(strategies=["ncm"], stream=stream), run_dir=None).fit()
    assert ncm["forgetting"] < finetune["forgetting"]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_equals_a_plain_nearest_mean_classifier(metric, make_config):
    run = build(make_config(strategies=[{"name": "ncm", "metric": metric}]), run_dir=None)
    summary = run.fit()
    backbone = run.state.backbone
    # reference: means of frozen [CLS] features over every training image, then nearest mean
    feats, labels = [], []
    for exp in run.stream:
        feats.append(backbone(backbone.preprocess(exp.train.images)))
        labels.append(exp.train.targets)
    feats, labels = torch.cat(feats), torch.cat(labels)
    means = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    for j, exp in enumerate(run.stream):
        x = backbone(backbone.preprocess(exp.test.images))
        if metric == "cosine":
            pred = (F.normalize(x, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
        else:
            pred = torch.cdist(x, means).argmin(1)
        expected = 100.0 * float((pred == exp.test.targets).float().mean())
        assert summary["accuracy"][-1][j] == pytest.approx(expected)


def test_ncm_old_prototypes_do_not_move(make_config):
    run = build(make_config(strategies=["ncm"]), run_dir=None)
    ncm = dict(run.strategies)["ncm"]
    snapshots = []

    class Snap:
        from driftprompt.engine import hookimpl

        @hookimpl
        def experience_end(self, state):
            snapshots.append(ncm.means().clone())

    run.hooks.pm.register(Snap())
    run.fit()
    old = run.stream[0].classes
    torch.testing.assert_close(snapshots[0][old], snapshots[1][old])
