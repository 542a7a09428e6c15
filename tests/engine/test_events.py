"""The loops fire exactly the documented events, in the documented order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from driftprompt.engine import Event, State, hookimpl
from driftprompt.engine.hookspecs import EVENT_HOOKS
from driftprompt.engine.run import build
from driftprompt.streams import TensorImageDataset, iterate

from ..conftest import registry_with


class Recorder:
    """Records every event hook it receives, with the phase it saw."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.phases: list[str] = []

    def _record(self, name: str, state: State) -> None:
        self.events.append(name)
        self.phases.append(state.phase)


for _name in EVENT_HOOKS:

    def _make(name: str):
        def method(self, state):  # type: ignore[no-untyped-def]
            self._record(name, state)

        method.__name__ = name
        return hookimpl(method)

    setattr(Recorder, _name, _make(_name))


def expected_continual(experiences: int, epochs: int, batches: int, eval_batches_per_exp: int) -> list[str]:
    """The continual loop's event list, written out from the documented pseudocode."""
    train_batch = [
        "batch_start", "before_forward", "after_forward", "before_loss", "after_loss", "before_backward",
        "after_backward", "before_optimizer_step", "after_optimizer_step", "batch_end",
    ]
    eval_batch = ["eval_batch_start", "before_forward", "after_forward", "eval_batch_end"]
    out = ["init", "fit_start"]
    for i in range(experiences):
        out.append("experience_start")
        for _ in range(epochs):
            out += ["epoch_start"] + train_batch * batches + ["epoch_end"]
        out.append("experience_end")
        out += ["eval_start"] + eval_batch * (eval_batches_per_exp * (i + 1)) + ["eval_end"]
    out.append("fit_end")
    return out


def test_continual_event_sequence_and_counts(make_config):
    config = make_config(strategies=["finetune", "recorder"])
    run = build(config, run_dir=None, registry=registry_with(recorder=Recorder))
    run.fit()
    recorder = dict(run.strategies)["recorder"]
    assert recorder.events == expected_continual(experiences=2, epochs=1, batches=2, eval_batches_per_exp=1)
    # the phase tells strategies which stage called a shared event
    forward_phases = {p for e, p in zip(recorder.events, recorder.phases) if e == "before_forward"}
    assert forward_phases == {"train", "eval"}
    assert recorder.events.count("before_optimizer_step") == 4


def test_without_trainable_parameters_the_optimizer_events_are_skipped(make_config):
    config = make_config(strategies=["ncm", "recorder"])
    run = build(config, run_dir=None, registry=registry_with(recorder=Recorder))
    run.fit()
    events = dict(run.strategies)["recorder"].events
    assert "before_loss" not in events and "before_optimizer_step" not in events
    assert events.count("batch_start") == 4 and events.count("after_forward") == 4 + 3


class EntropyMin:
    """Test-time entropy minimisation of the head bias (Tent's objective on a tiny model)."""

    def __init__(self) -> None:
        self.saw_labels_while_adapting = False

    @hookimpl
    def trainable_parameters(self, state: State):
        return [{"params": [state.head.bias], "name": "bias", "role": "head"}]

    @hookimpl
    def before_forward(self, state: State) -> None:
        if state.phase == "adapt" and state.targets is not None:
            self.saw_labels_while_adapting = True

    @hookimpl
    def loss_terms(self, state: State):
        logp = state.logits.float().log_softmax(dim=1)
        return {"entropy": -(logp.exp() * logp).sum(dim=1).mean()}


def _entropy(logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits.float(), dim=1)
    return float(-(logp.exp() * logp).sum(dim=1).mean())


def test_test_time_event_sequence_and_entropy_falls(make_config):
    config = make_config(strategies=["entropy_min", "recorder"], test_time={"steps": 2, "optimizer": {"name": "sgd", "lr": 1.0}})
    run = build(config, run_dir=None, registry=registry_with(recorder=Recorder, entropy_min=EntropyMin))
    torch.manual_seed(0)
    data = TensorImageDataset(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2]))
    run.state.seen_classes = [0, 1, 2, 3]
    with torch.no_grad():
        before = [_entropy(run.state.head(run.state.backbone(run.state.backbone.preprocess(data.images[i : i + 1])))) for i in range(3)]
    entropies: list[float] = []

    class Spy:
        @hookimpl
        def test_sample_end(self, state):
            entropies.append(_entropy(state.logits))

    run.hooks.pm.register(Spy())
    result = run.adapt(iterate(data, 1), total=3)
    strategies = dict(run.strategies)
    adapt = ["adapt_step_start", "before_forward", "after_forward", "before_loss", "after_loss", "before_backward",
             "after_backward", "before_optimizer_step", "after_optimizer_step", "adapt_step_end"]
    sample = ["test_sample_start"] + adapt * 2 + ["before_forward", "after_forward", "test_sample_end"]
    assert strategies["recorder"].events == ["init", "test_stream_start"] + sample * 3 + ["test_stream_end"]
    assert not strategies["entropy_min"].saw_labels_while_adapting, "labels must stay hidden during adaptation"
    # continual adaptation: entropy of each prediction is below the source model's entropy
    assert all(after < b for after, b in zip(entropies, before))
    assert result["samples"] == 3 and 0.0 <= result["online_accuracy"] <= 100.0


def test_every_event_hook_is_fired_by_some_loop(make_config):
    fired = set(expected_continual(1, 1, 1, 1))
    fired |= {"test_stream_start", "test_sample_start", "adapt_step_start", "adapt_step_end", "test_sample_end", "test_stream_end"}
    assert fired == set(EVENT_HOOKS) == {e.value for e in Event}
