"""L2P, DualPrompt and CODA-Prompt against plain implementations of their reference code.

Each ``reference_*`` function below is written for these tests from the structure of the
reference repositories (JH-LEE-KR/l2p-pytorch, JH-LEE-KR/dualprompt-pytorch,
GT-RIPL/CODA-Prompt): explicit softmax attention with prefixes concatenated per head, the
port's token order and resized position embedding, its selection and its loss. They share
nothing with the strategies but the frozen timm weights, and the tests compare the strategy's
first training step (selected prompts, logits, loss and gradients) on identical random weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from driftprompt.engine import hookimpl
from driftprompt.engine.loop import cosine_epoch_factor
from driftprompt.engine.run import build

from ..conftest import TINY_OPTIONS

ATOL = 1e-5


# --- the reference forward pass ---------------------------------------------------------


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The ports' ``l2_normalize``: x * rsqrt(max(sum x^2, 1e-12))."""
    return x * torch.rsqrt(torch.clamp((x**2).sum(dim=dim, keepdim=True), min=1e-12))


def reference_attention(attn, x, prefix=None):
    """Attention as in dualprompt attention.py / CODA vit.py: prefixes are (2, B, H, Lp, Dh)."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if prefix is not None:
        k = torch.cat([prefix[0], k], dim=2)
        v = torch.cat([prefix[1], v], dim=2)
    weights = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def reference_blocks(model, x, prefixes=None):
    prefixes = prefixes or {}
    for i, block in enumerate(model.blocks):
        x = x + reference_attention(block.attn, block.norm1(x), prefixes.get(i))
        x = x + block.mlp(block.norm2(x))
    return model.norm(x)


def reference_embed(model, x, prompts=None):
    """Patch embedding; prompts (B, P, D) go between the class token and the patches *before*
    the position embedding, which is lengthened with copies of the class token's (the port's
    ``resize_pos_embed`` on a pretrained checkpoint)."""
    patches = model.patch_embed(x)
    tokens = patches if prompts is None else torch.cat([prompts, patches], dim=1)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    pos = model.pos_embed
    if prompts is not None:
        grid = pos[:, 1:]
        side = int(math.isqrt(grid.shape[1]))
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, side * side, -1)
        pos = torch.cat([pos[:, :1].expand(-1, 1 + prompts.shape[1], -1), grid], dim=1)
    return tokens + pos


def reference_query(model, x):
    with torch.no_grad():
        return reference_blocks(model, reference_embed(model, x))[:, 0]


def masked_ce(logits, targets, classes, num_classes):
    not_mask = torch.tensor(sorted(set(range(num_classes)) - set(classes)), dtype=torch.long)
    logits = logits.index_fill(dim=1, index=not_mask, value=float("-inf"))
    return logits, F.cross_entropy(logits, targets)


# --- driving the strategy through one training step -------------------------------------


class Recorder:
    """Copies what one training step shows: input, prompts handed to the backbone, logits, loss, gradients."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.seen: dict = {}

    @hookimpl(trylast=True)  # after the strategy has set its prompts
    def before_forward(self, state):
        if state.phase == "train":
            self.seen["inputs"] = state.inputs.detach().clone()
            self.seen["params"] = {k: v.detach().clone() for k, v in self.plugin.params.items()}
            self.seen["head"] = (state.head.weight.detach().clone(), state.head.bias.detach().clone())
            self.seen["prompts"] = state.prompts

    @hookimpl
    def after_loss(self, state):
        self.seen["logits"] = state.logits.detach().clone()
        self.seen["loss"] = state.loss.detach().clone()
        self.seen["idx"] = getattr(self.plugin, "_idx", None)

    @hookimpl
    def after_backward(self, state):
        self.seen["grads"] = {k: v.grad.detach().clone() for k, v in self.plugin.params.items() if v.grad is not None}
        self.seen["head_grads"] = (state.head.weight.grad.detach().clone(), state.head.bias.grad.detach().clone())


