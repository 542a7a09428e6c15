"""DynaPrompt: selection, append and delete rules on scripted inputs, and a short online run."""

from __future__ import annotations

from pathlib import Path

import torch

from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.plugins.tpt import OnlineMonitor
from driftprompt.plugins.dynaprompt import DynaPrompt, PromptBuffer, prompt_scores, select_prompts

CONFIG = Path(__file__).parents[1] / "assets" / "tiny-clip.json"


def test_scores_follow_the_official_definitions():
    logits = torch.randn(5, 3, 4) * 4  # V, P, C
    ent, diff = prompt_scores(logits)
    p = logits.softmax(-1)
    torch.testing.assert_close(ent, (-(p * p.log()).sum(-1)).mean(0))
    top = logits.max(-1).values
    torch.testing.assert_close(diff, (top[0] - top[1:]).mean(0))


def test_selection_keeps_lower_entropy_prompts_with_top_difference_plus_the_reference():
    # entropy ranking (high -> low): 2, 0 (reference), 3, 1 -> k = 1 prompt above the reference
    ent = torch.tensor([1.0, 0.2, 2.0, 0.5])
    diff = torch.tensor([0.0, 0.1, 0.3, 0.9])  # top-1 by difference: prompt 3
    assert select_prompts(ent, diff, reference=0) == [3, 0]
    assert select_prompts(ent, diff, reference=0, initial="when_empty") == [3]
    # lower-entropy prompts exist, but none is among the top-k by difference: reference only
    assert select_prompts(ent, torch.tensor([0.0, 0.1, 0.9, 0.3]), reference=0) == [0]
    # the reference has the highest entropy: k = 0, nothing else qualifies
    assert select_prompts(torch.tensor([3.0, 0.1, 0.2, 0.3]), diff, reference=0) == [0]


def test_buffer_appends_until_full_then_deletes_the_least_recently_used():
    buf = PromptBuffer(3, 2, 4, torch.device("cpu"))
    refs = []
    for used in ([], [0], [1]):  # scripted extra selections besides the reference
        ref = buf.begin_sample()
        refs.append(ref)
        buf.mark_used(sorted(set(used) - {ref}) + [ref])
        with torch.no_grad():
            buf.delta[ref] += 1.0  # adaptation moves the used prompt
    assert refs == [0, 1, 2] and buf.uses == [2, 2, 1] and buf.deleted == 0
    assert buf.order == [0, 1, 2]
    ref = buf.begin_sample()  # all used: the least recently used (0) is deleted, a fresh one takes its slot
    assert ref == 0 and buf.deleted == 1 and buf.uses[0] == 0
    assert torch.equal(buf.delta[0], torch.zeros(2, 4)) and torch.equal(buf.delta[1], torch.ones(2, 4))
    assert buf.begin_sample() == 0  # an unused fresh prompt remains: nothing is deleted
    assert buf.deleted == 1


def test_online_run_keeps_prompts_and_resets_only_the_optimizer():
    torch.manual_seed(0)
    clip = CLIPBackbone(model_config=CONFIG, random_init=True)
    dyna = DynaPrompt(views=8, buffer_size=3, collapse_window=0)
    adapter = OnlineAdapter(clip, [dyna], class_names=["dog", "cat", "bird"], device="cpu")
    out = adapter.predict(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8))
    assert all(r.ok for r in out)
    buf = dyna.buffer
    assert buf.deleted == 2  # samples 4 and 5 recycle a slot (the reference is always used)
    moved = [i for i in range(3) if not torch.equal(buf.delta[i].detach(), torch.zeros_like(buf.delta[i]))]
    assert len(moved) >= 2  # prompts adapted on earlier samples persist
    # the prediction is the mean of the selected prompts' logits on the original view
    with torch.no_grad():
        logits = dyna.logits_for(dyna.selected, adapter.state, grad=False)[:, 0].mean(1)
    torch.testing.assert_close(adapter.state.logits.float(), logits)


def test_collapse_rule_on_scripted_predictions():
    monitor = OnlineMonitor(window=4, fraction=0.5)
    confident_same = torch.tensor([[8.0, 0.0, 0.0]])
    assert [monitor.record(confident_same, None) for _ in range(4)] == [False, False, False, True]
    assert monitor.resets == 1 and len(monitor.recent) == 0
    varied = [torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([[0.0, 8.0, 0.0]]), torch.tensor([[0.0, 0.0, 8.0]]), torch.tensor([[8.0, 0.0, 0.0]])]
    assert not any(monitor.record(x, None) for x in varied)  # H(mean) = 1.04 > 0.5 * ln 3


def test_collapse_guard_clears_the_buffer():
    torch.manual_seed(0)
    clip = CLIPBackbone(model_config=CONFIG, random_init=True)
    dyna = DynaPrompt(views=4, buffer_size=2)

    class Always(OnlineMonitor):
        def record(self, logits, targets):
            super().record(logits, targets)
            self.resets += 1
            return True

    dyna.monitor = Always(window=0)
    adapter = OnlineAdapter(clip, [dyna], class_names=["dog", "cat", "bird"], device="cpu")
    adapter.predict(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))
    assert dyna.buffer.uses == [0, 0] and torch.equal(dyna.buffer.delta.detach(), torch.zeros_like(dyna.buffer.delta))
