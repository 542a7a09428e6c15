"""The online adapter: per-item errors, thread safety, reset and state round trip."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.adapter import OnlineAdapter, check_image
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.plugins.tpt import TPT

CONFIG = Path(__file__).parents[1] / "assets" / "tiny-clip.json"
NAMES = ["dog", "cat", "bird"]


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(model_config=CONFIG, random_init=True)


def make_adapter(clip: CLIPBackbone) -> OnlineAdapter:
    return OnlineAdapter(clip, [TPT(views=8)], class_names=NAMES, device="cpu")


def test_a_bad_image_inside_a_batch_fails_alone(clip):
    adapter = make_adapter(clip)
    batch = [
        torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8),
        torch.full((3, 20, 20), float("nan")),
        torch.rand(1, 20, 20),
        torch.randint(0, 256, (3, 20, 20), dtype=torch.int32),
        torch.rand(3, 24, 28),
        "not an image",
    ]
    out = adapter.predict(batch)
    assert [r.ok for r in out] == [True, False, False, False, True, False]
    assert "NaN" in out[1].error and "(3, H, W)" in out[2].error and "int32" in out[3].error
    for r in (out[0], out[4]):
        assert r.probs.shape == (3,) and float(r.probs.sum()) == pytest.approx(1.0, abs=1e-5) and r.label in range(3)
    assert check_image(torch.rand(3, 4, 4)) is None


class Flaky:
    """Raises inside the loop on its second sample, like a transient device error."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def test_sample_start(self, state) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("device lost")


def test_a_failure_inside_the_model_is_reported_for_that_item(clip):
    adapter = OnlineAdapter(clip, [TPT(views=8), Flaky()], class_names=NAMES, device="cpu")
    out = adapter.predict(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))
    assert [r.ok for r in out] == [True, False, True] and "device lost" in out[1].error


def test_threads_share_one_adapter(clip):
    adapter = make_adapter(clip)
    results: list = []

    def worker() -> None:
        results.extend(adapter.predict(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r.ok for r in results) and adapter.seen == 8


def test_reset_and_state_dict_round_trip(clip):
    adapter = make_adapter(clip)
    adapter.predict(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))
    tpt = adapter.strategies[0][1]
    saved = adapter.state_dict()
    assert not torch.equal(saved["strategies"]["tpt"]["ctx"], tpt.init_ctx)
    adapter.reset()
    assert torch.equal(tpt.ctx.detach(), tpt.init_ctx)
    other = make_adapter(clip)
    other.load_state_dict(saved)
    assert other.seen == 1 and torch.equal(other.strategies[0][1].ctx.detach(), saved["strategies"]["tpt"]["ctx"])


def test_extreme_finite_pixels_fail_alone_and_leave_the_strategies_untouched(clip):
    from driftprompt.plugins.dynaprompt import DynaPrompt

    dp = DynaPrompt(views=4, buffer_size=3, collapse_window=0)
    adapter = OnlineAdapter(clip, [dp], class_names=NAMES, device="cpu")
    adapter.predict([torch.rand(3, 20, 20)])
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in dp.state_dict().items()}
    out = adapter.predict([torch.full((3, 20, 24), 1e300, dtype=torch.float64), torch.full((3, 20, 24), 3e38), torch.rand(3, 22, 30)])
    assert [r.ok for r in out] == [False, False, True]
    assert out[0].probs is None and "float32" in out[0].error
    assert "not finite" in out[1].error
    assert bool(torch.isfinite(out[2].probs).all())
    after = {k: v.clone() if torch.is_tensor(v) else list(v) for k, v in dp.state_dict().items()}
    assert torch.isfinite(after["delta"]).all()
    assert after["uses"] != before["uses"]  # the good image used prompts
    # an image that fails after adapting is rolled back: the buffer is exactly as before it
    out = adapter.predict([torch.full((3, 20, 24), 3e38)])
    assert not out[0].ok
    rolled = dp.state_dict()
    assert torch.equal(rolled["delta"], after["delta"]) and rolled["uses"] == after["uses"] and rolled["order"] == after["order"]


def test_predict_none_returns_an_error_instead_of_raising(clip):
    out = make_adapter(clip).predict(None)
    assert len(out) == 1 and not out[0].ok and "NoneType" in out[0].error and "(B, 3, H, W)" in out[0].error


def test_a_strategy_that_cannot_roll_back_stops_the_adapter_loud(clip):
    from driftprompt.engine.errors import PluginError

    class NoRollback(TPT):
        def load_state_dict(self, state):
            raise RuntimeError("state layout changed")

    adapter = OnlineAdapter(clip, [NoRollback(views=4)], class_names=NAMES, device="cpu")
    with pytest.raises(PluginError, match="could not restore its state"):
        adapter.predict([torch.full((3, 20, 24), 3e38)])  # fails after adapting: its rollback fails too