def first_step(make_config, name, experience=0, batch=6, **options):
    config = make_config(strategies=[{"name": name, **TINY_OPTIONS[name], **options}], train={"epochs": 1, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}})
    run = build(config, run_dir=None)
    plugin = run.strategies[0][1]
    recorder = Recorder(plugin)
    run.hooks.pm.register(recorder)
    loop = run.loop
    loop._init()
    for i in range(experience):  # earlier experiences train normally
        loop._train_experience(i)
    allowed = loop.begin_experience(experience)
    exp = run.stream[experience]
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, 16, 16, generator=generator)
    targets = torch.tensor([exp.classes[i % len(exp.classes)] for i in range(batch)])
    loop.train_step(images, targets, {}, allowed)
    return run, plugin, recorder.seen, targets


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# --- L2P --------------------------------------------------------------------------------


def reference_l2p(model, x, prompts, keys, w, b, top_k, pull_coeff, batchwise):
    """l2p-pytorch prompt.py:47-115, vision_transformer.py:457-498, engine.py:49-68."""
    q = reference_query(model, x)
    key_norm, q_norm = l2_normalize(keys, 1), l2_normalize(q, 1)
    idx = (q_norm @ key_norm.t()).topk(top_k, dim=1).indices
    if batchwise:
        ids, counts = torch.unique(idx, return_counts=True, sorted=True)
        idx = ids[counts.topk(top_k).indices].expand(x.shape[0], -1)
    selected = prompts[idx].reshape(x.shape[0], -1, prompts.shape[-1])
    out = reference_blocks(model, reference_embed(model, x, selected))
    logits = out[:, 1 : 1 + selected.shape[1]].mean(dim=1) @ w.t() + b
    reduce_sim = (key_norm[idx] * q_norm.unsqueeze(1)).sum() / x.shape[0]
    return idx, selected, logits, reduce_sim


@pytest.mark.parametrize("batchwise", [False, True])
def test_l2p_first_step_matches_the_port(make_config, batchwise):
    run, plugin, seen, targets = first_step(make_config, "l2p", batchwise_selection=batchwise)
    model = run.state.backbone.model
    prompts, keys, w, b = leaves(seen["params"]["prompts"], seen["params"]["prompt_keys"], *seen["head"])
    idx, selected, logits, reduce_sim = reference_l2p(model, seen["inputs"], prompts, keys, w, b, plugin.top_k, plugin.pull_coeff, batchwise)
    assert torch.equal(seen["idx"], idx)
    # the tokens handed to the backbone carry the class token's position embedding
    torch.testing.assert_close(seen["prompts"].tokens[0].detach(), selected.detach() + model.pos_embed[0, 0], atol=ATOL, rtol=0)
    logits, ce = masked_ce(logits, targets, run.stream[0].classes, 4)
    loss = ce - plugin.pull_coeff * reduce_sim
    allowed = run.stream[0].classes
    torch.testing.assert_close(seen["logits"][:, allowed], logits[:, allowed].detach(), atol=ATOL, rtol=0)
    # ours adds lambda * sum(1 - cos) / B: the port's loss plus the constant lambda * N
    torch.testing.assert_close(seen["loss"], loss.detach() + plugin.pull_coeff * plugin.top_k, atol=ATOL, rtol=0)
    loss.backward()
    torch.testing.assert_close(seen["grads"]["prompts"], prompts.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["grads"]["prompt_keys"], keys.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][0], w.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][1], b.grad, atol=ATOL, rtol=0)


def test_l2p_pool_starts_uniform_in_minus_one_one_with_near_orthogonal_keys(make_config):
    run = build(make_config(strategies=[{"name": "l2p", "pool_size": 10, "prompt_length": 2, "top_k": 2}]), run_dir=None)
    run.loop._init()
    l2p = run.strategies[0][1]
    for name in ("prompts", "prompt_keys"):
        p = l2p.params[name].detach()
        assert p.min() >= -1 and p.max() <= 1 and p.min() < -0.8 and p.max() > 0.8
        assert abs(float(p.mean())) < 0.1
    k = F.normalize(l2p.params["prompt_keys"].detach(), dim=1)
    cos = (k @ k.T)[~torch.eye(10, dtype=torch.bool)]
    assert abs(float(cos.mean())) < 0.2  # U(0, 1) keys give about 0.75


