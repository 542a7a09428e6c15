"""The frozen ViT wrapper against timm's own forward pass, weights loading and input checks."""

from __future__ import annotations

import pytest
import timm
import torch

from driftprompt.engine import BackboneError, Prompts
from driftprompt.engine.backbones import ViTBackbone

from ..conftest import TINY_BACKBONE

KW = TINY_BACKBONE["kwargs"]


@pytest.fixture(scope="module")
def backbone() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(TINY_BACKBONE["name"], "random", **KW)


def test_frozen_and_stays_in_eval_mode(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training


def test_unprompted_forward_equals_timm_forward_features(backbone):
    x = torch.randn(3, 3, 16, 16)
    ours = backbone(x)
    reference = backbone.model.forward_features(x)[:, 0]
    torch.testing.assert_close(ours, reference)
    assert ours.shape == (3, 32)
    q = backbone.query(x)
    assert not q.requires_grad and torch.equal(q, ours)


def test_prompt_tokens_match_a_plain_reference(backbone):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    shared = torch.randn(3, 32, requires_grad=True)
    per_sample = torch.randn(2, 2, 32)
    prompts = Prompts(pool="prompt_mean")
    prompts.add_tokens(shared)
    prompts.add_tokens(per_sample)
    out = backbone(x, prompts)
    # reference: written directly on timm's modules
    m = backbone.model
    tokens = m._pos_embed(m.patch_embed(x))
    tokens = torch.cat([tokens[:, :1], shared.expand(2, -1, -1), per_sample, tokens[:, 1:]], dim=1)
    tokens = m.norm(m.blocks(tokens))
    torch.testing.assert_close(out, tokens[:, 1:6].mean(dim=1))
    out.sum().backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    # each sample's own prompt changes only its own output
    other = per_sample.clone()
    other[1] += torch.randn(2, 32)
    changed = Prompts(pool="prompt_mean", tokens=[shared, other])
    out2 = backbone(x, changed)
    torch.testing.assert_close(out2[0], out[0])
    assert not torch.allclose(out2[1], out[1])


def test_preprocess_resizes_and_normalises(backbone):
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    x = backbone.preprocess(images)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    with pytest.raises(BackboneError, match="RGB images"):
        backbone.preprocess(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file_reproduce_the_model(backbone, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = backbone.model.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = ViTBackbone(TINY_BACKBONE["name"], path, **KW)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), backbone(x))


def test_weights_of_another_model_are_refused(backbone, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(backbone.model.state_dict(), path)
    with pytest.raises(BackboneError, match="set backbone.name to the model they were saved from"):
        ViTBackbone(TINY_BACKBONE["name"], path, **{**KW, "embed_dim": 64})
    with pytest.raises(BackboneError, match="does not exist"):
        ViTBackbone(TINY_BACKBONE["name"], tmp_path / "missing.pth", **KW)


def test_offline_pretrained_load_names_the_options(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to the hub")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError) as info:
        ViTBackbone(TINY_BACKBONE["name"], "pretrained", **KW)
    msg = str(info.value)
    assert "backbone.weights" in msg and "'random'" in msg and "local" in msg


def test_unknown_and_non_vit_models_are_refused():
    with pytest.raises(BackboneError, match="did you mean"):
        ViTBackbone("vit_smal_patch16_224", "random")
    with pytest.raises(BackboneError, match="not a VisionTransformer"):
        ViTBackbone("resnet18", "random")


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("text", "text file"),
        ("truncated", "truncated, corrupt or not a weights file"),
        ("not_a_dict", "holds a list"),
        ("non_tensors", "entry 'pos_embed' holds a int"),
        ("empty", "empty dict"),
    ],
)
def test_unusable_weights_files_are_one_sentence(backbone, tmp_path, content, phrase):
    path = tmp_path / "w.pth"
    if content == "text":
        path.write_text("these are not weights\nat all\n")
    elif content == "truncated":
        torch.save(backbone.model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif content == "non_tensors":
        torch.save({"pos_embed": 3, "cls_token": torch.zeros(1)}, path)
    else:
        torch.save({}, path)
    with pytest.raises(BackboneError) as info:
        ViTBackbone(TINY_BACKBONE["name"], path, **KW)
    assert phrase in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("kwargs, phrase", [({"depth": -1}, "number of steps must be non-negative"), ({"patch_size": 0}, "ZeroDivisionError"), ({"unknown_option": 1}, "unknown_option")])
def test_backbone_kwargs_the_model_cannot_take_are_one_sentence(kwargs, phrase):
    with pytest.raises(BackboneError, match="backbone.kwargs") as info:
        ViTBackbone(TINY_BACKBONE["name"], "random", **{**KW, **kwargs})
    assert phrase in str(info.value) and "\n" not in str(info.value)
