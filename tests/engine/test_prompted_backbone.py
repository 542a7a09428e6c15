"""Prefix tuning and deep prompts against plain reference implementations written here."""

from __future__ import annotations

import math

import pytest
import torch

from driftprompt.engine import BackboneError, Prompts
from driftprompt.engine.backbones import ViTBackbone

from ..conftest import TINY_BACKBONE

KW = {**TINY_BACKBONE["kwargs"], "depth": 3}


@pytest.fixture(scope="module")
def backbone() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(TINY_BACKBONE["name"], "random", **KW)


def reference_block(block, x, pk=None, pv=None):
    """One pre-norm ViT block with explicit softmax attention; prefixes (B, Lp, D) per sample."""
    attn = block.attn
    B, N, C = x.shape
    H, Dh = attn.num_heads, C // attn.num_heads
    h = block.norm1(x)
    q, k, v = (t.reshape(B, N, H, Dh).permute(0, 2, 1, 3) for t in attn.qkv(h).split(C, dim=-1))
    if pk is not None:
        k = torch.cat([pk.reshape(B, -1, H, Dh).permute(0, 2, 1, 3), k], dim=2)
        v = torch.cat([pv.reshape(B, -1, H, Dh).permute(0, 2, 1, 3), v], dim=2)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).softmax(dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(B, N, C)
    x = x + attn.proj(out)
    return x + block.mlp(block.norm2(x))


def test_per_sample_prefixes_match_the_reference(backbone):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    keys = {1: torch.randn(3, 4, 32), 2: torch.randn(3, 4, 32)}
    values = {1: torch.randn(3, 4, 32), 2: torch.randn(3, 4, 32)}
    prompts = Prompts()
    for layer in (1, 2):
        prompts.add_prefix(layer, keys[layer], values[layer])
    ours = backbone(x, prompts)
    m = backbone.model
    t = m._pos_embed(m.patch_embed(x))
    for i, block in enumerate(m.blocks):
        t = reference_block(block, t, keys.get(i), values.get(i))
    torch.testing.assert_close(ours, m.norm(t)[:, 0], atol=1e-5, rtol=1e-5)


def test_prefix_axes_stay_apart(backbone):
    """Changing sample 1's key prefix changes only sample 1, and keys and values are not swapped."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    k, v = torch.randn(2, 3, 32), torch.randn(2, 3, 32)

    def run(key, value):
        p = Prompts()
        p.add_prefix(0, key, value)
        return backbone(x, p)

    base = run(k, v)
    k2 = k.clone()
    k2[1] = torch.randn(3, 32)
    moved = run(k2, v)
    torch.testing.assert_close(moved[0], base[0])
    assert not torch.allclose(moved[1], base[1])
    assert not torch.allclose(run(v, k), base)


def test_shared_and_per_sample_prefixes_concatenate(backbone):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    shared_k, shared_v = torch.randn(2, 32), torch.randn(2, 32)
    own_k, own_v = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    a = Prompts()
    a.add_prefix(0, shared_k, shared_v)
    a.add_prefix(0, own_k, own_v)
    b = Prompts()
    b.add_prefix(0, torch.cat([shared_k.expand(2, -1, -1), own_k], 1), torch.cat([shared_v.expand(2, -1, -1), own_v], 1))
    torch.testing.assert_close(backbone(x, a), backbone(x, b))


def test_deep_prompts_replace_the_slot_at_each_layer(backbone):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    deep = {0: torch.randn(2, 32), 2: torch.randn(2, 32)}
    p = Prompts()
    for layer, tokens in deep.items():
        p.add_deep(layer, tokens)
    ours = backbone(x, p)
    m = backbone.model
    t = m._pos_embed(m.patch_embed(x))
    t = torch.cat([t[:, :1], deep[0].expand(2, -1, -1), t[:, 1:]], dim=1)
    for i, block in enumerate(m.blocks):
        if i == 2:
            t = torch.cat([t[:, :1], deep[2].expand(2, -1, -1), t[:, 3:]], dim=1)
        t = block(t)
    torch.testing.assert_close(ours, m.norm(t)[:, 0])


def test_gradients_reach_prefixes_and_tokens(backbone):
    k = torch.randn(2, 32, requires_grad=True)
    v = torch.randn(2, 32, requires_grad=True)
    tok = torch.randn(3, 32, requires_grad=True)
    p = Prompts(pool="prompt_mean")
    p.add_prefix(1, k, v)
    p.add_tokens(tok)
    backbone(torch.randn(2, 3, 16, 16), p).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (k, v, tok))


def test_bad_layers_and_shapes(backbone):
    with pytest.raises(BackboneError, match=r"names block\(s\) \[3\].*blocks 0..2"):
        backbone.check_layers([0, 3], "my prompt layers")
    with pytest.raises(ValueError, match="differ in length"):
        Prompts().add_prefix(0, torch.randn(2, 32), torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"shape \(L, D\) or \(B, L, D\)"):
        Prompts().add_tokens(torch.randn(32))
