"""Replay, DER++ and the joint upper bound."""

from __future__ import annotations

import logging

import pytest
import torch

from driftprompt.engine import ConfigError, hookimpl
from driftprompt.engine.run import build, resume
from driftprompt.plugins.replay import DER, Replay, class_balanced_slot, der_terms, reservoir_slot

from ..conftest import TINY_OPTIONS, Interrupt, registry_with

EASY = {"num_classes": 6, "n_experiences": 3, "train_per_class": 16, "test_per_class": 8, "image_size": 16, "difficulty": 0.2, "seed": 0}
TRAIN = {"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}}


def _fill(slot_fn, labels_in: list[int]) -> list[int]:
    labels: list[int] = []
    for n, label in enumerate(labels_in):
        slot = slot_fn(labels, n, label, sum(1 for x in labels_in[: n + 1] if x == label))
        if slot == len(labels):
            labels.append(label)
        elif slot >= 0:
            labels[slot] = label
    return labels


def test_class_balanced_reservoir_is_balanced_and_bounded():
    gen = torch.Generator().manual_seed(0)
    # an imbalanced stream: 300, 60 and 15 samples of classes 0, 1, 2, interleaved at random
    stream = torch.tensor([0] * 300 + [1] * 60 + [2] * 15)[torch.randperm(375, generator=torch.Generator().manual_seed(1))].tolist()
    labels = _fill(lambda labels, n, label, class_seen: class_balanced_slot(labels, label, class_seen, 30, gen), stream)
    counts = [labels.count(c) for c in range(3)]
    assert len(labels) == 30
    assert counts[2] == 10 and max(counts) - min(counts) <= 1, counts  # the rarest class is kept whole
    plain = _fill(lambda labels, n, label, class_seen: reservoir_slot(labels, n, 30, gen), stream)
    assert len(plain) == 30 and plain.count(0) > 15  # plain reservoir follows the stream's imbalance


def _config(make_config, strategies, stream=None, **changes):
    return make_config(strategies=strategies, stream={"name": "synthetic", "options": dict(stream or EASY)}, train=dict(TRAIN), **changes)


def test_a_buffer_larger_than_the_data_warns_and_takes_the_data_size(make_config, caplog):
    cfg = _config(make_config, [{"name": "replay", "buffer_size": 1000}, "finetune"], {**EASY, "num_classes": 4, "n_experiences": 2, "train_per_class": 4})
    with caplog.at_level(logging.WARNING, logger="driftprompt.plugins.replay"), build(cfg, run_dir=None) as run:
        run.fit()
        replay = dict(run.strategies)["replay"]
    assert any("larger than the stream's 16 training samples" in r.getMessage() for r in caplog.records)
    assert replay.capacity == 16 and len(replay.labels) == 16
    assert sorted(replay.index) == sorted(set(replay.index))  # every sample once


def test_lazily_read_datasets_are_looked_up_by_their_indices():
    from torch.utils.data import Dataset, Subset

    from driftprompt.engine import PluginError
    from driftprompt.plugins.replay import _item, _positions

    class Items(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((3, 2, 2), i, dtype=torch.uint8), i % 2, i

    part = Subset(Items(), [4, 1, 3])
    positions = _positions(part)
    assert positions == {4: 0, 1: 1, 3: 2}
    image, label = _item(part, positions[3], 3)
    assert label == 1 and int(image[0, 0, 0]) == 3
    with pytest.raises(PluginError, match="cannot find sample 3"):
        _item(Items(), 2, 3)  # an index that is not the item's position is refused, never misread


def test_options_are_checked():
    with pytest.raises(ConfigError, match="policy"):
        Replay(policy="fifo")
    with pytest.raises(ConfigError, match="buffer_size"):
        DER(buffer_size=0)


def _old_accuracy(summary):
    last = summary["accuracy"][-1]
    return sum(last[:-1]) / (len(last) - 1)


FORGETFUL = {"epochs": 4, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}}
THREE = {**EASY, "test_per_class": 16}
_BASELINE: dict[str, dict] = {}


def _finetune_alone(make_config):
    if "summary" not in _BASELINE:
        cfg = make_config(strategies=["finetune"], stream={"name": "synthetic", "options": THREE}, train=FORGETFUL)
        with build(cfg, run_dir=None) as run:
            _BASELINE["summary"] = run.fit()
    return _BASELINE["summary"]


# l2p reads the class token here: the tiny random backbone's prompt-mean feature barely varies
@pytest.mark.parametrize("classifier", [{"name": "finetune", "mask_current": True}, {"name": "l2p", **TINY_OPTIONS["l2p"], "head": "cls", "lr": None}])
def test_replay_with_a_train_mask_trains_finitely_and_forgets_less(classifier, make_config):
    alone = _finetune_alone(make_config)
    cfg = make_config(strategies=[{"name": "replay", "buffer_size": 48}, classifier], stream={"name": "synthetic", "options": THREE}, train=FORGETFUL)
    run = build(cfg, run_dir=None)
    seen = {}
    original = run.loop._optimize

    def spy(clip):
        original(clip)  # stops the run on a non-finite loss (train.nonfinite: stop)
        if run.state.experience.index == 2 and "mask" not in seen:
            seen["mask"] = (run.state.logits.detach(), run.state.targets.clone(), run.state.batch["replayed"])

    run.loop._optimize = spy
    with run:
        replayed = run.fit()
    logits, targets, rows = seen["mask"]
    assert rows.any() and set(targets[rows].tolist()) - set(run.stream[2].classes), "old classes are replayed"
    target_logits = logits.gather(1, targets[:, None])
    assert torch.all(target_logits > torch.finfo(logits.dtype).min), "no target meets a masked logit"
    absent = [c for c in run.state.seen_classes if c not in targets.tolist()]
    assert all(torch.all(logits[:, c] == torch.finfo(logits.dtype).min) for c in absent), "classes absent from the batch stay masked"
    assert _old_accuracy(alone) < 5.0, "finetune alone forgets the old experiences"
    assert _old_accuracy(replayed) > _old_accuracy(alone) + 15.0
    assert replayed["forgetting"] < alone["forgetting"]


def _tiny(name):
    return {"name": name, **TINY_OPTIONS.get(name, {})}


@pytest.mark.parametrize(
    "strategies",
    [
        [{"name": "replay", "buffer_size": 8}, _tiny("dualprompt"), _tiny("pgp")],
        [{"name": "der", "buffer_size": 8}, _tiny("coda_prompt"), _tiny("pgp")],
        [{"name": "der", "buffer_size": 8}, _tiny("vpt"), _tiny("nsp")],
        [{"name": "replay", "buffer_size": 8}, "augment", _tiny("qprompt")],
    ],
    ids=["replay-dualprompt-pgp", "der-coda_prompt-pgp", "der-vpt-nsp", "replay-augment-qprompt"],
)
def test_replay_composes_with_prompt_and_projection_strategies(strategies, make_config):
    run = build(make_config(strategies=strategies), run_dir=None)
    rows = []
    original = run.loop._optimize

    def spy(clip):
        rows.append((run.state.experience.index, int(run.state.batch["replayed"].sum()) if "replayed" in run.state.batch else 0))
        original(clip)

    run.loop._optimize = spy
    with run:
        summary = run.fit()
    assert all(v is not None for v in summary["accuracy"][1])
    assert any(exp == 1 and n > 0 for exp, n in rows), "experience 1 trained with replayed samples"


def test_der_terms_equal_a_hand_computation(make_config):
    gen = torch.Generator().manual_seed(0)
    a, s, b, y = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen), torch.tensor([0, 4, 2, 2])
    terms = der_terms(a, s, b, y, alpha=0.3, beta=0.7)
    assert torch.allclose(terms["der_mse"], 0.3 * ((a - s) ** 2).sum() / 15)
    hand = -torch.log_softmax(b, dim=1)[torch.arange(4), y].mean()
    assert torch.allclose(terms["der_ce"], 0.7 * hand)

    # inside a run: the MSE compares minibatch 1's unmasked logits with those stored at insertion
    run = build(_config(make_config, [{"name": "der", "buffer_size": 24, "alpha": 0.5, "beta": 2.0}, {"name": "finetune", "mask_current": True}]), run_dir=None)
    der = dict(run.strategies)["der"]
    checked = []
    original = run.loop._optimize

    def spy(clip):
        if der._picks and not checked:
            b = der._current
            slots, slots2 = der._picks
            m1 = slots.numel()
            stored = der.logits[slots].clone()
            raw = der._raw.detach().float()
            labels2 = torch.tensor([der.labels[i] for i in slots2.tolist()])
        original(clip)
        if der._picks and not checked:
            assert run.state.logits.shape[0] == b and run.state.targets.shape[0] == b, "the classifier's ce sees the current rows only"
            expect = 0.5 * ((raw[b : b + m1] - stored) ** 2).mean()
            assert torch.allclose(run.state.loss_terms["der_mse"].detach(), expect)
            assert torch.isfinite(run.state.loss_terms["der_ce"]) and run.state.loss_terms["der_ce"] > 0
            assert run.state.batch["replay_classes"].tolist() == labels2.tolist()
            checked.append(True)

    run.loop._optimize = spy
    with run:
        run.fit()
    assert checked
    # the stored logits are the unmasked outputs: finite in every column, unseen classes included
    assert torch.isfinite(der.logits[: len(der.labels)]).all() and der.logits[: len(der.labels)].abs().max() < 1e4


