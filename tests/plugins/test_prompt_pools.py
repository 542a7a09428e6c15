"""L2P, DualPrompt and CODA-Prompt: selection, losses and assembly against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftprompt.engine import BackboneError, ConfigError
from driftprompt.engine.run import build
from driftprompt.plugins.coda_prompt import CODAPrompt, assemble_prompt, component_weights, orthogonal_extension
from driftprompt.plugins.dualprompt import DualPrompt
from driftprompt.plugins.l2p import L2P, batchwise_majority, gather_prompts, pull_loss, select_prompts

from ..conftest import TINY_OPTIONS

# --- L2P maths --------------------------------------------------------------------------


def test_select_prompts_picks_the_closest_keys():
    keys = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0]).unsqueeze(1)  # scale must not matter
    query = torch.tensor([[0.9, 0.0, 0.5, 0.0], [0.0, 0.1, 0.0, 1.0]])
    assert select_prompts(keys, query, 2).tolist() == [[0, 2], [3, 1]]


def test_diversified_selection_prefers_rarely_used_prompts():
    keys = torch.eye(3)
    query = torch.tensor([[1.0, 0.8, 0.0]])
    assert select_prompts(keys, query, 1).tolist() == [[0]]
    # prompt 0 was used a lot before: distance (1 - cos) * h favours prompt 1
    frequency = torch.tensor([0.9, 0.05, 0.05])
    assert select_prompts(keys, query, 1, frequency).tolist() == [[1]]


def test_batchwise_majority_votes():
    idx = torch.tensor([[0, 1], [1, 2], [1, 3]])
    assert batchwise_majority(idx, 4).tolist() == [[1, 0]] * 3


def test_pull_loss_matches_the_reference_formula_and_only_moves_keys():
    torch.manual_seed(0)
    keys = torch.randn(5, 8, requires_grad=True)
    query = torch.randn(3, 8, requires_grad=True)
    idx = torch.tensor([[0, 2], [1, 2], [4, 3]])
    loss = pull_loss(keys, query, idx)
    expected = sum(1 - F.cosine_similarity(query[b], keys[i], dim=0) for b in range(3) for i in idx[b].tolist()) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert query.grad is None and keys.grad[[0, 1, 2, 3, 4]].abs().sum() > 0


def test_gather_prompts_concatenates_in_selection_order():
    prompts = torch.arange(3 * 2 * 1, dtype=torch.float).reshape(3, 2, 1)
    out = gather_prompts(prompts, torch.tensor([[2, 0]]))
    assert out.flatten().tolist() == [4, 5, 0, 1]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"top_k": 11}, "larger than pool_size"),
        ({"head": "gap"}, "does not exist"),
        ({"prompt_length": 0}, "at least 1"),
        ({"prompt_pos_embed": "sincos"}, "prompt_pos_embed 'sincos' does not exist"),
        ({"head_init": "xavier"}, "head_init 'xavier' does not exist"),
    ],
)
def test_l2p_bad_options(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        L2P(**kwargs)


def test_l2p_prompt_pos_embed_reads_booleans_as_before():
    assert L2P(prompt_pos_embed=True).prompt_pos_embed == "learned"
    assert L2P(prompt_pos_embed=False).prompt_pos_embed == "none"


def test_l2p_class_position_embedding_needs_one(make_config):
    config = make_config(strategies=[{"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2}])
    config.backbone.kwargs["no_embed_class"] = True
    run = build(config, run_dir=None)
    with pytest.raises(ConfigError, match="set prompt_pos_embed to 'none' or 'learned'"):
        run.fit()


# --- runs -------------------------------------------------------------------------------

def _run(make_config, name, **options):
    config = make_config(
        strategies=[{"name": name, **TINY_OPTIONS[name], **options}],
        train={"epochs": 4, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "grad_clip": 1.0},
    )
    run = build(config, run_dir=None)
    losses: list[float] = []
    original = run.loop._optimize

    def spy(clip):
        original(clip)
        losses.append(float(run.state.loss.detach()))

    run.loop._optimize = spy
    return run, losses


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
def test_a_short_run_lowers_the_loss(make_config, name):
    run, losses = _run(make_config, name, lr=None) if name != "coda_prompt" else _run(make_config, name)
    summary = run.fit()
    first = losses[:8]  # experience 0: 4 epochs x 2 batches
    assert sum(first[-2:]) < sum(first[:2]), first
    assert len(summary["accuracy"]) == 2


def test_l2p_trains_prompts_keys_and_head_with_the_scaled_lr(make_config):
    run, _ = _run(make_config, "l2p")
    run.fit()
    groups = {g["name"]: g for g in run.state.optimizer.param_groups}
    assert set(groups) == {"l2p.prompts", "l2p.keys", "head"}
    assert groups["l2p.prompts"]["lr"] == pytest.approx(0.03 * 8 / 256)
    assert groups["l2p.prompts"]["role"] == "prompt" and groups["l2p.keys"]["role"] == "key"


def test_l2p_masks_old_classes_during_training(make_config):
    run, _ = _run(make_config, "l2p")
    seen = {}
    original = run.loop._optimize

    def spy(clip):
        original(clip)
        if run.state.experience.index == 1:
            seen["logits"] = run.state.logits.detach()

    run.loop._optimize = spy
    run.fit()
    old = run.stream[0].classes
    assert torch.all(seen["logits"][:, old] == torch.finfo(seen["logits"].dtype).min)


def test_dualprompt_trains_the_experience_expert_and_selects_by_key_at_test(make_config):
    from driftprompt.engine import hookimpl

    run, _ = _run(make_config, "dualprompt", lr=None)
    dp = run.strategies[0][1]
    indices: dict = {}

    class Observer:
        @hookimpl(trylast=True)  # after dualprompt has chosen its experts
        def before_forward(self, state):
            indices.setdefault((state.phase, state.experience.index), set()).update(dp._idx.flatten().tolist())

    run.hooks.pm.register(Observer())
    run.fit()
    assert indices[("train", 0)] == {0} and indices[("train", 1)] == {1}
    assert indices[("eval", 1)] <= {0, 1, 2, 3}
    assert dp.params["e"].shape == (1, 2, 4, 5, 32)


def test_dualprompt_refuses_layers_the_backbone_lacks(make_config):
    run = build(make_config(strategies=[{"name": "dualprompt", "e_layers": [5]}]), run_dir=None)
    with pytest.raises(BackboneError, match=r"dualprompt e_layers names block\(s\) \[5\]"):
        run.fit()
    with pytest.raises(ConfigError, match="overlap"):
        DualPrompt(g_layers=[0, 1], e_layers=[1, 2])


# --- CODA-Prompt ------------------------------------------------------------------------


def test_component_weights_and_assembly_match_a_loop():
    torch.manual_seed(0)
    q, k, a, p = torch.randn(2, 6), torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 4, 6)
    w = component_weights(q, k, a)
    for b in range(2):
        for m in range(3):
            torch.testing.assert_close(w[b, m], F.cosine_similarity(q[b] * a[m], k[m], dim=0))
    prompt = assemble_prompt(w, p)
    torch.testing.assert_close(prompt[1], sum(w[1, m] * p[m] for m in range(3)))


def test_orthogonal_extension_is_orthonormal_and_orthogonal_to_existing():
    torch.manual_seed(0)
    old = orthogonal_extension(torch.zeros(0, 4, 5), 3)
    new = orthogonal_extension(old, 4)
    both = torch.cat([old, new]).reshape(7, -1)
    torch.testing.assert_close(both @ both.T, torch.eye(7), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        orthogonal_extension(torch.zeros(0, 3), 4)


def test_coda_freezes_old_components_and_uses_only_seen_ones(make_config):
    run, _ = _run(make_config, "coda_prompt")
    coda = run.strategies[0][1]
    snapshots = {}

    from driftprompt.engine import hookimpl

    class Snap:
        @hookimpl
        def experience_end(self, state):
            snapshots[state.experience.index] = {k: v.detach().clone() for k, v in coda.params.items()}

    run.hooks.pm.register(Snap())
    run.fit()
    per = coda.per_experience
    assert per == 2 and coda.active == 4
    for name in snapshots[0]:
        torch.testing.assert_close(snapshots[1][name][:per], snapshots[0][name][:per])  # frozen
        assert not torch.allclose(snapshots[1][name][per:], snapshots[0][name][per:])  # trained


def test_coda_bad_options(make_config):
    with pytest.raises(ConfigError, match="even number"):
        CODAPrompt(prompt_length=5)
    run = build(make_config(strategies=[{"name": "coda_prompt", "layers": [0, 1]}]), run_dir=None)
    with pytest.raises(ConfigError, match="orthogonal keys of width 32"):
        run.fit()


def test_prompt_gathering_has_a_reproducible_gradient_on_several_threads():
    # advanced indexing's gradient (index_put_ with accumulate) adds repeated indices in a
    # thread-dependent order on the CPU; two identical runs then differed in the last bits
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randn(10, 5, 192, generator=gen, requires_grad=True)
        keys = torch.randn(10, 192, generator=gen, requires_grad=True)
        idx = torch.randint(0, 10, (16, 5), generator=gen)
        weight = torch.randn(16, 25, 192, generator=gen)
        query = torch.randn(16, 192, generator=gen)
        grads = []
        for _ in range(20):
            prompts.grad = keys.grad = None
            ((gather_prompts(prompts, idx) * weight).sum() + pull_loss(keys, query, idx)).backward()
            grads.append((prompts.grad.clone(), keys.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0][0], g) and torch.equal(grads[0][1], k) for g, k in grads)
    assert torch.equal(gather_prompts(prompts, idx), prompts[idx].reshape(16, 25, 192))
