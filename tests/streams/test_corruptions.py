"""The 15 corruptions: range, determinism, severity ordering, both variants."""

from __future__ import annotations

import pytest
import torch

from driftprompt.engine import StreamError
from driftprompt.streams import CORRUPTIONS, corrupt
from driftprompt.streams.synthetic import synthetic_split

# Severity strengthens the effect monotonically for these (the others' parameters are not
# ordered in the original tables: glass/elastic mix sigma and iterations, frost darkens the
# image while adding texture, pixelate at 32 px changes little between levels).
MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur", "fog", "brightness", "contrast", "jpeg_compression"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    train, _ = synthetic_split(num_classes=4, train_per_class=4, image_size=32, seed=3)
    return train.images


def _effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_the_cotta_order_has_all_fifteen():
    assert len(CORRUPTIONS) == 15 and CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_range_dtype_determinism_and_severities_differ(images, name):
    outs = [corrupt(images, name, s, seed=0) for s in range(1, 6)]
    for out in outs:
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert not torch.equal(out, images)
    assert torch.equal(corrupt(images, name, 3, seed=0), outs[2])
    assert len({o.numpy().tobytes() for o in outs}) == 5
    floats = corrupt(images.float() / 255, name, 2, seed=0)
    assert floats.dtype == torch.float32 and 0.0 <= float(floats.min()) and float(floats.max()) <= 1.0


@pytest.mark.parametrize("name", MONOTONE)
def test_stronger_severity_changes_more(images, name):
    effects = [_effect(corrupt(images, name, s, seed=0), images) for s in range(1, 6)]
    assert effects == sorted(effects), effects


def test_random_corruptions_depend_on_the_seed(images):
    assert not torch.equal(corrupt(images, "gaussian_noise", 3, seed=0), corrupt(images, "gaussian_noise", 3, seed=1))


def test_imagenet_variant_runs_at_224_and_is_stronger():
    x = torch.full((1, 3, 224, 224), 128, dtype=torch.uint8)
    x[..., 50:150, 60:120] = 230
    for name in ("gaussian_noise", "defocus_blur", "frost", "elastic_transform", "snow"):
        out = corrupt(x, name, 3, variant="imagenet")
        assert out.shape == x.shape
    assert _effect(corrupt(x, "gaussian_noise", 1, variant="imagenet"), x) > _effect(corrupt(x, "gaussian_noise", 1, variant="cifar"), x)


def test_single_image_and_bad_names():
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    assert corrupt(img, "brightness", 1).shape == (3, 16, 16)
    with pytest.raises(StreamError, match="did you mean 'frost'"):
        corrupt(img, "frots", 1)
    with pytest.raises(StreamError, match="integer from 1 to 5"):
        corrupt(img, "fog", 6)
