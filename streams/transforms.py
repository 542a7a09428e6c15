"""Train and eval transforms derived from a backbone's pretrained configuration.

The engine already resizes and normalises every batch on the device
(``ViTBackbone.preprocess``, with the evaluation view ``eval.resize`` inside
``ViTBackbone.evaluating``); :class:`EvalTransform` is the same operation as a stand-alone
callable: resize straight to the input size, or torchvision's ``Resize(resize)`` +
``CenterCrop(size)`` (the L2P/DualPrompt evaluation transform, l2p-pytorch datasets.py:208-213),
then the normalisation ``"model"``, ``"none"`` or an explicit mean/std. :class:`TrainAugment`
is the usual training augmentation, random-resized crop (Szegedy et al., "Going Deeper with
Convolutions", CVPR 2015, as implemented by torchvision's ``RandomResizedCrop``) and horizontal
flip, done for a whole batch at once with one ``grid_sample`` on the batch's device. It only
resamples, so it can run before or after normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from driftprompt.engine.errors import StreamError


@dataclass(frozen=True)
class PretrainedConfig:
    """What a pretrained backbone expects: input size, interpolation, mean and std."""

    image_size: tuple[int, int] = (224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0

    @classmethod
    def from_backbone(cls, backbone: Any) -> PretrainedConfig:
        """Read an ``engine.backbones.ViTBackbone`` (or any timm model's ``pretrained_cfg``)."""
        if hasattr(backbone, "image_size") and hasattr(backbone, "mean"):
            return cls(tuple(backbone.image_size), str(backbone.interpolation), tuple(backbone.mean.flatten().tolist()), tuple(backbone.std.flatten().tolist()))
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))[-2:]
        return cls(tuple(size), cfg.get("interpolation", "bicubic"), tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3)), float(cfg.get("crop_pct", 1.0)))


def _mode(interpolation: str) -> str:
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise StreamError(f"Unknown interpolation '{interpolation}'; use 'bicubic', 'bilinear' or 'nearest'.")
    return interpolation


class EvalTransform:
    """Resize (optionally centre-crop) and normalise a batch, on its device.

    Args:
        config: input size, interpolation, mean and std.
        normalize: ``True`` or ``"model"`` uses ``config.mean``/``config.std``; ``False`` or
            ``"none"`` leaves 0-1 pixels; a mapping ``{mean, std}`` gives them explicitly.
        resize: shorter side before a centre crop to ``config.image_size`` (torchvision's
            ``Resize(resize)`` + ``CenterCrop``); ``None`` uses ``config.crop_pct`` instead.

    With ``crop_pct=1`` and ``resize=None`` this equals ``ViTBackbone.preprocess``; with
    ``resize`` it equals ``preprocess`` inside ``ViTBackbone.evaluating(resize)``. Returns
    float tensors.
    """

    def __init__(self, config: PretrainedConfig, normalize: Any = True, resize: int | None = None) -> None:
        from driftprompt.engine.backbones import normalization_stats

        self.config = config
        self.resize = resize
        if normalize is True:
            normalize = "model"
        elif normalize is False:
            normalize = "none"
        self.normalize = normalize
        self.mean, self.std = normalization_stats(normalize, {"mean": config.mean, "std": config.std})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from driftprompt.engine.backbones import resize_and_crop

        cfg = self.config
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        h, w = cfg.image_size
        if self.resize is not None:
            x = resize_and_crop(x, (h, w), self.resize, _mode(cfg.interpolation))
        elif cfg.crop_pct < 1.0:
            big = (math.floor(h / cfg.crop_pct), math.floor(w / cfg.crop_pct))
            x = F.interpolate(x, size=big, mode=_mode(cfg.interpolation), align_corners=False, antialias=cfg.interpolation != "nearest")
            top, left = (big[0] - h) // 2, (big[1] - w) // 2
            x = x[..., top : top + h, left : left + w]
        elif tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode=_mode(cfg.interpolation), align_corners=False, antialias=cfg.interpolation != "nearest")
        if self.normalize != "none":
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


