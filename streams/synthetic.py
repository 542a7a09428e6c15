"""A synthetic image dataset that needs no download: for the demo and the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from driftprompt.engine.errors import StreamError

from .base import TensorImageDataset


def synthetic_split(
    num_classes: int = 10,
    train_per_class: int = 64,
    test_per_class: int = 32,
    image_size: int = 32,
    seed: int = 0,
    difficulty: float = 0.6,
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Draw class-conditional train and test images that need no download.

    Every class has its own low-frequency prototype (a 4 x 4 random colour grid upsampled to
    ``image_size``); a sample mixes its class prototype with a sample-specific smooth field
    and pixel noise, and is quantised to uint8. ``difficulty`` (0-1) is the weight of the
    sample-specific part: classes overlap more as it grows. Train and test sets share the
    prototypes but no samples; the same seed always gives the same images.
    """
    for option, value, least in (("num_classes", num_classes, 1), ("train_per_class", train_per_class, 1), ("test_per_class", test_per_class, 1), ("image_size", image_size, 1)):
        if value < least:
            raise StreamError(f"Synthetic stream option {option} must be at least {least}, got {value}; raise it.")
    if not 0.0 <= difficulty <= 1.0:
        raise StreamError(f"Synthetic stream option difficulty must lie in [0, 1], got {difficulty}; 0 gives well separated classes, 1 overlapping ones.")
    gen = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=gen), size=(image_size, image_size), mode="bicubic", align_corners=False)
    train = _draw(protos, train_per_class, image_size, difficulty, torch.Generator().manual_seed(seed + 1))
    test = _draw(protos, test_per_class, image_size, difficulty, torch.Generator().manual_seed(seed + 2))
    return train, test


def _draw(protos: torch.Tensor, per_class: int, image_size: int, difficulty: float, gen: torch.Generator) -> TensorImageDataset:
    num_classes = protos.shape[0]
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    own = F.interpolate(torch.randn(len(targets), 3, 4, 4, generator=gen), size=(image_size, image_size), mode="bicubic", align_corners=False)
    noise = torch.randn(len(targets), 3, image_size, image_size, generator=gen)
    field = (1 - difficulty) * protos[targets] + difficulty * own + 0.1 * noise
    images = (0.5 + 0.2 * field).clamp(0, 1).mul(255).round().to(torch.uint8)
    return TensorImageDataset(images, targets)
