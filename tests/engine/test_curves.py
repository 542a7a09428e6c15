"""Curves a researcher reads: TensorBoard tags, metrics.jsonl records, summary.json, the
per-experience line, and that logging them adds no host sync to the training steps."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.loggers import EXPERIENCE_TB_DIR, read_jsonl, strategy_metrics
from driftprompt.engine.run import build
from driftprompt.streams import TensorImageDataset, iterate

from ..conftest import Interrupt, registry_with


def _accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


class MyPlug:
    """Writes a scalar and a non-scalar strategy metric, and a second loss term."""

    def __init__(self) -> None:
        self.experiences = 0

    @hookimpl
    def loss_terms(self, state):
        if state.phase == "train":
            return {"myplug_reg": 0.01 * state.head.weight.pow(2).sum()}
        return None

    @hookimpl
    def experience_end(self, state):
        self.experiences += 1
        state.metrics["myplug/thing"] = 10.0 * self.experiences
        state.metrics["myplug/histogram"] = [1, 2, self.experiences]


def test_tensorboard_jsonl_and_summary_hold_the_curves(tmp_path, make_config):
    # 2 experiences x 2 epochs x 2 batches: 8 optimizer steps, a point every 2
    config = make_config(strategies=["finetune", "myplug"], log={"tensorboard": True, "progress": False, "every_steps": 2}, train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}})
    with build(config, run_dir=tmp_path / "run", registry=registry_with(myplug=MyPlug)) as run:
        summary = run.fit()
    run_dir = tmp_path / "run"

    steps = read_jsonl(run_dir, kind="step")
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    for record in steps:
        assert record["loss/total"] == pytest.approx(record["loss/ce"] + record["loss/myplug_reg"], rel=1e-5)
        assert 0.0 <= record["train/accuracy"] <= 100.0
        assert record["lr/head"] == pytest.approx(0.01)

    tb = _accumulator(run_dir / "tensorboard")
    tags = set(tb.Tags()["scalars"])
    assert {"loss/total", "loss/ce", "loss/myplug_reg", "lr/head", "train/accuracy", "myplug/thing"} <= tags
    assert "myplug/histogram" not in tags  # non-scalars: jsonl and summary only
    assert [e.step for e in tb.Scalars("loss/total")] == [2, 4, 6, 8]
    assert "accuracy_matrix" in tb.Tags()["images"]
    image = tb.Images("accuracy_matrix")[-1]
    assert image.width > 3 * 40 and image.height > 3 * 40  # 2x2 cells, ticks and axis titles

    by_experience = _accumulator(run_dir / "tensorboard" / EXPERIENCE_TB_DIR)
    curves = set(by_experience.Tags()["scalars"])
    assert {"accuracy/exp_0", "accuracy/exp_1", "accuracy/average"} <= curves
    # one curve per experience, x = the experience trained
    assert [e.step for e in by_experience.Scalars("accuracy/exp_0")] == [0, 1]
    assert [e.step for e in by_experience.Scalars("accuracy/exp_1")] == [1]
    assert [e.value for e in by_experience.Scalars("accuracy/exp_0")] == pytest.approx([row[0] for row in summary["accuracy"]])
    assert by_experience.Scalars("accuracy/exp_1")[0].value == pytest.approx(summary["accuracy"][1][1])

    # strategy metrics: jsonl (after every experience), summary.json, TensorBoard
    records = read_jsonl(run_dir, kind="strategy_metrics")
    assert [(r["experience"], r["myplug/thing"], r["myplug/histogram"]) for r in records] == [(0, 10.0, [1, 2, 1]), (1, 20.0, [1, 2, 2])]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["strategy_metrics"] == {"myplug/thing": 20.0, "myplug/histogram": [1, 2, 2]}
    assert summary["strategy_metrics"] == on_disk["strategy_metrics"]
    assert [e.value for e in tb.Scalars("myplug/thing")][-1] == 20.0


class SyncCounter:
    """Counts host reads of tensor values between consecutive training batches."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self) -> None:
        self.count = 0
        self.per_step: list[int] = []
        self._mark: int | None = None

    def patch(self, monkeypatch) -> None:
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, __original=original, **kwargs):
                self.count += 1
                return __original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    @hookimpl
    def batch_start(self, state):
        self._close()
        self._mark = self.count

    @hookimpl
    def epoch_end(self, state):
        self._close()

    def _close(self) -> None:
        if self._mark is not None:
            self.per_step.append(self.count - self._mark)
        self._mark = None


