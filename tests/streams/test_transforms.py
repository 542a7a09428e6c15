"""Train-time augmentation and eval transform on batches of tensors."""

from __future__ import annotations

import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.engine.backbones import ViTBackbone
from driftprompt.streams import EvalTransform, PretrainedConfig, TrainAugment, eval_transform_for, train_augment_for


def test_augment_shapes_range_and_determinism():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    aug = TrainAugment(size=24, scale=(0.2, 1.0))
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    boxes = aug.boxes(200, 32, 32, torch.Generator().manual_seed(1))
    area = boxes[:, 2] * boxes[:, 3] / (32 * 32)
    assert float(area.min()) >= 0.15 and float(area.max()) <= 1.0
    assert bool(((boxes[:, 0] + boxes[:, 2]) <= 32).all()) and bool(((boxes[:, 1] + boxes[:, 3]) <= 32).all())


def test_full_crop_with_flip_is_an_exact_mirror():
    x = torch.rand(2, 3, 8, 8)
    aug = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, interpolation="nearest")
    assert torch.allclose(aug(x), x.flip(-1))
    assert torch.allclose(TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation="nearest")(x), x)


def test_configs_come_from_the_backbone_and_eval_matches_preprocess():
    backbone = ViTBackbone("vit_small_patch16_224", "random", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    cfg = PretrainedConfig.from_backbone(backbone)
    assert cfg.image_size == (16, 16)
    assert train_augment_for(backbone).size == (16, 16)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(eval_transform_for(backbone)(x), backbone.preprocess(x), atol=1e-5)
    cropped = EvalTransform(PretrainedConfig((16, 16), "bilinear", crop_pct=0.875))(x)
    assert cropped.shape == (2, 3, 16, 16)


def test_bad_augment_options():
    with pytest.raises(StreamError, match="scale must satisfy"):
        TrainAugment(scale=(0.5, 0.1))
    with pytest.raises(StreamError, match="Unknown interpolation"):
        TrainAugment(interpolation="lanczos")
