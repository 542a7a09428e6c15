"""VPT-Deep and LoRA: assembly against hand computations, frozen weights, the frozen query, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, hookimpl
from driftprompt.engine.run import build
from driftprompt.plugins.lora import LoRA, LoRALinear
from driftprompt.plugins.vpt import VPT, xavier_bound

from ..conftest import TINY_OPTIONS


def _run(make_config, names, epochs=4, **options):
    strategies = [{"name": n, **TINY_OPTIONS.get(n, {}), **options.get(n, {})} for n in names]
    run = build(make_config(strategies=strategies, train={"epochs": epochs, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "grad_clip": 1.0}), run_dir=None)
    losses: list[float] = []
    original = run.loop._optimize

    def spy(clip):
        original(clip)
        losses.append(float(run.state.loss.detach()))

    run.loop._optimize = spy
    return run, losses


# --- LoRA maths -------------------------------------------------------------------------


def test_lora_linear_adds_the_scaled_low_rank_update_to_its_slices():
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    wrapped = LoRALinear(base, [("q", 0, 3), ("v", 6, 9)], rank=2, alpha=4.0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(wrapped(x), base(x))  # B starts at zero
    with torch.no_grad():
        for b in wrapped.lora_b.values():
            b.normal_()
    expected = base(x).clone()
    expected[:, 0:3] += 2.0 * x @ wrapped.lora_a["q"].T @ wrapped.lora_b["q"].T
    expected[:, 6:9] += 2.0 * x @ wrapped.lora_a["v"].T @ wrapped.lora_b["v"].T
    torch.testing.assert_close(wrapped(x), expected)
    torch.testing.assert_close(wrapped(x), F.linear(x, base.weight + wrapped.delta_weight(), base.bias))
    wrapped.enabled = False
    torch.testing.assert_close(wrapped(x), base(x))


@pytest.mark.parametrize(("kwargs", "pattern"), [({"rank": 0}, "rank"), ({"parts": ["o"]}, "parts"), ({"alpha": 0}, "alpha"), ({"layers": []}, "empty")])
def test_lora_bad_options(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LoRA(**kwargs)


def test_lora_keeps_the_backbone_frozen_and_trains_only_its_adapters(make_config):
    run, losses = _run(make_config, ["lora"])
    model = run.state.backbone.model
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    summary = run.fit()
    assert run.state.backbone_trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for k, v in model.state_dict().items():
        if k in frozen:
            torch.testing.assert_close(v, frozen[k])
    first = losses[:8]  # experience 0: 4 epochs x 2 batches
    assert sum(first[-2:]) < sum(first[:2]), first
    assert len(summary["accuracy"]) == 2
    groups = {g["name"]: g for g in run.state.optimizer.param_groups}
    assert groups["lora.1.qkv.a"]["role"] == "adapter" and groups["lora.1.qkv.a"]["layer"] == 1
    assert groups["lora.1.qkv.b"]["part"] == "up"


def test_lora_query_bypasses_the_adapters(make_config):
    run, _ = _run(make_config, ["l2p", "lora"], epochs=2, l2p={"lr": None}, lora={"classifier": False})
    queries: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Observer:
        @hookimpl(trylast=True)
        def after_forward(self, state):
            if state.phase == "eval":
                queries.append((state.query.clone(), state.inputs.clone()))

    run.hooks.pm.register(Observer())
    run.fit()
    lora = dict(run.strategies)["lora"]
    assert any(float(b.detach().abs().max()) > 0 for _, m in lora.modules() for b in m.lora_b.values())
    backbone = run.state.backbone
    query, inputs = queries[-1]
    lora.set_enabled(False)
    torch.testing.assert_close(query, backbone.query(inputs))  # the pre-trained model's query
    lora.set_enabled(True)
    assert (backbone.query(inputs) - query).abs().max() > 1e-6  # the adapted model differs


def test_lora_state_dict_round_trip(make_config):
    run, _ = _run(make_config, ["lora"], epochs=1)
    run.fit()
    lora = dict(run.strategies)["lora"]
    saved = lora.state_dict()
    fresh = build(make_config(strategies=[{"name": "lora", **TINY_OPTIONS["lora"]}]), run_dir=None)
    fresh.loop._init()
    other = dict(fresh.strategies)["lora"]
    other.load_state_dict(saved)
    for (key, a), (_, b) in zip(lora.modules(), other.modules()):
        for name in a.lora_b:
            torch.testing.assert_close(a.lora_b[name], b.lora_b[name])
            torch.testing.assert_close(a.lora_a[name], b.lora_a[name])


# --- VPT ----------------------------------------------------------------------------------


def test_vpt_feeds_its_prompts_to_every_block(make_config):
    run, losses = _run(make_config, ["vpt"])
    vpt = dict(run.strategies)["vpt"]
    deep = {}

    class Observer:
        @hookimpl(trylast=True)
        def before_forward(self, state):
            deep.update(state.prompts.deep)

    run.hooks.pm.register(Observer())
    run.fit()
    assert sorted(deep) == [0, 1] and all(t.shape == (2, 32) for t in deep.values())
    groups = {g["name"]: g for g in run.state.optimizer.param_groups}
    assert [(groups[f"vpt.prompt{i}"]["role"], groups[f"vpt.prompt{i}"]["layer"]) for i in (0, 1)] == [("prompt", 0), ("prompt", 1)]
    first = losses[:8]
    assert sum(first[-2:]) < sum(first[:2]), first
    saved = vpt.state_dict()
    fresh = build(make_config(strategies=[{"name": "vpt", "prompt_length": 2}]), run_dir=None)
    fresh.loop._init()
    other = dict(fresh.strategies)["vpt"]
    other.load_state_dict(saved)
    for a, b in zip(vpt.params, other.params):
        torch.testing.assert_close(a, b)


def test_vpt_initialisation_bound_and_bad_options(make_config):
    assert xavier_bound(16, 768) == pytest.approx((6.0 / (3 * 256 + 768)) ** 0.5)
    with pytest.raises(ConfigError, match="prompt_length"):
        VPT(prompt_length=0)
    run = build(make_config(strategies=[{"name": "vpt", "layers": [0, 4]}]), run_dir=None)
    with pytest.raises(Exception, match=r"vpt layers names block\(s\) \[4\]"):
        run.fit()