def _count_syncs(tmp_path, make_config, monkeypatch, every: int, name: str) -> list[int]:
    # one experience of 40 images in batches of 2: 20 optimizer steps
    stream = {"name": "synthetic", "options": {"num_classes": 2, "n_experiences": 1, "train_per_class": 20, "test_per_class": 2, "image_size": 16, "seed": 0}}
    config = make_config(stream=stream, log={"tensorboard": False, "progress": False, "every_steps": every}, train={"epochs": 1, "batch_size": 2, "optimizer": {"name": "adam", "lr": 0.01}})
    counter = SyncCounter()
    with build(config, run_dir=tmp_path / name) as run:
        run.hooks.pm.register(counter)
        with monkeypatch.context() as patch:
            counter.patch(patch)
            run.fit()
    assert len(counter.per_step) == 20
    return counter.per_step


def test_logging_adds_no_host_sync_between_logging_steps(tmp_path, make_config, monkeypatch):
    baseline = _count_syncs(tmp_path, make_config, monkeypatch, every=1000, name="quiet")
    logged = _count_syncs(tmp_path, make_config, monkeypatch, every=10, name="logged")
    added = [a - b for a, b in zip(logged, baseline)]
    # step k's window runs from its batch_start to the next one: the logging of step k is in it
    assert [added[k] for k in range(20) if (k + 1) % 10] == [0] * 18
    assert 1 <= added[9] <= 3 and 1 <= added[19] <= 3  # one read of the device sums per logging step
    assert [r["step"] for r in read_jsonl(tmp_path / "logged", kind="step")] == [10, 20]


def test_a_line_per_experience_is_logged(tmp_path, make_config, caplog):
    config = make_config(log={"tensorboard": False, "progress": False})
    with caplog.at_level(logging.INFO, logger="driftprompt.engine.loop"):
        with build(config, run_dir=tmp_path / "run") as run:
            summary = run.fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("experience ") and "accuracy [" in r.getMessage()]
    assert len(lines) == 2
    pattern = re.compile(r"experience (\d)/2: accuracy \[([\d. ]+)\] avg ([\d.]+) \(train [\d.]+ s, eval [\d.]+ s\)")
    for i, line in enumerate(lines):
        match = pattern.fullmatch(line)
        assert match, line
        assert int(match.group(1)) == i + 1
        shown = [float(x) for x in match.group(2).split()]
        assert shown == pytest.approx([round(v, 1) for v in summary["accuracy"][i][: i + 1]], abs=0.051)
        assert float(match.group(3)) == pytest.approx(sum(shown) / len(shown), abs=0.06)


def test_test_time_online_curve_and_collapse_resets(tmp_path, make_config):
    stream = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 1, "train_per_class": 2, "test_per_class": 2, "image_size": 16}}
    # a collapse guard that fires easily: 2 confident predictions of the same class
    config = make_config(
        strategies=[{"name": "vpt_tta", "prompt_length": 2, "episodic": False, "collapse_window": 2, "collapse_fraction": 0.9}],
        stream=stream,
        log={"tensorboard": True, "progress": False, "every_steps": 3},
        test_time={"steps": 1, "optimizer": {"name": "adamw", "lr": 0.05, "weight_decay": 0.01}},
    )
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(10) % 4)

    def batches():
        for n, (images, targets, extras) in enumerate(iterate(data, 1)):
            extras["domain"] = ["fog" if n < 5 else "snow"]
            yield images, targets, extras

    with build(config, run_dir=tmp_path / "run") as run:
        with torch.no_grad():
            run.state.head.weight.mul_(50.0)  # confident predictions
            run.state.head.bias.zero_()
            run.state.head.bias[0] = 100.0  # every prediction is class 0: the guard must fire
        result = run.adapt(batches(), 10)
    run_dir = tmp_path / "run"

    online = read_jsonl(run_dir, kind="online")
    assert [r["step"] for r in online if "online/accuracy" in r] == [3, 6, 9, 10]
    assert online[-1]["online/accuracy"] == pytest.approx(result["online_accuracy"])
    assert online[-1]["online/domain/fog"] == pytest.approx(result["per_domain"]["fog"])
    assert online[-1]["online/domain/snow"] == pytest.approx(result["per_domain"]["snow"])
    assert "online/domain/snow" not in online[0]  # no snow sample yet at sample 3

    collapses = read_jsonl(run_dir, kind="collapse")
    assert collapses, "the collapse guard never fired"
    assert [r["vpt_tta/collapse_resets"] for r in collapses] == list(range(1, len(collapses) + 1))
    assert all(r["strategy"] == "vpt_tta" for r in collapses)
    assert [r["step"] for r in collapses] == sorted({r["step"] for r in collapses})
    plugin = dict(run.strategies)["vpt_tta"]
    assert plugin.monitor.resets == len(collapses)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy_metrics"]["vpt_tta/collapse_resets"] == len(collapses)

    tb = _accumulator(run_dir / "tensorboard")
    tags = set(tb.Tags()["scalars"])
    assert {"online/accuracy", "online/domain/fog", "online/domain/snow", "vpt_tta/collapse_resets"} <= tags
    assert [e.step for e in tb.Scalars("online/accuracy")] == [3, 6, 9, 10]


