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


# --- tda --------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from driftprompt.plugins.tda import TDA, Entry, SampleStats, cache_logits, cache_tensors, update_cache  # noqa: E402

TINY_CLIP = {"model_config": str(Path(__file__).parents[1] / "assets" / "tiny-clip.json"), "random_init": True}


def unit(*values: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(values), dim=0)


def test_cache_update_rules_on_scripted_features():
    f = [unit(1.0, float(i)) for i in range(6)]
    cache: dict = {}
    cache = update_cache(cache, 2, Entry(f[0], 0.9), capacity=3)
    cache = update_cache(cache, 2, Entry(f[1], 0.5), capacity=3)
    before = update_cache(cache, 2, Entry(f[2], 0.7), capacity=3)
    assert [e.entropy for e in cache[2]] == [0.5, 0.9]  # sorted, and the input is never modified
    assert [e.entropy for e in before[2]] == [0.5, 0.7, 0.9]  # sorted by entropy
    full = before
    # full: a lower-entropy entry replaces the highest-entropy one (0.9)
    after = update_cache(full, 2, Entry(f[3], 0.6), capacity=3)
    assert [e.entropy for e in after[2]] == [0.5, 0.6, 0.7]
    assert torch.equal(after[2][1].feature, f[3])
    # full: a higher-entropy entry is dropped
    same = update_cache(after, 2, Entry(f[4], 0.8), capacity=3)
    assert [e.entropy for e in same[2]] == [0.5, 0.6, 0.7]
    # another class gets its own list
    other = update_cache(same, 0, Entry(f[5], 1.2), capacity=3)
    assert sorted(other) == [0, 2] and len(other[0]) == 1


def test_negative_cache_gate_uses_the_official_normalised_entropy():
    tda = TDA(class_names=["a", "b", "c", "d"])
    C = 4
    for nats, expected in ((0.2 * math.log2(C) + 0.01, 1), (0.5 * math.log2(C) + 0.01, 0), (0.2 * math.log2(C) - 0.01, 0)):
        s = SampleStats(unit(1.0, 0.0), torch.zeros(C), nats, torch.full((C,), 0.25), 1)
        pos, neg = tda.updated({}, {}, s)
        assert len(pos[1]) == 1 and sum(len(v) for v in neg.values()) == expected


def test_logits_equal_a_hand_computation_on_constructed_caches():
    tda = TDA(class_names=["a", "b", "c"])
    k0, k1, k2 = unit(1.0, 0.0), unit(0.6, 0.8), unit(0.0, 1.0)
    pos = {0: [Entry(k0, 0.1)], 2: [Entry(k2, 0.2), Entry(k1, 0.3)]}
    neg = {1: [Entry(k1, 0.4, torch.tensor([0.02, 0.5, 0.48]))]}
    f = unit(0.8, 0.6)
    zs = torch.tensor([[1.0, 2.0, 3.0]])
    got = tda.final_logits(f.unsqueeze(0), zs, pos, neg)
    # hand: affinities f.k0 = 0.8, f.k1 = 0.96, f.k2 = 0.6
    a0, a1, a2 = 0.8, 0.48 + 0.48, 0.6
    w = lambda a, beta: math.exp(-beta * (1 - a))  # noqa: E731
    positive = [2.0 * w(a0, 5.0), 0.0, 2.0 * (w(a2, 5.0) + w(a1, 5.0))]
    # negative values: p in (0.03, 1) -> [0, 1, 1]
    negative = [0.0, 0.117 * w(a1, 1.0), 0.117 * w(a1, 1.0)]
    expected = torch.tensor([[1.0 + positive[0] - negative[0], 2.0 + positive[1] - negative[1], 3.0 + positive[2] - negative[2]]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    keys, values = cache_tensors(pos, 3)
    assert keys.shape == (3, 2) and values.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    torch.testing.assert_close(cache_logits(f.unsqueeze(0), keys, values, 1.0, 0.0), torch.tensor([[1.0, 0.0, 2.0]]))


def tda_run(make_config, **options):
    config = make_config(strategies=[{"name": "tda", "class_names": ["dog", "cat", "bird", "car"], "clip": TINY_CLIP, **options}], stream=STREAM)
    run = build(config, run_dir=None)
    return run, dict(run.strategies)["tda"]


def test_tda_on_a_stream_fills_caches_without_labels_and_predicts_with_them(make_config):
    data = images(6, seed=3)
    shuffled = TensorImageDataset(data.images, torch.tensor([3, 3, 1, 0, 2, 1]))
    run, tda = tda_run(make_config)
    result = run.adapt(iterate(data, 1), total=6)
    run2, tda2 = tda_run(make_config)
    run2.adapt(iterate(shuffled, 1), total=6)
    assert result["samples"] == 6 and tda.pos and run.state.optimizer is None
    assert sum(len(v) for v in tda.pos.values()) == sum(len(v) for v in tda2.pos.values())
    for cls in tda.pos:  # other labels, same caches: labels are never read
        for a, b in zip(tda.pos[cls], tda2.pos[cls]):
            assert torch.equal(a.feature, b.feature)
    # the last prediction: zero-shot + caches (which already hold the last sample, official order)
    clip = tda.clip
    x = clip.preprocess(data.images[-1:].float() / 255.0)
    with torch.no_grad():
        feat = torch.nn.functional.normalize(clip.encode_image(x).float(), dim=-1)
    zs = clip.logit_scale * feat @ tda.weights.T
    expected = tda.final_logits(feat, zs, tda.pos, tda.neg)
    torch.testing.assert_close(run.state.logits.float(), expected, rtol=1e-4, atol=1e-4)
    assert run.state.metrics["tda"]["positive_entries"] >= 1


def test_tda_include_current_false_predicts_with_previous_caches(make_config):
    run, tda = tda_run(make_config, include_current=False)
    seen = []

    class Probe:
        @hookimpl
        def after_forward(self, state):
            if state.phase == "predict":
                seen.append(sum(len(v) for v in tda.pos.values()))

    run.hooks.pm.register(Probe())
    run.adapt(iterate(images(2), 1), total=2)
    assert seen == [0, 1]  # the cache at each prediction holds only the earlier samples
    assert sum(len(v) for v in tda.pos.values()) == 2
