"""Batched test-time adaptation equals one-at-a-time: tpt per-sample prompts, dynaprompt's batched views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from driftprompt.engine import ConfigError, hookimpl
from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.engine.config import OptimizerConfig
from driftprompt.plugins.dynaprompt import DynaPrompt
from driftprompt.plugins.tpt import TPT

CONFIG = Path(__file__).parents[1] / "assets" / "tiny-clip.json"
NAMES = ["dog", "cat", "bird", "car", "tree"]
OPTIMIZER = OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.1)  # large enough to move the prompts visibly


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(model_config=CONFIG, random_init=True)


def mixed_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Raw images of different sizes and dtypes, as a test-time batch may hold them."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 56), (50, 30), (32, 32), (45, 61), (24, 40), (33, 33)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        if i % 2:
            out.append(torch.rand(3, h, w, generator=g))
        else:
            out.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
    return out


class Recorder:
    """Per-sample logits and adapted prompts at ``test_sample_end``, and the optimizer at each step's start."""

    name = "recorder"
    independent_samples = True  # it only observes

    def __init__(self, tpt: TPT) -> None:
        self.tpt = tpt
        self.logits: list[torch.Tensor] = []
        self.prompts: list[torch.Tensor] = []
        self.start_prompts: list[torch.Tensor] = []
        self.fresh_optimizer: list[bool] = []
        self.first_step = False

    @hookimpl
    def test_sample_start(self, state):
        self.first_step = True

    @hookimpl
    def adapt_step_start(self, state):
        if self.first_step:
            ctx = self.tpt.batch_ctx if self.tpt.batch_ctx is not None else self.tpt.ctx.unsqueeze(0)
            self.start_prompts += list(ctx.detach().clone())
            self.fresh_optimizer.append(len(state.optimizer.state) == 0)
            self.first_step = False

    @hookimpl
    def test_sample_end(self, state):
        self.logits += list(state.logits.detach().clone())
        ctx = self.tpt.batch_ctx if self.tpt.batch_ctx is not None else self.tpt.ctx.unsqueeze(0)
        self.prompts += list(ctx.detach().clone())


def tpt_adapter(clip: CLIPBackbone, batch_size: int, steps: int = 2) -> tuple[OnlineAdapter, TPT, Recorder]:
    tpt = TPT(views=8, selection=0.25, seed=3)
    rec = Recorder(tpt)
    adapter = OnlineAdapter(clip, [tpt, rec], class_names=NAMES, device="cpu", steps=steps, optimizer=OPTIMIZER, batch_size=batch_size)
    return adapter, tpt, rec


def test_tpt_batch_equals_one_at_a_time_with_mixed_sizes_and_reset_between_batches(clip):
    images = mixed_images(6)  # two batches of 3, every raw size different
    one, tpt1, rec1 = tpt_adapter(clip, batch_size=1)
    many, tptB, recB = tpt_adapter(clip, batch_size=3)
    calls = []
    original = clip.encode_image
    clip.encode_image = lambda x, *a, **k: (calls.append(x.shape[0]), original(x, *a, **k))[1]  # type: ignore[method-assign]
    try:
        out1 = one.predict(images)
        n_single = len(calls)
        calls.clear()
        outB = many.predict(images)
    finally:
        del clip.encode_image
    assert all(p.ok for p in out1) and all(p.ok for p in outB)
    assert many.batches_samples() and not one.batches_samples()
    # batched: one image pass of 3 samples x 8 views per batch; one at a time: one pass per sample
    assert calls == [24, 24] and n_single == 6
    assert len(rec1.logits) == len(recB.logits) == 6
    torch.testing.assert_close(torch.stack(recB.logits), torch.stack(rec1.logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(recB.prompts), torch.stack(rec1.prompts), atol=1e-5, rtol=0)
    for a, b in zip(outB, out1):
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=0)
    # the comparison means something: the prompts moved, each sample its own way
    init = tptB.init_ctx
    moved = torch.stack([(p - init).abs().max() for p in recB.prompts])
    assert bool((moved > 1e-3).all())
    assert float((recB.prompts[0] - recB.prompts[1]).abs().max()) > 1e-4
    # every sample of both batches starts from the initial prompt with a fresh optimizer
    assert len(recB.start_prompts) == 6 and all(torch.equal(p, init) for p in recB.start_prompts)
    assert recB.fresh_optimizer == [True, True]
    assert torch.equal(tptB.ctx.detach(), init)  # the shared context never moves in per-sample mode


