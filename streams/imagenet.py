"""ImageNet and its test-time variants: folder layouts, class names and label masks.

Known layouts (folders as distributed):

=================  ====================================================  ==============
name               folder                                                classes
=================  ====================================================  ==============
imagenet           ``<root>/val/<wnid>/*.JPEG`` (or ``<root>/<wnid>/``)  1000
imagenet_a         ``imagenet-a/<wnid>/*.jpg``                            200 (Hendrycks et al., CVPR 2021)
imagenet_r         ``imagenet-r/<wnid>/*.jpg``                            200 (Hendrycks et al., ICCV 2021)
imagenet_v2        ``imagenetv2-matched-frequency-format-val/<0..999>/``  1000 (Recht et al., ICML 2019)
imagenet_sketch    ``sketch/<wnid>/*.JPEG``                               1000 (Wang et al., NeurIPS 2019)
=================  ====================================================  ==============

ImageNet-V2 names its class folders ``0`` ... ``999`` by class index. Sorting them as strings
(what ``torchvision.datasets.ImageFolder`` does) puts ``10`` before ``2`` and scrambles the
labels; here the folder name is parsed as the integer class index.

Labels are ImageNet-1k indices (``label_space="imagenet"``, the default; predictions of a
1000-way head are restricted to the subset with :func:`label_mask`) or positions within the
subset (``label_space="subset"``). Class names are the CLIP prompt-engineering names
(Radford et al., ICML 2021), shipped in ``data/imagenet_classes.json`` with the WordNet ids.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from driftprompt.engine.errors import StreamError, load_error_cause

from .base import UnreadableImageError
from .folders import _DECODE_ERRORS, IMAGE_EXTENSIONS, ImageFileDataset, to_rgb

VARIANTS = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")
_DATA = Path(__file__).with_name("data") / "imagenet_classes.json"


@lru_cache(maxsize=1)
def imagenet_classes() -> dict[str, Any]:
    """WordNet ids (class-index order), CLIP names, and the ImageNet-A/R subset wnids."""
    if not _DATA.is_file():
        raise StreamError(f"The ImageNet class list '{_DATA}' is missing from the installation; reinstall driftprompt.")
    return json.loads(_DATA.read_text(encoding="utf-8"))


def subset_indices(variant: str) -> list[int]:
    """ImageNet-1k class indices of a variant, in the variant's label order."""
    info = imagenet_classes()
    if variant in ("imagenet_a", "imagenet_r"):
        index = {w: i for i, w in enumerate(info["wnids"])}
        return [index[w] for w in info[variant]]
    if variant in VARIANTS:
        return list(range(1000))
    raise StreamError(f"Unknown ImageNet variant '{variant}'; use one of {', '.join(VARIANTS)}.")


def label_mask(variant: str) -> torch.Tensor:
    """Boolean (1000,) mask of the ImageNet-1k classes a variant contains."""
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[subset_indices(variant)] = True
    return mask


def class_names(variant: str, label_space: str = "imagenet") -> list[str]:
    """CLIP-style names in label order: 1000 names, or the subset's own for ``label_space="subset"``."""
    names = imagenet_classes()["clip_names"]
    if label_space == "subset":
        return [names[i] for i in subset_indices(variant)]
    return list(names)


class RawImageFileDataset(ImageFileDataset):
    """Image files read as CLIP reads them, with the full-resolution image kept alongside.

    An item's image is ``Resize(S, bicubic) + CenterCrop(S)`` of the decoded file, run by
    torchvision on the PIL image: CLIP's preprocessing and TPT's ``base_transform`` (azshue/TPT
    tpt_classification.py:165-167, kdiAAA/TDA utils.py:97-99). :meth:`decode_with_raw` also
    returns the decoded image itself, uint8 (3, H, W), from which test-time strategies cut
    their views (random-resized crops and AugMix views come from the raw image in the
    official code, data/datautils.py:61-102).
    """

    def decode_with_raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the S x S CLIP-preprocessed image, the raw image), both uint8 (3, ., .)."""
        import numpy as np
        import torchvision.transforms.v2.functional as TF
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                img = to_rgb(img)  # 16-bit images scaled to 8 bits, not clipped white
                square = TF.center_crop(TF.resize(img, [self.image_size], interpolation=TF.InterpolationMode.BICUBIC), [self.image_size, self.image_size])
                raw = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
                sq = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
        except _DECODE_ERRORS as exc:
            # skipped and counted by the stream's batching, like a file caught up front
            raise UnreadableImageError(f"Image '{self.files[i]}' cannot be decoded ({load_error_cause(exc)}); remove or replace the file.", str(self.files[i])) from exc
        return sq.contiguous(), raw.contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.decode_with_raw(i)[0], int(self.targets[i]), i


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def imagenet_variant(
    variant: str,
    root: str | Path,
    split: str = "val",
    image_size: int = 224,
    label_space: str = "imagenet",
    per_class: int | None = None,
    verify: bool = True,
    keep_raw: bool = True,
) -> ImageFileDataset:
    """A lazily decoded dataset of one ImageNet variant.

    Args:
        variant: one of :data:`VARIANTS`.
        root: the variant's folder (for ``imagenet``, the folder holding ``val/``/``train/``).
        split: ``val`` or ``train`` (``imagenet`` only).
        image_size: images are resized (shorter side) and centre-cropped to this.
        keep_raw: read images as CLIP does (bicubic resize of the shorter side, centre crop)
            and keep the full-resolution image for test-time views
            (:class:`RawImageFileDataset`); ``False`` gives the plain bilinear
            :class:`~driftprompt.streams.folders.ImageFileDataset`.
        label_space: ``"imagenet"`` (1000-way indices) or ``"subset"`` (0..K-1).
        per_class: read at most this many images per class (sorted file order).
        verify: check every file's header when building (unreadable files are skipped, counted).
    """
    if label_space not in ("imagenet", "subset"):
        raise StreamError(f"label_space must be 'imagenet' or 'subset', got '{label_space}'.")
    indices = subset_indices(variant)
    root = Path(root)
    if variant == "imagenet" and (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise StreamError(f"{variant} folder '{root}' does not exist; set stream.options.path (or stream.options.root, or DRIFTPROMPT_DATA) to the extracted dataset.")
    info = imagenet_classes()
    wnid_index = {w: i for i, w in enumerate(info["wnids"])}
    position = {c: k for k, c in enumerate(indices)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in _class_dirs(root):
        if variant == "imagenet_v2":
            if not folder.name.isdigit() or not 0 <= int(folder.name) < 1000:
                raise StreamError(f"ImageNet-V2 folder '{folder}' is not a class index 0-999; point stream.options.path at the matched-frequency folder.")
            cls = int(folder.name)  # numeric, not lexicographic: folder "10" is class 10
        elif folder.name in wnid_index:
            cls = wnid_index[folder.name]
        else:
            raise StreamError(f"Folder '{folder}' is not an ImageNet WordNet id; point stream.options.path at the {variant} folder of <wnid>/ subfolders.")
        if cls not in position:
            raise StreamError(f"Class folder '{folder.name}' is not part of {variant}; check that stream.options.dataset matches the folder.")
        items = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        items = items[:per_class] if per_class is not None else items
        files += items
        labels += [cls if label_space == "imagenet" else position[cls]] * len(items)
    if not files:
        raise StreamError(f"No images found under '{root}'; point stream.options.path at the extracted {variant} folder.")
    return (RawImageFileDataset if keep_raw else ImageFileDataset)(files, labels, image_size, verify)