class StopAfter:
    """Ends the run after experience ``at`` (its checkpoint is written), like a killed run."""

    def __init__(self, at: int = 0) -> None:
        self.at = at

    @hookimpl
    def experience_end(self, state):
        if state.experience.index == self.at:
            state.stop = True


class Never:
    """The same strategy list without the stop, for the uninterrupted run."""

    def __init__(self, at: int = 0) -> None:
        del at


@pytest.mark.parametrize("name", ["replay", "der"])
def test_replay_and_der_resume_to_the_uninterrupted_result(name, tmp_path, make_config):
    stream = {**EASY, "num_classes": 6, "n_experiences": 3, "train_per_class": 8}
    strategies = [{"name": name, "buffer_size": 12}, {"name": "finetune", "mask_current": True}, "stopper"]
    cfg = _config(make_config, strategies, stream)
    with build(cfg, run_dir=tmp_path / "full", registry=registry_with(stopper=Never)) as run:
        full = run.fit()
        full_state = dict(run.strategies)[name].state_dict()
    registry = registry_with(stopper=StopAfter)
    with build(cfg, run_dir=tmp_path / "cut", registry=registry) as run:
        run.fit()
    with resume(tmp_path / "cut", registry=registry_with(stopper=Never)) as run:
        assert run.loop.start == 1
        resumed = run.fit()
        resumed_state = dict(run.strategies)[name].state_dict()
    assert resumed["accuracy"] == full["accuracy"]
    assert torch.equal(resumed_state["images"], full_state["images"]) and torch.equal(resumed_state["labels"], full_state["labels"])
    assert torch.equal(resumed_state["generator"], full_state["generator"])
    if name == "der":
        assert torch.equal(resumed_state["logits"], full_state["logits"])


