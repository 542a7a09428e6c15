"""qprompt: queue bound, De-Q eviction against a hand PCA, aggregation, gradients, MINE, resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from driftprompt.engine import BackboneError, ConfigError, Event, PluginError
from driftprompt.engine.checkpoint import load
from driftprompt.engine.run import build
from driftprompt.plugins.qprompt import (
    QPrompt,
    ResidualPromptEncoder,
    aggregate,
    donsker_varadhan,
    mine_estimate,
    pca_evict,
    roll_pairs,
)

from ..conftest import TINY_OPTIONS

# --- pure maths -------------------------------------------------------------------------


def test_aggregate_is_a_rank_one_hadamard_reweighting_and_identity_at_ones():
    torch.manual_seed(0)
    queue = torch.randn(7, 6)
    u, v = torch.randn(7), torch.randn(6)
    out = aggregate(queue, u, v)
    assert out.shape == (7, 6)
    torch.testing.assert_close(out, torch.outer(u, v) * queue)
    torch.testing.assert_close(aggregate(queue, torch.ones(7), torch.ones(6)), queue)


@pytest.mark.parametrize(("tokens", "keep"), [(20, 15), (12, 5), (9, 1)])
def test_eviction_keeps_the_principal_subspace(tokens, keep):
    torch.manual_seed(tokens)
    # correlated tokens, so that the spectrum is far from flat
    queue = torch.randn(tokens, 4) @ torch.randn(4, 24) + 0.3 * torch.randn(tokens, 24)
    queue = queue.double()
    evicted = pca_evict(queue, keep)
    assert evicted.shape == (keep, 24)
    # eigenvalues of the token Gram matrix Q Q^T, ascending: the discarded mass is the smallest ones
    eigenvalues = torch.linalg.eigh(queue @ queue.T).eigenvalues
    discarded = eigenvalues[: tokens - keep].sum()
    # best reconstruction of the old queue from the kept tokens (least squares mixing)
    mixing = torch.linalg.lstsq(evicted.T, queue.T).solution.T
    error = ((queue - mixing @ evicted) ** 2).sum()
    torch.testing.assert_close(error, discarded, rtol=1e-8, atol=1e-8)
    # the kept tokens are orthonormal mixtures of the old ones: U_k^T Q, energies s_j^2 in order
    _, s, vh = torch.linalg.svd(queue, full_matrices=False)
    torch.testing.assert_close(evicted.norm(dim=1), s[:keep])
    projection = vh[:keep].T @ vh[:keep]
    torch.testing.assert_close(evicted @ projection, evicted)
    # a positively weighted mixture: each kept token points along the sum of the old ones
    assert torch.all(evicted @ queue.sum(dim=0) >= 0)


def test_eviction_leaves_a_short_queue_alone():
    queue = torch.randn(3, 8)
    assert pca_evict(queue, 5) is queue


def test_residual_encoder_starts_as_the_identity():
    enc = ResidualPromptEncoder(8, 4)
    prompt = torch.randn(5, 8)
    torch.testing.assert_close(enc(prompt), prompt)


def test_mine_value_is_the_dv_bound_and_its_gradient_uses_the_moving_average():
    torch.manual_seed(0)
    t_joint = torch.randn(6, requires_grad=True)
    t_marginal = torch.randn(6, requires_grad=True)
    dv = donsker_varadhan(t_joint, t_marginal)
    expected = t_joint.mean() - torch.log(torch.exp(t_marginal).mean())
    torch.testing.assert_close(dv, expected)
    log_ema = torch.tensor(0.7)
    rate = 0.25
    value, new_log_ema = mine_estimate(t_joint, t_marginal, log_ema, rate)
    torch.testing.assert_close(value, expected)
    ema = (1 - rate) * math.exp(0.7) + rate * torch.exp(t_marginal).mean().item()
    assert new_log_ema.item() == pytest.approx(math.log(ema))
    value.backward()
    torch.testing.assert_close(t_joint.grad, torch.full((6,), 1 / 6))
    torch.testing.assert_close(t_marginal.grad, -torch.exp(t_marginal.detach()) / (6 * ema))
    assert roll_pairs(torch.arange(4)).tolist() == [3, 0, 1, 2]


# --- the queue over many experiences ----------------------------------------------------


def _bare(dim: int = 16, **options) -> QPrompt:
    strategy = QPrompt(**options)
    state = SimpleNamespace(backbone=SimpleNamespace(embed_dim=dim, num_prefix_tokens=1, name="fake"), device=torch.device("cpu"))
    strategy.init(state)
    return strategy


def test_the_queue_never_exceeds_its_capacity():
    torch.manual_seed(0)
    strategy = _bare(prompt_length=3, capacity=10)
    sizes, evictions = [], []
    for _ in range(25):
        strategy.experience_start(None)
        evictions.append(strategy.evicted)
        q = strategy.q_prompt()
        sizes.append(q.shape[0])
        assert strategy.current["u"].shape == (q.shape[0],) and strategy.current["v"].shape == (16,)
        with torch.no_grad():  # as if training had moved the new prompt and the weights
            strategy.current["prompt"].add_(1.0)
            strategy.current["u"].mul_(0.9)
        strategy.experience_end(None)
        assert strategy.queue.shape[0] <= 10
    assert max(sizes) <= 10
    assert sizes[:4] == [3, 6, 9, 10]  # the fourth prompt does not fit: 9 + 3 > 10, so 9 -> 7 tokens
    assert evictions[:4] == [False, False, False, True] and all(evictions[3:])
    assert strategy.reference.shape[0] == 10  # the queue as it was before the last eviction


def test_a_new_experience_starts_from_the_queue_it_inherited():
    torch.manual_seed(0)
    strategy = _bare(prompt_length=2, capacity=8)
    strategy.experience_start(None)
    with torch.no_grad():
        strategy.current["u"].uniform_(0.5, 1.5)
        strategy.current["v"].uniform_(0.5, 1.5)
    trained = strategy.q_prompt().detach().clone()
    strategy.experience_end(None)
    torch.testing.assert_close(strategy.q_prompt(), trained)  # W o Q is what is kept
    strategy.experience_start(None)
    torch.testing.assert_close(strategy.q_prompt()[:2], trained)  # u, v = 1 and enc = id at init
    torch.testing.assert_close(strategy.q_prompt()[2:], strategy.current["prompt"].detach())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"capacity": 4, "prompt_length": 5}, "smaller than prompt_length"),
        ({"prompt_length": 0}, "at least 1"),
        ({"prefix_length": -1}, "at least 1"),
        ({"capacity": 0}, "at least 1"),
        ({"mine_ema": 0.0}, "mine_ema"),
    ],
)
def test_bad_options_are_refused_in_one_sentence(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        QPrompt(**kwargs)


def test_backbones_that_cannot_take_the_queue_are_refused():
    with pytest.raises(BackboneError, match="at most 37"):
        _bare(dim=32, capacity=40, prompt_length=5)
    strategy = QPrompt()
    state = SimpleNamespace(backbone=SimpleNamespace(embed_dim=32, num_prefix_tokens=0, name="no-cls"), device=torch.device("cpu"))
    with pytest.raises(BackboneError, match="class token"):
        strategy.init(state)


def test_the_error_names_the_strategy_in_a_run(make_config):
    run = build(make_config(strategies=[{"name": "qprompt", "capacity": 40, "prompt_length": 2}]), run_dir=None)
    with pytest.raises(BackboneError, match=r"Strategy 'qprompt' stopped at 'init'.*width 32"):
        run.fit()


# --- with the tiny backbone -------------------------------------------------------------


def _loop(make_config, **options):
    config = make_config(
        strategies=[{"name": "qprompt", **TINY_OPTIONS["qprompt"], **options}],
        stream={"name": "synthetic", "options": {"num_classes": 8, "n_experiences": 4, "train_per_class": 8, "test_per_class": 2, "image_size": 16, "seed": 0}},
    )
    run = build(config, run_dir=None)
    run.loop._init()
    return run


def _batch(run, i, n=8):
    classes = torch.as_tensor(run.stream[i].classes)
    gen = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen), classes[torch.randint(0, len(classes), (n,), generator=gen)]


def _advance(run, experiences, steps=1):
    for i in range(experiences):
        allowed = run.loop.begin_experience(i)
        images, targets = _batch(run, i)
        for _ in range(steps):
            run.loop.train_step(images, targets, {}, allowed)
        run.hooks.fire(Event.EXPERIENCE_END, run.state)


def test_gradients_reach_the_new_parts_and_never_the_frozen_queue(make_config):
    run = _loop(make_config)
    strategy = run.strategies[0][1]
    _advance(run, 2)  # queue: 2 + 2 tokens, full for capacity 4
    allowed = run.loop.begin_experience(2)  # evicts to 2 tokens, then appends the new prompt
    assert strategy.evicted and strategy.queue.shape[0] == 2 and strategy.q_prompt().shape[0] == 4
    groups = {g["name"]: g for g in run.state.param_groups}
    assert {name: g["role"] for name, g in groups.items()} == {
        "qprompt.prefix": "prompt",
        "qprompt.prompt": "prompt",
        "qprompt.encoder": "adapter",
        "qprompt.aggregation": "other",
        "qprompt.mine": "other",
        "head": "head",
    }
    declared = {id(p) for g in run.state.param_groups for p in g["params"]}
    assert not strategy.queue.requires_grad and id(strategy.queue) not in declared
    grads = {}

    class Spy:
        from driftprompt.engine import hookimpl

        @hookimpl
        def after_backward(self, state):
            grads.update({g["name"]: [p.grad for p in g["params"]] for g in state.param_groups})

    run.hooks.pm.register(Spy())
    queue_before = strategy.queue.clone()
    u_before = strategy.current["u"].detach().clone()
    images, targets = _batch(run, 2)
    run.loop.train_step(images, targets, {}, allowed)
    for name in ("qprompt.prefix", "qprompt.prompt", "qprompt.aggregation", "qprompt.mine", "head"):
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[name]), name
    # the encoder's last layer starts at zero, so only it moves on the first step
    assert grads["qprompt.encoder"][2].abs().sum() > 0
    torch.testing.assert_close(strategy.queue, queue_before)
    assert not torch.equal(strategy.current["u"].detach(), u_before)
    assert {"ce", "mr"} == set(run.state.loss_terms)


def test_the_mi_term_is_finite_and_moves_the_prefix(make_config):
    run = _loop(make_config)
    strategy = run.strategies[0][1]
    _advance(run, 1)
    run.loop.begin_experience(1)  # the reference queue now holds experience 0's tokens
    assert strategy.reference.shape[0] == 2
    images, _ = _batch(run, 1)
    state = run.state
    state.clear_batch()
    state.inputs = state.backbone.preprocess(images)
    estimate = strategy.memory_retention(state)
    assert estimate.dim() == 0 and torch.isfinite(estimate)
    (-estimate).backward()
    prefix_grad = strategy.params["prefix"].grad
    assert prefix_grad is not None and torch.isfinite(prefix_grad).all() and prefix_grad.abs().sum() > 0
    assert all(p.grad is not None for p in strategy.critic.parameters())
    assert strategy.current["prompt"].grad is None  # MR sees the prefix alone
    # only after eviction: experience 1 did not evict, so no MR term
    run_only = _loop(make_config, mr_after_eviction_only=True)
    _advance(run_only, 2)
    assert set(run_only.state.loss_terms) == {"ce"}


def test_a_short_run_lowers_the_loss(make_config):
    run = _loop(make_config, lr=None)
    allowed = run.loop.begin_experience(0)
    images, targets = _batch(run, 0, n=16)
    losses = [float(run.loop.train_step(images, targets, {}, allowed).detach()) for _ in range(12)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_state_dict_round_trip_restores_queue_prefix_and_the_experience_in_progress(make_config, tmp_path):
    run = _loop(make_config)
    strategy = run.strategies[0][1]
    _advance(run, 3)
    run.loop.begin_experience(3)
    images, targets = _batch(run, 3)
    run.loop.train_step(images, targets, {}, run.loop._allowed(run.state.seen_classes))
    path = tmp_path / "qprompt.pt"
    torch.save(strategy.state_dict(), path)
    restored = QPrompt(**TINY_OPTIONS["qprompt"])
    restored.init(run.state)
    restored.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(restored.q_prompt(), strategy.q_prompt())
    torch.testing.assert_close(restored.params["prefix"], strategy.params["prefix"])
    torch.testing.assert_close(restored.reference, strategy.reference)
    assert restored.evicted and restored.active
    for a, b in zip(restored.critic.parameters(), strategy.critic.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(restored.log_ema, strategy.log_ema)
    # after the experience ends, the baked queue round-trips too
    strategy.experience_end(run.state)
    again = QPrompt(**TINY_OPTIONS["qprompt"])
    again.init(run.state)
    again.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(again.q_prompt(), strategy.queue)
    assert not again.active


def test_a_checkpointed_run_resumes(make_config, tmp_path):
    config = make_config(strategies=[{"name": "qprompt", **TINY_OPTIONS["qprompt"]}])
    run = build(config, run_dir=tmp_path / "run")
    run.fit()
    run.close()
    # a finished run is not resumed (nothing is left to train): restore its checkpoint into a
    # fresh run of the same config, as --resume does after a kill
    resumed = build(config, run_dir=None)
    resumed.loop.restore(load(tmp_path / "run" / "checkpoint.pt"))
    strategy, restored = run.strategies[0][1], resumed.strategies[0][1]
    torch.testing.assert_close(restored.queue, strategy.queue)
    torch.testing.assert_close(restored.params["prefix"], strategy.params["prefix"])


def test_no_critic_without_memory_retention(make_config):
    run = _loop(make_config, mr_coeff=0.0)
    _advance(run, 1)
    assert run.strategies[0][1].critic is None
    assert set(run.state.loss_terms) == {"ce"}
    assert "qprompt.mine" not in {g["name"] for g in run.state.param_groups}


def test_plugin_error_is_not_raised_for_single_image_batches(make_config):
    # MINE needs two images to form a mismatched pair; a batch of one trains on CE alone
    run = _loop(make_config)
    allowed = run.loop.begin_experience(0)
    images, targets = _batch(run, 0, n=1)
    try:
        run.loop.train_step(images, targets, {}, allowed)
    except PluginError as exc:  # pragma: no cover - the assertion below explains
        pytest.fail(f"a single-image batch failed: {exc}")
    assert set(run.state.loss_terms) == {"ce"}