@pytest.mark.parametrize("mode", ["cls", "none", "learned"])
def test_l2p_prompt_position_embedding_options(make_config, mode):
    run, plugin, seen, _ = first_step(make_config, "l2p", prompt_pos_embed=mode)
    raw = seen["params"]["prompts"][seen["idx"]].reshape(seen["idx"].shape[0], -1, 32)
    tokens = seen["prompts"].tokens[0].detach()
    cls_pos = run.state.backbone.model.pos_embed[0, 0]
    expected = {"cls": raw + cls_pos, "none": raw, "learned": raw + seen["params"].get("pos", torch.zeros(()))}[mode]
    torch.testing.assert_close(tokens, expected, atol=0, rtol=0)
    assert ("pos" in plugin.params) == (mode == "learned")


# --- DualPrompt -------------------------------------------------------------------------


def reference_dualprompt(model, x, g, e, keys, w, b, task, g_layers, e_layers, pull_coeff, reshape_as_port):
    """dualprompt-pytorch prompt.py:73-141, vision_transformer.py:518-601, attention.py:26-52."""
    B, H = x.shape[0], model.blocks[0].attn.num_heads
    D = e.shape[-1]
    q = reference_query(model, x)
    key_norm, q_norm = l2_normalize(keys, -1), l2_normalize(q, -1)
    idx = torch.full((B, 1), task, dtype=torch.long)  # the prompt mask while training
    e_heads = e.reshape(*e.shape[:-1], H, D // H)  # layers, 2, pool, L, H, Dh
    raw = e_heads[:, :, idx]  # layers, 2, B, 1, L, H, Dh
    if reshape_as_port:
        batched = raw.reshape(raw.shape[0], B, 2, -1, H, D // H)
    else:
        batched = raw.permute(0, 2, 1, 3, 4, 5, 6).reshape(raw.shape[0], B, 2, -1, H, D // H)
    g_heads = g.reshape(*g.shape[:-1], H, D // H)  # layers, 2, L, H, Dh
    prefixes = {}
    for j, layer in enumerate(g_layers):
        prompt = g_heads[torch.full((B,), j, dtype=torch.long)]  # B, 2, L, H, Dh
        prefixes[layer] = prompt.permute(1, 0, 3, 2, 4)
    for j, layer in enumerate(e_layers):
        prefixes[layer] = batched[j].permute(1, 0, 3, 2, 4)
    out = reference_blocks(model, reference_embed(model, x), prefixes)
    logits = out[:, 0] @ w.t() + b
    reduce_sim = (key_norm[idx] * q_norm.unsqueeze(1)).sum() / B
    return idx, logits, pull_coeff * reduce_sim


@pytest.mark.parametrize(("experience", "reshape_as_port"), [(0, False), (0, True), (1, False)])
def test_dualprompt_first_step_matches_the_port(make_config, experience, reshape_as_port):
    run, plugin, seen, targets = first_step(make_config, "dualprompt", experience=experience, reference_reshape=reshape_as_port)
    model = run.state.backbone.model
    g, e, keys, w, b = leaves(seen["params"]["g"], seen["params"]["e"], seen["params"]["e_keys"], *seen["head"])
    idx, logits, pull = reference_dualprompt(model, seen["inputs"], g, e, keys, w, b, experience, plugin.g_layers, plugin.e_layers, plugin.pull_coeff, reshape_as_port)
    assert torch.equal(seen["idx"], idx)
    classes = run.stream[experience].classes
    logits, ce = masked_ce(logits, targets, classes, 4)
    loss = ce - pull
    torch.testing.assert_close(seen["logits"][:, classes], logits[:, classes].detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["loss"], loss.detach() + plugin.pull_coeff, atol=ATOL, rtol=0)
    loss.backward()
    for name, ref in (("g", g), ("e", e), ("e_keys", keys)):
        torch.testing.assert_close(seen["grads"][name], ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][0], w.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][1], b.grad, atol=ATOL, rtol=0)


def test_dualprompt_reshape_option_differs_from_the_default_layout(make_config):
    _, _, fixed, _ = first_step(make_config, "dualprompt")
    _, _, port, _ = first_step(make_config, "dualprompt", reference_reshape=True)
    assert not torch.allclose(fixed["logits"], port["logits"])


@pytest.mark.parametrize("shared", [True, False])
def test_dualprompt_transfers_the_previous_expert_into_the_new_slot(make_config, shared):
    run = build(make_config(strategies=[{"name": "dualprompt", **TINY_OPTIONS["dualprompt"], "shared_prompt_pool": shared, "lr": None}]), run_dir=None)
    dp = run.strategies[0][1]
    snaps: dict = {}

    class Snap:
        @hookimpl
        def experience_end(self, state):
            snaps[("end", state.experience.index)] = {k: v.detach().clone() for k, v in dp.params.items()}

        @hookimpl(trylast=True)  # after dualprompt's own experience_start
        def experience_start(self, state):
            snaps[("start", state.experience.index)] = {k: v.detach().clone() for k, v in dp.params.items()}

    run.hooks.pm.register(Snap())
    run.fit()
    before, start = snaps[("end", 0)], snaps[("start", 1)]
    assert not torch.equal(before["e"][:, :, 0], before["e"][:, :, 1])  # expert 0 was trained
    assert torch.equal(start["e"][:, :, 1], before["e"][:, :, 0]) == shared
    assert torch.equal(start["e"][:, :, 2:], before["e"][:, :, 2:])  # other slots untouched
    assert torch.equal(start["e_keys"], before["e_keys"])  # keys are not shared by default


def test_dualprompt_transfer_is_followed_by_a_fresh_optimizer(make_config):
    """The port builds a new optimizer after the transfer (reinit_optimizer); so does reset_optimizer: true."""
    run = build(make_config(strategies=[{"name": "dualprompt", **TINY_OPTIONS["dualprompt"]}]), run_dir=None)
    states = {}

    class Spy:
        @hookimpl
        def epoch_start(self, state):
            states[state.experience.index] = (state.optimizer, len(state.optimizer.state))

    run.hooks.pm.register(Spy())
    run.fit()
    assert run.config.train.reset_optimizer
    assert states[1][0] is not states[0][0] and states[1][1] == 0  # no Adam moments carried into experience 1


# --- CODA-Prompt ------------------------------------------------------------------------


def reference_coda(model, x, params, layers, task, per_task, prompt_length):
    """CODA-Prompt models/zoo.py:133-195 and 390-403, models/vit.py:63-86 (training)."""
    B, H = x.shape[0], model.blocks[0].attn.num_heads
    q = reference_query(model, x)
    s, f = task * per_task, (task + 1) * per_task
    prefixes, assembled = {}, {}
    for j, layer in enumerate(layers):
        K, A, p = params[f"k{j}"], params[f"a{j}"], params[f"p{j}"]
        if task > 0:
            K, A, p = (torch.cat([t[:s].detach().clone(), t[s:f]]) for t in (K, A, p))
        else:
            K, A, p = K[s:f], A[s:f], p[s:f]
        a_query = torch.einsum("bd,kd->bkd", q, A)
        weights = torch.einsum("bkd,kd->bk", F.normalize(a_query, dim=2), F.normalize(K, dim=1))
        prompt = torch.einsum("bk,kld->bld", weights, p)
        i = prompt_length // 2
        pk, pv = prompt[:, :i], prompt[:, i:]
        C = pk.shape[-1]
        prefixes[layer] = (pk.reshape(B, -1, H, C // H).permute(0, 2, 1, 3), pv.reshape(B, -1, H, C // H).permute(0, 2, 1, 3))
        assembled[layer] = prompt
    out = reference_blocks(model, reference_embed(model, x), prefixes)
    return out[:, 0], assembled


@pytest.mark.parametrize("experience", [0, 1])
def test_coda_first_step_matches_the_reference(make_config, experience):
    run, plugin, seen, targets = first_step(make_config, "coda_prompt", experience=experience)
    model = run.state.backbone.model
    names = sorted(seen["params"])
    refs = dict(zip(names, leaves(*(seen["params"][n] for n in names))))
    w, b = leaves(*seen["head"])
    feature, assembled = reference_coda(model, seen["inputs"], refs, plugin.layers, experience, plugin.per_experience, plugin.prompt_length)
    for layer, prompt in assembled.items():
        (key, value), = seen["prompts"].prefix[layer]
        torch.testing.assert_close(torch.cat([key, value], dim=1).detach(), prompt.detach(), atol=ATOL, rtol=0)
    classes = run.stream[experience].classes
    logits = (feature @ w.t() + b)[:, classes]  # the reference's current-task logits
    loss = F.cross_entropy(logits, torch.tensor([classes.index(int(t)) for t in targets]))
    torch.testing.assert_close(seen["logits"][:, classes], logits.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["loss"], loss.detach(), atol=ATOL, rtol=0)
    loss.backward()
    for name in names:
        torch.testing.assert_close(seen["grads"][name], refs[name].grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][0], w.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["head_grads"][1], b.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_coda_frozen_components_stay_bit_identical_without_optimizer_reset(make_config, weight_decay):
    config = make_config(
        strategies=[{"name": "coda_prompt", **TINY_OPTIONS["coda_prompt"]}],
        train={"epochs": 4, "batch_size": 8, "reset_optimizer": False, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": weight_decay}},
    )
    run = build(config, run_dir=None)
    coda = run.strategies[0][1]
    snaps: dict = {}

    class Snap:
        @hookimpl
        def experience_end(self, state):
            snaps[state.experience.index] = {k: v.detach().clone() for k, v in coda.params.items()}

    run.hooks.pm.register(Snap())
    run.fit()
    per = coda.per_experience
    for name in snaps[0]:
        assert torch.equal(snaps[1][name][:per], snaps[0][name][:per]), name  # 8 steps of Adam momentum later
        assert not torch.allclose(snaps[1][name][per:], snaps[0][name][per:])  # the new slice trained


# --- heads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_head_starts_trunc_normal_with_zero_bias_and_is_seeded(make_config, name):
    def head(seed, **options):
        config = make_config(strategies=[{"name": name, **TINY_OPTIONS[name], **options}], seed=seed, stream={"name": "synthetic", "options": {"num_classes": 40, "n_experiences": 2, "train_per_class": 1, "test_per_class": 1, "image_size": 16}})
        run = build(config, run_dir=None)
        run.loop._init()
        return run.state.head.weight.detach().clone(), run.state.head.bias.detach().clone()

    w, b = head(0)
    assert torch.all(b == 0)
    assert 0.018 < float(w.std()) < 0.022 and abs(float(w.mean())) < 0.003  # 1280 draws of std 0.02
    assert torch.equal(head(0)[0], w) and not torch.equal(head(1)[0], w)
    default_w, default_b = head(0, head_init="torch")
    assert float(default_w.std()) > 0.08 and torch.any(default_b != 0)  # nn.Linear's U(+-1/sqrt(32))


# --- the cosine_epoch schedule ----------------------------------------------------------


def reference_cosine_epochs(base, K):
    """Learning rate of each epoch under CODA-Prompt utils/schedulers.py and learners/default.py:92-95."""
    last_epoch = 0  # the constructor calls step(last_epoch + 1) with last_epoch = -1 ...
    lrs = []
    for epoch in range(K):
        if epoch > 0:  # ... and learn_batch steps before every epoch but the first
            last_epoch = epoch - 1
        lrs.append(base * math.cos(99 * math.pi * last_epoch / (200 * (K - 1))))
    return lrs


def test_cosine_epoch_factor_matches_the_reference_formula():
    for K in (2, 5, 20):
        assert [cosine_epoch_factor(e, K) for e in range(K)] == pytest.approx(reference_cosine_epochs(1.0, K), abs=1e-12)
    assert cosine_epoch_factor(0, 1) == 1.0
    ref = reference_cosine_epochs(1.0, 20)
    assert ref[0] == ref[1] == 1.0 and ref[-1] == pytest.approx(0.0974, abs=1e-4)


def test_cosine_epoch_runs_each_epoch_at_the_reference_rate(make_config):
    K = 5
    run = build(make_config(strategies=[{"name": "coda_prompt", **TINY_OPTIONS["coda_prompt"]}], train={"epochs": K, "batch_size": 8, "scheduler": "cosine_epoch", "optimizer": {"name": "adam", "lr": 0.01}}), run_dir=None)
    seen: dict = {}

    class Spy:
        @hookimpl
        def batch_start(self, state):
            lrs = {g["lr"] for g in state.optimizer.param_groups}
            assert len(lrs) == 1
            seen.setdefault((state.experience.index, state.epoch), []).append(lrs.pop())

    run.hooks.pm.register(Spy())
    run.fit()
    expected = reference_cosine_epochs(0.01, K)
    for experience in (0, 1):  # rebuilt at every experience
        per_epoch = [seen[(experience, e)] for e in range(K)]
        assert all(len(set(lrs)) == 1 and len(lrs) == 2 for lrs in per_epoch)  # constant within an epoch
        assert [lrs[0] for lrs in per_epoch] == pytest.approx(expected, abs=1e-12)