def test_der_resumes_from_a_mid_experience_checkpoint_to_the_uninterrupted_result(tmp_path, make_config):
    stream = {**EASY, "num_classes": 4, "n_experiences": 2, "train_per_class": 8}
    registry = registry_with(stop=Interrupt)

    def config(at_step: int):
        strategies = [{"name": "der", "buffer_size": 12}, {"name": "finetune", "mask_current": True}, {"name": "stop", "at_step": at_step}]
        return make_config(strategies=strategies, stream={"name": "synthetic", "options": stream}, train=dict(TRAIN), checkpoint={"every_steps": 6})

    with build(config(-1), run_dir=tmp_path / "full", registry=registry) as run:
        full = run.fit()
        full_state = dict(run.strategies)["der"].state_dict()
        full_head = run.state.head.weight.detach().clone()
    # experience 1 runs steps 4..7 (2 batches x 2 epochs): the checkpoint at step 6 is inside it
    with pytest.raises(KeyboardInterrupt):
        with build(config(7), run_dir=tmp_path / "cut", registry=registry) as run:
            run.fit()
    with resume(tmp_path / "cut", registry=registry) as run:
        dict(run.strategies)["stop"].at_step = -1
        resumed = run.fit()
        state = dict(run.strategies)["der"].state_dict()
        torch.testing.assert_close(run.state.head.weight, full_head, rtol=0, atol=0)
    assert resumed["accuracy"] == full["accuracy"]
    for key in ("images", "labels", "logits", "generator"):
        assert torch.equal(state[key], full_state[key]), key


def test_the_buffer_state_loads_with_weights_only(tmp_path, make_config):
    with build(_config(make_config, [{"name": "der", "buffer_size": 8}, "finetune"], {**EASY, "num_classes": 4, "n_experiences": 2, "train_per_class": 4}), run_dir=None) as run:
        run.fit()
        state = dict(run.strategies)["der"].state_dict()
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    fresh = DER(buffer_size=8)
    fresh.load_state_dict(loaded)
    assert fresh.labels == [int(v) for v in state["labels"]] and torch.equal(fresh.logits[:8], state["logits"])


def test_joint_trains_one_experience_with_every_class(make_config):
    options = {**EASY, "num_classes": 4, "n_experiences": 2, "train_per_class": 4}
    cfg = make_config(strategies=["finetune"], stream={"name": "joint", "options": {"stream": "synthetic", "options": options}}, train=dict(TRAIN))
    with build(cfg, run_dir=None) as run:
        assert len(run.stream) == 1
        exp = run.stream[0]
        assert exp.classes == [0, 1, 2, 3] and len(exp.train) == 16 and len(exp.test) == 4 * 8
        seen = set()
        original = run.loop._optimize

        def spy(clip):
            seen.update(run.state.targets.tolist())
            original(clip)

        run.loop._optimize = spy
        summary = run.fit()
    assert seen == {0, 1, 2, 3}, "every class trains in the one experience"
    assert len(summary["accuracy"]) == 1 and len(summary["accuracy"][0]) == 1


def test_joint_refuses_to_wrap_itself(make_config):
    from driftprompt.plugins.joint import joint_stream

    with pytest.raises(ConfigError, match="cannot wrap itself"):
        joint_stream("joint")
