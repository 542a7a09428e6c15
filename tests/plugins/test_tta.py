"""Test-time adaptation strategies: ``vpt_tta`` on a tiny ViT, ``tda`` on the tiny CLIP."""

from __future__ import annotations

import math

import pytest
import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.run import build
from driftprompt.plugins.tpt import entropy
from driftprompt.plugins.vpt_tta import VPTTTA, entropy_threshold, filtered_entropy
from driftprompt.streams import TensorImageDataset, iterate

STREAM = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 1, "train_per_class": 2, "test_per_class": 2, "image_size": 16}}


def images(n: int, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorImageDataset(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 4)


# --- vpt_tta ----------------------------------------------------------------------------------


class PromptSpy:
    """Records the prompt at each sample's first step and the entropy before and after adapting."""

    def __init__(self, plugin: VPTTTA) -> None:
        self.plugin = plugin
        self.at_start: list[torch.Tensor] = []
        self.before: list[float] = []
        self.after: list[float] = []
        self._first = True

    @hookimpl
    def test_sample_start(self, state):
        self._first = True

    @hookimpl
    def adapt_step_start(self, state):
        if self._first:
            self.at_start.append(self.plugin.prompt.detach().clone())

    @hookimpl
    def after_forward(self, state):
        if state.phase == "adapt" and self._first:
            self.before.append(float(entropy(state.logits.detach()).mean()))
            self._first = False
        elif state.phase == "predict":
            self.after.append(float(entropy(state.logits.detach()).mean()))


def vpt_run(make_config, steps: int = 3, head_scale: float = 1.0, **options):
    config = make_config(strategies=[{"name": "vpt_tta", "prompt_length": 4, **options}], stream=STREAM, test_time={"steps": steps, "optimizer": {"name": "adamw", "lr": 0.05, "weight_decay": 0.01}})
    run = build(config, run_dir=None)
    torch.manual_seed(0)
    with torch.no_grad():
        run.state.head.weight.mul_(head_scale)  # a deployed head with confident predictions
    plugin = dict(run.strategies)["vpt_tta"]
    spy = PromptSpy(plugin)
    run.hooks.pm.register(spy)
    return run, plugin, spy


def test_filter_keeps_only_samples_below_a_hand_computed_threshold():
    # C = 4: E0 = 0.4 * ln 4 = 0.5545 nats
    threshold = entropy_threshold(4)
    assert threshold == pytest.approx(0.4 * 1.3862944, rel=1e-6)
    logits = torch.tensor([[5.0, 0, 0, 0], [0.0, 0, 0, 0], [2.0, 0, 0, 0]])
    # hand: [5,0,0,0] -> p = (e^5, 1, 1, 1) / (e^5 + 3)
    p = torch.tensor([math.exp(5), 1, 1, 1]) / (math.exp(5) + 3)
    h0 = float(-(p * p.log()).sum())  # 0.1175
    q = torch.tensor([math.exp(2), 1, 1, 1]) / (math.exp(2) + 3)
    h2 = float(-(q * q.log()).sum())  # 0.9178 > E0
    assert h0 < threshold < h2 < math.log(4)
    loss, ent, keep = filtered_entropy(logits, threshold)
    assert keep.tolist() == [True, False, False]
    assert float(loss) == pytest.approx(h0, rel=1e-5)
    torch.testing.assert_close(ent, torch.tensor([h0, math.log(4), h2]), rtol=1e-5, atol=1e-6)
    weighted, _, _ = filtered_entropy(logits, threshold, reweight=True)
    assert float(weighted) == pytest.approx(h0 / math.exp(h0 - threshold), rel=1e-5)
    assert filtered_entropy(logits[1:], threshold)[0] is None


def test_entropy_of_the_prediction_falls_after_adaptation(make_config):
    run, plugin, spy = vpt_run(make_config, head_scale=20.0, margin=1.0)
    result = run.adapt(iterate(images(4), 1), total=4)
    assert result["samples"] == 4 and len(spy.before) == len(spy.after) == 4
    assert plugin.kept == plugin.scored == 12  # every step of every sample was confident enough
    assert all(a < b for a, b in zip(spy.after, spy.before)), (spy.before, spy.after)
    assert run.state.metrics["vpt_tta"]["kept_fraction"] == 1.0


def test_episodic_reset_restores_the_prompt_exactly(make_config):
    run, plugin, spy = vpt_run(make_config, head_scale=20.0, margin=1.0)
    run.adapt(iterate(images(3), 1), total=3)
    assert not torch.equal(plugin.prompt.detach(), plugin.init_prompt)  # the last sample moved it
    assert len(spy.at_start) == 3
    for start in spy.at_start:
        assert torch.equal(start, plugin.init_prompt)


def test_continual_prompt_persists_and_resets_every_n_samples(make_config):
    run, plugin, spy = vpt_run(make_config, steps=1, head_scale=20.0, margin=1.0, episodic=False, reset_every=2, collapse_window=0)
    run.adapt(iterate(images(5), 1), total=5)
    assert torch.equal(spy.at_start[0], plugin.init_prompt)
    assert not torch.equal(spy.at_start[1], plugin.init_prompt)  # carried over from sample 0
    assert torch.equal(spy.at_start[2], plugin.init_prompt)  # reset after 2 samples
    assert not torch.equal(spy.at_start[3], plugin.init_prompt)
    assert torch.equal(spy.at_start[4], plugin.init_prompt)
    assert run.state.metrics["vpt_tta"]["scheduled_resets"] == 2


def test_filtered_samples_leave_the_prompt_untouched(make_config):
    # margin so small that no prediction is confident enough: zero loss, no step, no weight decay
    run, plugin, spy = vpt_run(make_config, steps=2, margin=1e-6, episodic=False, collapse_window=0)
    result = run.adapt(iterate(images(3), 1), total=3)
    assert result["samples"] == 3 and plugin.kept == 0 and plugin.scored == 6
    assert torch.equal(plugin.prompt.detach(), plugin.init_prompt)
    assert run.state.metrics["vpt_tta"]["kept_fraction"] == 0.0


def test_prompts_apply_only_at_test_time(make_config):
    run, plugin, _ = vpt_run(make_config)
    seen = []

    class Probe:
        @hookimpl
        def after_forward(self, state):
            seen.append((state.phase, state.prompts.num_tokens))

    run.hooks.pm.register(Probe())
    run.fit()
    run.adapt(iterate(images(1), 1), total=1)
    assert {n for phase, n in seen if phase in ("train", "eval")} == {0}
    assert {n for phase, n in seen if phase in ("adapt", "predict")} == {4}
