"""PGP and NSP: bases and null spaces against hand computations, exactness in a linear setting, compositions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from driftprompt.engine import ConfigError, hookimpl
from driftprompt.engine.run import build
from driftprompt.plugins.nsp import NSP, project_update, prompt_distribution_loss
from driftprompt.plugins.pgp import PGP
from driftprompt.plugins.projection import (
    block_projector,
    elbow_index,
    energy_rank,
    gpm_extend,
    null_space_projector,
    prefix_key_index,
    remove_component,
)

from ..conftest import TINY_OPTIONS

# --- energy thresholds (GPM) ------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "rank"), [(0.4, 1), (0.5, 2), (0.7, 2), (0.71, 3), (0.97, 4), (1.0, 4)])
def test_energy_rank_on_a_hand_spectrum(threshold, rank):
    # squared singular values 4, 3, 2, 1 (total 10): cumulative ratios 0.4, 0.7, 0.9, 1.0
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), threshold) == rank


def _basis_set(basis):
    return {int(i) for i in (basis.abs() > 0.5).nonzero()[:, 0]}


def test_gpm_first_task_keeps_the_top_directions():
    gram = torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))  # energies by axis, not sorted
    basis = gpm_extend(gram, None, 0.5)
    assert basis.shape == (4, 2) and _basis_set(basis) == {1, 3}  # 4 + 3 = 7 >= 5
    # the public code's count keeps one fewer: only 0.4 of the energy is below 0.5
    assert gpm_extend(gram, None, 0.5, first_off_by_one=True).shape == (4, 1)


def test_gpm_incremental_update_adds_only_what_the_threshold_needs():
    old = torch.eye(4)[:, :1]  # e0 kept from the first task
    gram = torch.diag(torch.tensor([1.0, 6.0, 2.0, 1.0]))  # total 10, e0 captures 1
    # threshold 0.5: need 5, kept 1, the residual's top energy 6 suffices -> add e1 only
    basis = gpm_extend(gram, old, 0.5)
    assert basis.shape == (4, 2) and _basis_set(basis) == {0, 1}
    # threshold 0.9: need 9 - 1 = 8 -> 6 + 2 -> add e1 and e2
    assert _basis_set(gpm_extend(gram, old, 0.9)) == {0, 1, 2}
    # threshold 0.1: the old basis already holds 1 >= 1 -> nothing new
    assert gpm_extend(gram, old, 0.1).shape == (4, 1)
    merged = gpm_extend(gram, old, 0.9)
    torch.testing.assert_close(merged.T @ merged, torch.eye(3), atol=1e-5, rtol=0)


def test_pgp_rejects_bad_thresholds_and_options():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"must lie in \(0, 1\]"):
            PGP(prompt_threshold=bad)
        with pytest.raises(ConfigError, match="key_threshold"):
            PGP(key_threshold=bad)
    with pytest.raises(ConfigError, match="space"):
        PGP(space="tokens")
    with pytest.raises(ConfigError, match="roles"):
        PGP(roles=["head"])


# --- exactness in a linear setting ---------------------------------------------------------------


def _linear_case(seed: int = 0):
    """Old inputs X (20 x 8) of rank 3; the layer's output on them is X p^T for a prompt p (5 x 8)."""
    g = torch.Generator().manual_seed(seed)
    x_old = torch.randn(20, 3, generator=g) @ torch.randn(3, 8, generator=g)
    prompt = torch.randn(5, 8, generator=g)
    x_new = torch.randn(20, 8, generator=g)
    target = torch.randn(20, 5, generator=g)
    return x_old, prompt, x_new, target


class _Backbone:
    embed_dim = 8
    depth = 1

    def check_layers(self, layers, what):
        del layers, what


def _fake_state(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer):
    return SimpleNamespace(phase="train", backbone=_Backbone(), optimizer=optimizer, param_groups=optimizer.param_groups, experience=SimpleNamespace(index=1), device=torch.device("cpu"))


@pytest.mark.parametrize(("optimizer", "project"), [("sgd", "gradient"), ("adam", "update")])
def test_projected_updates_keep_old_outputs_while_plain_updates_change_them(optimizer, project):
    x_old, prompt, x_new, target = _linear_case()
    before = x_old @ prompt.T

    def train(projected: bool) -> torch.Tensor:
        p = torch.nn.Parameter(prompt.clone())
        group = {"params": [p], "name": "prompt", "role": "prompt", "layer": 0}
        opt = torch.optim.SGD([group], lr=0.05, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam([group], lr=0.05)
        pgp = PGP(prompt_threshold=1.0, project=project)
        pgp.bases["tokens:0"] = [gpm_extend(x_old.T @ x_old, None, 1.0)]
        state = _fake_state(p, opt)
        for _ in range(10):
            loss = ((x_new @ p.T - target) ** 2).mean()
            loss.backward()
            if projected:
                pgp.before_optimizer_step(state)
            opt.step()
            if projected:
                pgp.after_optimizer_step(state)
            opt.zero_grad()
        return x_old @ p.detach().T

    assert pgp_basis_rank(x_old) == 3
    torch.testing.assert_close(train(True), before, atol=1e-4, rtol=1e-4)
    assert (train(False) - before).abs().max() > 0.1


def pgp_basis_rank(x: torch.Tensor) -> int:
    return gpm_extend(x.T @ x, None, 1.0).shape[1]


def test_remove_component_is_orthogonal_to_the_basis():
    x_old, _, _, _ = _linear_case(1)
    u = gpm_extend(x_old.T @ x_old, None, 1.0)
    g = torch.randn(4, 6, 8)
    projected = remove_component(g, u @ u.T)
    assert (projected.reshape(-1, 8) @ u).abs().max() < 1e-5
    torch.testing.assert_close(remove_component(projected, u @ u.T), projected)


def test_block_projector_is_per_head():
    bases = [torch.eye(2)[:, :1], torch.zeros(2, 0)]
    torch.testing.assert_close(block_projector(bases), torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0])))