class TrainAugment:
    """Random-resized crop and horizontal flip for a whole batch, on its device.

    Crop boxes follow torchvision's ``RandomResizedCrop``: up to 10 draws of an area fraction
    in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first draw that fits is used,
    otherwise the whole image. Each image gets its own box and flip.

    Args:
        size: output (H, W); default: the input's size.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height).
        hflip: probability of a horizontal flip.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
    """

    def __init__(
        self,
        size: tuple[int, int] | int | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bilinear",
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise StreamError(f"Augmentation scale must satisfy 0 < min <= max <= 1, got {scale}; e.g. (0.08, 1.0).")
        if not 0 < ratio[0] <= ratio[1]:
            raise StreamError(f"Augmentation ratio must satisfy 0 < min <= max, got {ratio}; e.g. (0.75, 1.333).")
        self.size = (size, size) if isinstance(size, int) else size
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.interpolation = _mode(interpolation)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **overrides: Any) -> TrainAugment:
        """The backbone's input size and interpolation; any argument can be overridden."""
        options: dict[str, Any] = {"size": config.image_size, "interpolation": config.interpolation}
        options.update(overrides)
        return cls(**options)

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop boxes (n, 4) as (x0, y0, w, h) in pixels, drawn on the CPU."""
        attempts = 10
        area = height * width * torch.empty(n, attempts).uniform_(self.scale[0], self.scale[1], generator=generator)
        log_r = torch.empty(n, attempts).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).round()
        h = torch.sqrt(area / r).round()
        ok = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        cw = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(width)))
        ch = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(height)))
        u = torch.rand(n, 2, generator=generator)
        x0 = torch.floor(u[:, 0] * (width - cw + 1))
        y0 = torch.floor(u[:, 1] * (height - ch + 1))
        return torch.stack([x0, y0, cw, ch], dim=1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a (B, 3, H, W) batch; uint8 becomes float in [0, 1], floats stay as they are."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        b, _, height, width = x.shape
        out_h, out_w = self.size or (height, width)
        box = self.boxes(b, height, width, generator)
        flip = torch.rand(b, generator=generator) < self.hflip
        sx = box[:, 2] / width
        sy = box[:, 3] / height
        cx = (box[:, 0] + box[:, 2] / 2) / width * 2 - 1
        cy = (box[:, 1] + box[:, 3] / 2) / height * 2 - 1
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -sx, sx)
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta.to(x.device, x.dtype), [b, 3, out_h, out_w], align_corners=False)
        out = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
        return out.clamp(0, 1) if images.dtype == torch.uint8 else out

    def with_options(self, **changes: Any) -> TrainAugment:
        """A copy with some options changed."""
        cfg = {"size": self.size, "scale": self.scale, "ratio": self.ratio, "hflip": self.hflip, "interpolation": self.interpolation}
        cfg.update(changes)
        return TrainAugment(**cfg)


def train_augment_for(backbone: Any, **overrides: Any) -> TrainAugment:
    """:class:`TrainAugment` for a backbone (its size and interpolation), with overrides."""
    return TrainAugment.from_config(PretrainedConfig.from_backbone(backbone), **overrides)


def eval_transform_for(backbone: Any, **overrides: Any) -> EvalTransform:
    """:class:`EvalTransform` for a backbone; ``overrides`` replace pretrained-config fields.

    ``normalize`` and ``resize`` are passed to :class:`EvalTransform`. A ``ViTBackbone``'s
    mean/std already reflect its ``normalize`` option, so the default reproduces its input.
    """
    normalize = overrides.pop("normalize", True)
    resize = overrides.pop("resize", None)
    return EvalTransform(replace(PretrainedConfig.from_backbone(backbone), **overrides), normalize, resize)
