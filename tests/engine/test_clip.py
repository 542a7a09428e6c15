"""The CLIP backbone: cropped text encoding is exact, prompts reach both towers, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from driftprompt.engine.clip import IMAGENET_TEMPLATES, CLIPBackbone, crop_length
from driftprompt.engine.errors import BackboneError

CONFIG = Path(__file__).parents[1] / "assets" / "tiny-clip.json"
NAMES = ["dog", "golden retriever", "cat", "hot air balloon"]


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(model_config=CONFIG, random_init=True)


def test_context_features_equal_full_77_token_encoding(clip):
    ids = clip.class_token_ids(NAMES)
    assert crop_length(ids) < clip.context_length  # the crop actually shortens the sequence
    ours = clip.encode_text_with_context(clip.context_init("a photo of a"), ids)
    full = clip.encode_text_tokens(clip.tokenize([f"a photo of a {n}." for n in NAMES]), crop=False, normalize=True)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


def test_chunked_and_recomputed_encoding_match_one_pass_with_gradients(clip):
    ids = clip.class_token_ids(NAMES)
    ctx = (clip.context_init().unsqueeze(0).repeat(3, 1, 1) + 0.01 * torch.randn(3, 4, clip.text_width)).requires_grad_(True)
    ref = clip.encode_text_with_context(ctx, ids)
    (g_ref,) = torch.autograd.grad(ref.square().sum() + ref[..., 0].sum(), ctx)
    chunked = clip.encode_text_with_context(ctx, ids, chunk_size=5, recompute=True)
    (g_chunk,) = torch.autograd.grad(chunked.square().sum() + chunked[..., 0].sum(), ctx)
    assert ref.shape == (3, len(NAMES), clip.embed_dim)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_chunk, g_ref, atol=1e-5, rtol=1e-4)


def test_image_encoding_matches_open_clip_and_takes_prompt_tokens(clip):
    x = clip.preprocess(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert x.shape == (2, 3, *clip.image_size)
    torch.testing.assert_close(clip.encode_image(x), clip.model.encode_image(x))
    prompted = clip.encode_image(x, torch.randn(3, clip.vision_width))
    assert prompted.shape == (2, clip.embed_dim) and not torch.allclose(prompted, clip.encode_image(x))


def test_zero_shot_classifier_and_templates(clip):
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    w = clip.zero_shot_weights(NAMES, "imagenet80")
    assert w.shape == (len(NAMES), clip.embed_dim)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(len(NAMES)))
    single = clip.zero_shot_weights(NAMES)
    full = clip.encode_text_tokens(clip.tokenize([f"a photo of a {n}." for n in NAMES]), crop=False, normalize=True)
    torch.testing.assert_close(single, full, atol=1e-5, rtol=1e-5)


def test_frozen_and_in_eval_mode(clip):
    clip.train()
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.parameters())


def test_without_weights_one_sentence_names_the_options():
    with pytest.raises(BackboneError, match="pretrained=.*checkpoint=.*random_init=True"):
        CLIPBackbone("ViT-B-16")
    with pytest.raises(BackboneError, match="does not exist"):
        CLIPBackbone("ViT-B-16", checkpoint="/nonexistent/weights.bin")