def test_prefix_key_half_layouts():
    dual = torch.zeros(2, 2, 3, 5, 8)  # (layers, key/value, pool, length, D)
    assert prefix_key_index(dual, {"layer": [2, 3]}) == [(2, (0, 0)), (3, (1, 0))]
    coda = torch.zeros(4, 6, 8)  # (components, L, D): 3 key tokens then 3 value tokens
    assert prefix_key_index(coda, {"layer": 1}) == [(1, (..., slice(0, 3), slice(None)))]
    named = torch.zeros(5, 2, 8)
    assert prefix_key_index(named, {"layer": 0, "kv_axis": 1}) == [(0, (slice(None), 0, slice(None)))]


# --- null spaces (NSP) ------------------------------------------------------------------------------


def test_elbow_index_on_hand_spectra():
    # second differences 0, -8.49, 8.985, 0, 0.005, 0: the elbow is at s[3] = 0.01
    assert elbow_index(torch.tensor([10.0, 9.5, 9.0, 0.01, 0.005, 0.0, 0.0, 0.0])) == 3
    # a straight line has no elbow: the first maximum (index 0) marks s[1]
    assert elbow_index(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])) == 1


def _covariance(values, vectors):
    return vectors @ torch.diag(torch.tensor(values)) @ vectors.T


def test_null_space_projector_annihilates_the_stored_directions():
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    cov = _covariance([10.0, 9.5, 9.0, 0.01, 0.005, 0.0, 0.0, 0.0], q)
    b = null_space_projector(cov, eta=1.0)
    assert (b @ q[:, :3]).abs().max() < 1e-5  # the three stored directions are blocked
    torch.testing.assert_close(b @ q[:, 3:], q[:, 3:], atol=1e-5, rtol=0)  # the null space passes
    blended = null_space_projector(cov, eta=0.97)
    torch.testing.assert_close(blended @ q[:, :3], 0.03 * q[:, :3], atol=1e-5, rtol=0)
    normalized = null_space_projector(cov, eta=1.0, normalize=True)
    torch.testing.assert_close(normalized, b / b.norm(), atol=1e-6, rtol=0)


def test_nsp_projected_update_keeps_affinity_and_aggregation_on_old_data():
    g = torch.Generator().manual_seed(1)
    # old affinity rows (queries times W_k) span 3 of 8 channels; attention to the 4 prompts spans 2
    rows = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)
    attention = torch.randn(50, 2, generator=g) @ torch.randn(2, 4, generator=g)
    channel = null_space_projector(rows.T @ rows / 50, eta=1.0)
    tokens = null_space_projector(attention.T @ attention / 50, eta=1.0)
    delta = torch.randn(4, 8, generator=g)
    projected = project_update(delta, channel, tokens)
    assert (rows @ projected.T).abs().max() < 1e-4  # affinity: Q W_k^T dP^T = 0
    assert (attention @ projected).abs().max() < 1e-4  # aggregation: S_P dP = 0
    assert (rows @ delta.T).abs().max() > 0.1 and (attention @ delta).abs().max() > 0.1


def test_prompt_distribution_loss_matches_the_formula():
    p, q = torch.randn(3, 8), torch.randn(3, 8)
    expected = (p.mean(1) - q.mean(1)).abs().mean() + (p.std(1, unbiased=False) - q.std(1, unbiased=False)).abs().mean()
    torch.testing.assert_close(prompt_distribution_loss(p, q), expected)
    assert float(prompt_distribution_loss(q + 0.0, q)) == 0.0


def test_nsp_rejects_bad_eta():
    with pytest.raises(ConfigError, match=r"eta must lie in \[0, 1\]"):
        NSP(eta=1.5)


# --- runs on the tiny ViT ----------------------------------------------------------------------------


def _run(make_config, names, **options):
    strategies = [{"name": n, **TINY_OPTIONS.get(n, {}), **options.get(n, {})} for n in names]
    return build(make_config(strategies=strategies, train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "grad_clip": 1.0}), run_dir=None)


