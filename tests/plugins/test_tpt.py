"""TPT: the selected-view loss by hand, entropy falls after the step, exact episodic reset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.engine.run import build
from driftprompt.plugins.tpt import avg_entropy, crop_flip_views, make_views, random_resized_crop_boxes, select_confident
from driftprompt.streams import TensorImageDataset, iterate

CONFIG = str(Path(__file__).parents[1] / "assets" / "tiny-clip.json")
NAMES = ["dog", "cat", "bird", "car"]


def test_avg_entropy_is_the_entropy_of_the_mean_probability():
    logits = torch.randn(6, 5) * 3
    p = logits.softmax(-1).mean(0)
    assert float(avg_entropy(logits)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    stacked = torch.stack([logits, logits * 2], dim=1)  # V, P, C
    assert avg_entropy(stacked).shape == (2,)


def test_confidence_selection_keeps_the_lowest_entropy_views():
    logits = torch.zeros(10, 4)
    logits[3, 0] = logits[7, 1] = 9.0  # the two confident views
    kept, idx = select_confident(logits, 0.2)
    assert sorted(idx.tolist()) == [3, 7] and kept.shape == (2, 4)
    assert select_confident(logits, 0.01)[1].numel() == 1  # at least one view


def test_views_are_in_bounds_and_the_original_comes_first():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(200, 30, 40, g)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 30).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (30 * 40)
    assert area.min() >= 0.07 and area.max() <= 1.0
    clip = CLIPBackbone(model_config=CONFIG, random_init=True)
    raw = [torch.rand(3, 40, 56), torch.randint(0, 256, (3, 50, 30), dtype=torch.uint8)]  # two sizes in one batch
    views = make_views(raw, 8, g, clip)
    assert views.shape == (2, 8, 3, 32, 32)
    torch.testing.assert_close(views[:, 0], torch.cat([clip.preprocess(r.unsqueeze(0)) for r in raw]))
    # crops keep the input dtype and come out at the requested size
    crops = crop_flip_views(raw[1], 3, torch.Generator().manual_seed(1), (32, 32))
    assert crops.shape == (3, 3, 32, 32) and crops.dtype == torch.uint8


def make_run(make_config, **options):
    tiny = {"name": "tpt", "class_names": NAMES, "clip": {"model_config": CONFIG, "random_init": True}, "views": 16, **options}
    stream = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 1, "train_per_class": 2, "test_per_class": 2, "image_size": 16}}
    return build(make_config(strategies=[tiny], stream=stream), run_dir=None)


class Spy:
    def __init__(self, tpt):
        self.tpt = tpt
        self.losses, self.before, self.after, self.ctx_at_start = [], [], [], []

    def _selected_avg_entropy(self):
        t = self.tpt
        with torch.no_grad():
            logits = t.view_logits(t.text_features(grad=False), self.state)
            return float(avg_entropy(logits[0, t.selected[0]]))

    @hookimpl
    def adapt_step_start(self, state):  # after every strategy's test_sample_start
        self.state = state
        self.ctx_at_start.append(self.tpt.ctx.detach().clone())

    @hookimpl
    def after_loss(self, state):
        self.losses.append(state.loss_terms["tpt_entropy"].detach().clone())
        self.before.append(self._selected_avg_entropy())

    @hookimpl
    def adapt_step_end(self, state):
        self.after.append(self._selected_avg_entropy())


@pytest.fixture(scope="module")
def adapted(request):
    from ..conftest import tiny_config
    from driftprompt.engine.config import validate

    torch.manual_seed(0)
    run = make_run(lambda **kw: validate(tiny_config(**kw)))
    tpt = dict(run.strategies)["tpt"]
    spy = Spy(tpt)
    run.hooks.pm.register(spy)
    data = TensorImageDataset(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2]))
    result = run.adapt(iterate(data, 1), total=3)
    return run, tpt, spy, result


def test_selected_view_loss_equals_a_hand_computation(adapted):
    run, tpt, spy, _ = adapted
    clip = tpt.clip
    # hand: full 77-token prompts with the initial context, every view, entropy-ranked
    text = clip.encode_text_tokens(clip.tokenize([f"a photo of a {n}." for n in NAMES]), crop=False, normalize=True)
    feats = tpt.view_features[0]  # the last sample's views
    logits = clip.logit_scale * feats @ text.T
    probs = logits.softmax(-1)
    ent = -(probs * probs.log()).sum(-1)
    k = int(16 * 0.1)
    chosen = ent.argsort()[:k]
    mean = probs[chosen].mean(0)
    hand = -(mean * mean.log()).sum()
    assert float(spy.losses[-1]) == pytest.approx(float(hand), rel=1e-4)
    assert sorted(tpt.selected[0].tolist()) == sorted(chosen.tolist())


def test_entropy_of_the_averaged_prediction_falls_after_the_step(adapted):
    _, _, spy, result = adapted
    assert len(spy.before) == len(spy.after) == 3
    assert all(a < b for a, b in zip(spy.after, spy.before))
    assert result["samples"] == 3 and "ece" in result and result["tpt_collapse_resets"] == 0


def test_episodic_reset_restores_the_prompt_exactly(adapted):
    _, tpt, spy, _ = adapted
    init = tpt.init_ctx
    assert not torch.equal(tpt.ctx.detach(), init)  # the last sample moved it
    for ctx in spy.ctx_at_start:
        assert torch.equal(ctx, init)


def test_prediction_uses_the_tuned_prompt_on_the_original_view(adapted):
    run, tpt, _, _ = adapted
    with torch.no_grad():
        text = tpt.text_features(grad=False)
        expected = tpt.clip.logit_scale * tpt.view_features[:, 0] @ text.T
    torch.testing.assert_close(run.state.logits.float(), expected, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(run.state.metrics["tpt"]["ece"]))


def test_a_run_with_test_time_batches_predicts_as_sample_wise():
    """``test_time.batch_size: 3``: three independent samples in one step, the sample-wise predictions."""
    from ..conftest import tiny_config
    from driftprompt.engine.config import validate

    data = TensorImageDataset(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 0]))
    probs = {}
    for batch in (1, 3):
        torch.manual_seed(0)
        run = make_run(lambda **kw: validate(tiny_config(**kw)))
        tpt = dict(run.strategies)["tpt"]
        result = run.adapt(iterate(data, batch), total=-(-5 // batch))
        assert result["samples"] == 5
        probs[batch] = torch.cat(tpt.monitor.probs)
        if batch == 3:
            assert tpt.batch_ctx is None or tpt.batch_ctx.shape[0] == 2  # the last batch holds two samples
    assert probs[1].shape == (5, 4)
    torch.testing.assert_close(probs[3], probs[1], atol=1e-5, rtol=0)


def test_independent_batches_with_a_kept_optimizer_are_refused_before_any_sample(make_config):
    from driftprompt.engine import ConfigError

    run = make_run(lambda **kw: make_config(test_time={"batch_size": 2, "reset_optimizer": False}, **kw))
    data = TensorImageDataset(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="reset_optimizer"):
        run.adapt(iterate(data, 2), total=2)
    assert dict(run.strategies)["tpt"].batch_ctx is None  # refused at the stream's start: nothing adapted
