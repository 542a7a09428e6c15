"""The paper configs' data pipelines against hand-built torchvision pipelines of the reference code.

References: l2p-pytorch / dualprompt-pytorch datasets.py build_transform (train:
RandomResizedCrop(224, scale=(0.05, 1.0)) + flip + ToTensor; eval: Resize(256, bicubic) +
CenterCrop(224) + ToTensor, no Normalize), CODA-Prompt dataloaders/utils.py get_transform
(train: RandomResizedCrop(224) + flip; CIFAR eval: Resize(224); Normalize with mean 0, std 1),
VPTinNSforCL utils/dataset_builder.py (eval: Resize((224, 224), bicubic) + the weights' mean/std).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

from driftprompt.engine.backbones import ViTBackbone, normalization_stats
from driftprompt.engine.config import load_config
from driftprompt.engine.errors import BackboneError, ConfigError
from driftprompt.plugins.augment import Augment
from driftprompt.streams.transforms import EvalTransform, PretrainedConfig

REPO = Path(__file__).resolve().parents[2]
TINY = {"img_size": 224, "patch_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _backbone(name: str, normalize="model") -> ViTBackbone:
    return ViTBackbone(name, "random", normalize=normalize, **TINY)


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _eval_input(config_name: str, images: torch.Tensor) -> torch.Tensor:
    cfg = load_config(REPO / "configs" / f"{config_name}.yaml")
    backbone = _backbone(cfg.backbone.name, cfg.backbone.normalize if isinstance(cfg.backbone.normalize, str) else cfg.backbone.normalize.model_dump())
    interpolation = None if cfg.eval.interpolation == "model" else cfg.eval.interpolation
    with backbone.evaluating(cfg.eval.resize, interpolation):
        return backbone.preprocess(images)


@pytest.mark.parametrize("name", ["l2p_cifar100", "dualprompt_cifar100", "pgp_l2p_cifar100"])
def test_port_eval_is_resize_256_centre_crop_224_without_normalisation(name):
    images = _images()
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(224)])(images.float() / 255).clamp(0, 1)
    ours = _eval_input(name, images)
    assert ours.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_port_eval_matches_the_pil_pipeline_up_to_the_bicubic_kernel():
    """PIL's bicubic kernel (a=-0.5) differs slightly from torch's (a=-0.75): the mean error stays small."""
    from PIL import Image

    images = _images(1)
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])(pil)
    ours = _eval_input("l2p_cifar100", images)[0]
    assert (ours - reference).abs().mean() < 0.02


def test_coda_eval_is_resize_224_bilinear_and_nsp_eval_is_resize_224_bicubic_with_model_stats():
    images = _images()
    coda = T.Resize(224, interpolation=T.InterpolationMode.BILINEAR, antialias=True)(images.float() / 255).clamp(0, 1)
    torch.testing.assert_close(_eval_input("coda_prompt_cifar100", images), coda, atol=1e-5, rtol=0)
    nsp = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC, antialias=True)])(images.float() / 255).clamp(0, 1)
    nsp = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(nsp)  # augreg_in21k's pretrained mean/std
    torch.testing.assert_close(_eval_input("nsp_vpt_cifar100", images), nsp, atol=1e-5, rtol=0)


def test_eval_transform_equals_preprocess_in_the_evaluation_view():
    backbone = _backbone("vit_base_patch16_224.orig_in21k", "none")
    images = _images()
    with backbone.evaluating(256, "bicubic"):
        expected = backbone.preprocess(images)
    got = EvalTransform(PretrainedConfig((224, 224), "bicubic"), normalize="none", resize=256)(images)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "name,scale,hflip,interpolation",
    [
        ("l2p_cifar100", (0.05, 1.0), 0.5, "bilinear"),  # l2p-pytorch datasets.py:198-202
        ("dualprompt_cifar100", (0.05, 1.0), 0.5, "bilinear"),
        ("pgp_l2p_cifar100", (0.05, 1.0), 0.5, "bilinear"),
        ("coda_prompt_cifar100", (0.08, 1.0), 0.5, "bilinear"),  # CODA-Prompt dataloaders/utils.py:44-45
        ("nsp_vpt_cifar100", (0.08, 1.0), 0.0, "bicubic"),  # VPTinNSforCL utils/dataset_builder.py:434
    ],
)
def test_train_augmentation_has_the_reference_crop(name, scale, hflip, interpolation):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    spec = next(s for s in cfg.strategies if s.name == "augment")
    aug = Augment(**spec.options).augment
    reference = T.RandomResizedCrop(224, scale=scale, interpolation=T.InterpolationMode(interpolation))
    assert aug.scale == pytest.approx(reference.scale) and aug.ratio == pytest.approx(reference.ratio)
    assert aug.interpolation == reference.interpolation.value and aug.hflip == hflip


def test_train_crop_of_the_whole_image_equals_resize_then_flip():
    """With the box forced to the whole image, the crop is the reference's Resize (+ flip)."""
    from driftprompt.streams.transforms import TrainAugment

    x = torch.rand(2, 3, 224, 224)
    out = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(x)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-4, rtol=0)


def test_normalisation_none_model_and_explicit():
    images = _images(1, 224)
    x = images.float() / 255
    torch.testing.assert_close(_backbone("vit_base_patch16_224.orig_in21k", "none").preprocess(images), x)
    torch.testing.assert_close(_backbone("vit_base_patch16_224.orig_in21k", "model").preprocess(images), (x - 0.5) / 0.5)
    explicit = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    expected = T.Normalize(explicit["mean"], explicit["std"])(x)
    torch.testing.assert_close(_backbone("vit_base_patch16_224.orig_in21k", explicit).preprocess(images), expected)
    with pytest.raises(BackboneError, match="backbone.normalize"):
        normalization_stats({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}, None)


def test_a_normalisation_the_backbone_cannot_apply_stops_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="backbone.normalize.*'model'.*'none'"):
        load_config(REPO / "configs" / "l2p_cifar100.yaml", ["backbone.normalize={mean: [0.5], std: [0.5]}"])
    with pytest.raises(ConfigError, match="backbone.normalize"):
        load_config(REPO / "configs" / "l2p_cifar100.yaml", ["backbone.normalize=imagenet"])