@pytest.mark.parametrize(
    ("names", "memories"),
    [
        (["l2p", "pgp"], {"tokens:0", "key"}),
        (["dualprompt", "pgp"], {"query:0", "query:1", "key"}),
        (["vpt", "pgp"], {"tokens:0", "tokens:1"}),
        (["lora", "pgp"], {"site:0:qkv", "site:1:qkv"}),
    ],
)
def test_pgp_composes_with_prompt_and_adapter_strategies(make_config, names, memories):
    run = _run(make_config, names)
    summary = run.fit()
    pgp = dict(run.strategies)["pgp"]
    assert set(pgp.bases) == memories
    assert all(0 < n <= 32 for n in pgp.basis_sizes().values())
    assert len(summary["accuracy"]) == 2


def test_qprompt_with_pgp(make_config):
    from driftprompt.engine.plugins import discover

    if "qprompt" not in discover().strategies:
        pytest.skip("qprompt is not installed")
    run = _run(make_config, ["qprompt", "pgp"])
    run.fit()
    assert "tokens:0" in dict(run.strategies)["pgp"].bases


def test_pgp_update_projection_leaves_old_directions_untouched_in_the_vit(make_config):
    run = _run(make_config, ["vpt", "pgp"], pgp={"project": "update", "prompt_threshold": 0.9})
    vpt, pgp = dict(run.strategies)["vpt"], dict(run.strategies)["pgp"]
    seen = {}

    class Observer:
        @hookimpl
        def experience_start(self, state):
            if state.experience.index == 1:
                seen["bases"] = {k: [b.clone() for b in v] for k, v in pgp.bases.items()}
                seen["prompts"] = [p.detach().clone() for p in vpt.params]

    run.hooks.pm.register(Observer())
    run.fit()
    for layer, (old, new) in enumerate(zip(seen["prompts"], vpt.params)):
        u = seen["bases"][f"tokens:{layer}"][0]
        delta = new.detach() - old
        assert delta.abs().max() > 1e-4  # the prompts did train
        assert (delta @ u).abs().max() < 1e-4 * max(1.0, float(delta.abs().max()))


def test_pgp_forward_subspace_and_sample_space_run(make_config):
    run = _run(make_config, ["l2p", "pgp"], pgp={"forward_subspace": True})
    run.fit()
    pgp = dict(run.strategies)["pgp"]
    assert set(pgp.frozen) == {"tokens:0"} and pgp.frozen["tokens:0"][0].shape[0] == 32
    stream = {"name": "synthetic", "options": {"num_classes": 4, "n_experiences": 2, "train_per_class": 16, "test_per_class": 2, "image_size": 16}}
    run = build(make_config(strategies=[{"name": "l2p", **TINY_OPTIONS["l2p"]}, {"name": "pgp", "space": "sample"}], stream=stream), run_dir=None)
    run.fit()
    assert dict(run.strategies)["pgp"].bases["tokens:0"][0].shape[0] == 32


def test_nsp_with_vpt_projects_updates_into_the_null_space(make_config):
    run = _run(make_config, ["vpt", "nsp"], nsp={"eta": 1.0})
    vpt, nsp = dict(run.strategies)["vpt"], dict(run.strategies)["nsp"]
    seen: dict = {"terms": set()}

    class Observer:
        @hookimpl
        def experience_start(self, state):
            if state.experience.index == 1:
                seen["projectors"] = {layer: nsp._projector(layer) for layer in (0, 1)}
                seen["prompts"] = [p.detach().clone() for p in vpt.params]

        @hookimpl
        def after_loss(self, state):
            seen["terms"].update(state.loss_terms)

    run.hooks.pm.register(Observer())
    run.fit()
    assert {"ce", "nsp_ln"} <= seen["terms"]
    for layer, (old, new) in enumerate(zip(seen["prompts"], vpt.params)):
        channel, tokens = seen["projectors"][layer]
        assert channel.shape == (32, 32) and tokens.shape == (2, 2)
        delta = new.detach() - old
        torch.testing.assert_close(tokens @ delta @ channel, delta, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["pgp", "nsp"])
def test_projection_without_prompts_is_a_clear_error(make_config, name):
    run = build(make_config(strategies=["finetune", name]), run_dir=None)
    with pytest.raises(ConfigError, match=f"{name} found no"):
        run.fit()


def test_state_dicts_round_trip(make_config):
    run = _run(make_config, ["vpt", "pgp", "nsp"])
    run.fit()
    pgp, nsp = dict(run.strategies)["pgp"], dict(run.strategies)["nsp"]
    pgp2, nsp2 = PGP(), NSP()
    pgp2.load_state_dict(pgp.state_dict())
    nsp2.load_state_dict(nsp.state_dict())
    assert pgp2.basis_sizes() == pgp.basis_sizes() and pgp2.experiences == 2
    for k, v in pgp.bases.items():
        torch.testing.assert_close(pgp2.bases[k][0], v[0].cpu())
    for k, v in nsp.affinity.items():
        torch.testing.assert_close(nsp2.affinity[k], v.cpu())
    assert set(nsp2.previous) == set(nsp.previous)