def test_tpt_batch_through_the_loop_with_different_raw_sizes(clip):
    """A test-time batch (``test_time.batch_size: 3``) of raw images of three sizes, through TestTimeLoop."""
    raw = mixed_images(3, seed=5)
    squares = torch.cat([clip.preprocess(r.unsqueeze(0)) * clip.std + clip.mean for r in raw]).clamp(0, 1)
    one, _, rec1 = tpt_adapter(clip, batch_size=1, steps=1)
    many, tptB, recB = tpt_adapter(clip, batch_size=1, steps=1)
    for i, r in enumerate(raw):
        one.loop.run([(squares[i : i + 1], torch.tensor([i]), {"raw": [r]})], total=1)
    result = many.loop.run([(squares, torch.tensor([0, 1, 2]), {"raw": raw})], total=1)
    assert result["samples"] == 3 and tptB.batch_ctx is not None and tptB.batch_ctx.shape[0] == 3
    torch.testing.assert_close(torch.stack(recB.logits), torch.stack(rec1.logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(recB.prompts), torch.stack(rec1.prompts), atol=1e-5, rtol=0)


def test_tpt_shared_prompt_without_per_sample_and_refusal_with_a_kept_optimizer(clip):
    raw = mixed_images(2)
    squares = torch.cat([clip.preprocess(r.unsqueeze(0)) * clip.std + clip.mean for r in raw]).clamp(0, 1)
    shared = TPT(views=8, per_sample=False)
    adapter = OnlineAdapter(clip, [shared], class_names=NAMES, device="cpu", batch_size=4)
    assert not adapter.batches_samples()  # a shared prompt ties the samples together: one at a time
    adapter.loop.run([(squares, None, {"raw": raw})], total=1)
    assert shared.batch_ctx is None and not torch.equal(shared.ctx.detach(), shared.init_ctx)  # one prompt for the batch
    kept = TPT(views=8)
    adapter = OnlineAdapter(clip, [kept], class_names=NAMES, device="cpu", reset_optimizer=False, batch_size=4)
    assert not adapter.batches_samples()
    adapter.loop.run([(squares, None, {"raw": raw})], total=1)  # the first batch builds the optimizer
    with pytest.raises(ConfigError, match="reset_optimizer"):
        adapter.loop.run([(squares, None, {"raw": raw})], total=1)


def test_batched_predict_keeps_a_failing_image_alone(clip):
    images = mixed_images(3)
    bad = images[1]

    class Flaky:
        """Fails on one image, whether it comes alone or inside a batch."""

        name = "flaky"
        independent_samples = True

        @hookimpl
        def test_sample_start(self, state):
            if any(r is bad for r in state.batch["raw"]):
                raise RuntimeError("device lost")

    tpt = TPT(views=8)
    adapter = OnlineAdapter(clip, [tpt, Flaky()], class_names=NAMES, device="cpu", batch_size=3)
    assert adapter.batches_samples()
    out = adapter.predict(images + [torch.full((3, 9, 9), float("nan"))])
    assert [p.ok for p in out] == [True, False, True, False]
    assert "device lost" in out[1].error and "NaN" in out[3].error
    assert adapter.seen == 3  # the batch was rolled back and its images retried one at a time


class DynaRecorder:
    name = "dyna_recorder"

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    @hookimpl
    def test_sample_end(self, state):
        self.logits.append(state.logits.detach().clone())


def test_dynaprompt_per_sample_batch_equals_one_at_a_time(clip):
    raw = mixed_images(4, seed=2)
    squares = torch.cat([clip.preprocess(r.unsqueeze(0)) * clip.std + clip.mean for r in raw]).clamp(0, 1)

    def make():
        dyna = DynaPrompt(views=8, buffer_size=3, collapse_window=0, per_sample=True, seed=1)
        rec = DynaRecorder()
        adapter = OnlineAdapter(clip, [dyna, rec], class_names=NAMES, device="cpu", optimizer=OPTIMIZER)
        return adapter, dyna, rec

    one, dyna1, rec1 = make()
    many, dynaB, recB = make()
    calls = []
    original = clip.encode_image
    clip.encode_image = lambda x, *a, **k: (calls.append(x.shape[0]), original(x, *a, **k))[1]  # type: ignore[method-assign]
    try:
        for i, r in enumerate(raw):
            one.loop.run([(squares[i : i + 1], None, {"raw": [r]})], total=1)
        calls.clear()
        result = many.loop.run([(squares, None, {"raw": raw})], total=1)  # one test-time batch of 4
    finally:
        del clip.encode_image
    assert result["samples"] == 4
    assert calls == [32]  # the views of the 4 samples in one image pass
    assert len(recB.logits) == 4  # each sample predicted on its own, after its own step
    torch.testing.assert_close(torch.cat(recB.logits), torch.cat(rec1.logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(dynaB.buffer.delta.detach(), dyna1.buffer.delta.detach(), atol=1e-5, rtol=0)
    assert dynaB.buffer.uses == dyna1.buffer.uses and dynaB.buffer.order == dyna1.buffer.order
    assert dynaB.buffer.deleted == dyna1.buffer.deleted >= 1  # the buffer evolved sample by sample
    assert float(dynaB.buffer.delta.detach().abs().max()) > 1e-3


def test_dynaprompt_default_treats_a_batch_as_one_sample(clip):
    raw = mixed_images(3, seed=4)
    squares = torch.cat([clip.preprocess(r.unsqueeze(0)) * clip.std + clip.mean for r in raw]).clamp(0, 1)
    dyna = DynaPrompt(views=8, buffer_size=3, collapse_window=0)
    rec = DynaRecorder()
    adapter = OnlineAdapter(clip, [dyna, rec], class_names=NAMES, device="cpu")
    adapter.loop.run([(squares, None, {"raw": raw})], total=1)
    assert len(rec.logits) == 1 and rec.logits[0].shape[0] == 3  # one unit: one selection, one step
    assert sum(dyna.buffer.uses) == len(dyna.selected)