def test_strategy_metrics_key_convention():
    metrics = {
        "accuracy_matrix": object(),
        "online": {"online_accuracy": 50.0},
        "tpt": {"ece": 3.0, "collapse_resets": 0},
        "tpt/collapse_resets": 2,
        "myplug/thing": 1.5,
    }
    assert strategy_metrics(metrics) == {"tpt/collapse_resets": 2, "myplug/thing": 1.5, "tpt/ece": 3.0}


def test_curves_after_a_kill_and_resume_match_an_uninterrupted_run(tmp_path, make_config):
    from driftprompt.engine.run import resume

    registry = registry_with(kill=Interrupt)

    def config(at_step):
        # 2 experiences x 2 epochs x 2 batches = 8 steps; a point every 3 steps and at each
        # experience's end, a checkpoint every 5 steps: the kill at step 7 resumes from step 5
        return make_config(strategies=["finetune", {"name": "kill", "at_step": at_step}], log={"tensorboard": True, "progress": False, "every_steps": 3}, checkpoint={"every_steps": 5}, train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}})

    with build(config(-1), run_dir=tmp_path / "full", registry=registry) as run:
        run.fit()
    with pytest.raises(KeyboardInterrupt):
        with build(config(7), run_dir=tmp_path / "cut", registry=registry) as run:
            run.fit()
    with resume(tmp_path / "cut", registry=registry) as run:
        dict(run.strategies)["kill"].at_step = -1
        run.fit()

    def curves(run_dir):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(run_dir, kind="step")]

    full, cut = curves(tmp_path / "full"), curves(tmp_path / "cut")
    assert [r["step"] for r in full] == [3, 4, 6, 8]
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    for a, b in zip(full, cut):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == (pytest.approx(a[key], rel=1e-5) if isinstance(a[key], float) else a[key]), (a["step"], key)
    tb = _accumulator(tmp_path / "cut" / "tensorboard")
    assert [e.step for e in tb.Scalars("loss/total")] == [3, 4, 6, 8]
    by_experience = _accumulator(tmp_path / "cut" / "tensorboard" / EXPERIENCE_TB_DIR)
    assert [e.step for e in by_experience.Scalars("accuracy/exp_0")] == [0, 1]


def test_experience_line_and_accuracy_curves_skip_missing_entries():
    from driftprompt.engine.loggers import accuracy_curves, format_experience_line

    nan = float("nan")
    row = [91.25, nan, 80.0, 55.0]  # experience 1 has no test image; 3 is a future one
    line = format_experience_line(2, 10, row, 12.34, 1.2)
    assert line == "experience 3/10: accuracy [91.2 - 80.0] avg 85.6 (train 12.3 s, eval 1.2 s)"
    assert accuracy_curves(row, 2) == {"accuracy/exp_0": 91.25, "accuracy/exp_2": 80.0, "accuracy/exp_3": 55.0, "accuracy/average": pytest.approx(85.625)}


def test_train_curves_leave_out_skipped_steps_and_average_over_the_interval():
    from types import SimpleNamespace

    from driftprompt.engine.loggers import TrainCurves

    curves = TrainCurves(every=3)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": "prompt", "lr": 0.5}])
    targets = torch.tensor([0, 1])
    steps = [  # (loss term, logits, bad)
        (1.0, torch.tensor([[2.0, 0.0], [0.0, 2.0]]), False),
        (float("nan"), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), True),
        (3.0, torch.tensor([[0.0, 2.0], [2.0, 0.0]]), False),
    ]
    logged = []
    for k, (term, logits, bad) in enumerate(steps, start=1):
        state = SimpleNamespace(step=k, loss=torch.tensor(term), loss_terms={"ce": torch.tensor(term)}, logits=logits, targets=targets, optimizer=opt, metrics={"x/y": 2})
        logged.append(curves.after_step(state, torch.tensor(bad), None))
    assert logged[:2] == [None, None]
    # the skipped (NaN) step is left out of the losses; accuracy counts every sample: 3 of 6
    assert logged[2] == {"loss/total": 2.0, "loss/ce": 2.0, "train/accuracy": 50.0, "lr/prompt": 0.5, "x/y": 2}
    assert curves.read(state) == {}  # a new interval starts empty
