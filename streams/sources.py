"""Where images come from: paths, in-memory arrays and torchvision datasets.

Every source returns ``(train, test)`` :class:`TensorImageDataset` pairs of uint8
(N, 3, H, W) images (or a lazily decoded dataset for large image folders, see
:mod:`driftprompt.streams.folders`), so the scenarios in :mod:`driftprompt.streams.scenarios`
can cut any of them into experiences.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from driftprompt.engine.errors import StreamError

from .base import TensorImageDataset, container_bits

DATA_ENV = "DRIFTPROMPT_DATA"


def data_root(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder: ``root`` when given, else ``$DRIFTPROMPT_DATA``, else ``None``."""
    if root is not None and str(root) != "":
        return Path(os.path.expanduser(str(root)))
    env = os.environ.get(DATA_ENV)
    return Path(os.path.expanduser(env)) if env else None


def resolve_path(path: str | os.PathLike[str] | None, root: str | os.PathLike[str] | None = None, option: str = "path") -> Path:
    """Find a file or folder named by a config option.

    An absolute path, or one that exists relative to the working directory, is used as is;
    otherwise it is looked up under ``root`` (or ``$DRIFTPROMPT_DATA``).

    Raises:
        StreamError: naming ``option`` and the data root when nothing exists there.
    """
    if path is None or str(path) == "":
        raise StreamError(f"No data path given; set stream.options.{option}.")
    candidate = Path(os.path.expanduser(str(path)))
    if candidate.is_absolute() or candidate.exists():
        if candidate.exists():
            return candidate
        raise StreamError(f"'{candidate}' does not exist; fix stream.options.{option}.")
    base = data_root(root)
    if base is not None and (base / candidate).exists():
        return base / candidate
    where = f"under '{base}'" if base is not None else f"(stream.options.root and ${DATA_ENV} are unset)"
    raise StreamError(f"'{candidate}' was not found in the working directory nor {where}; set stream.options.{option} to an existing path or point stream.options.root or ${DATA_ENV} at the folder that holds it.")


def to_uint8_nchw(images: Any, channels_last: bool | None = None) -> torch.Tensor:
    """Convert an array of images to a uint8 (N, 3, H, W) tensor.

    Accepts numpy arrays or tensors shaped (N, H, W) (grey), (N, H, W, C) or (N, C, H, W)
    with C in {1, 3}; floats are taken to lie in [0, 1]. Integer images wider than 8 bits
    (16-bit scans, for instance) are shifted down to 8 bits when a value exceeds 255, never
    clipped. ``channels_last`` is inferred from the shape when ``None``.
    """
    if not isinstance(images, torch.Tensor):
        arr = np.asarray(images)
        if arr.dtype.kind in "ui" and arr.dtype != np.uint8:
            arr = arr.astype(np.int64)  # torch supports few operations on uint16/uint32
        x = torch.as_tensor(arr)
    else:
        x = images
    if x.dtype not in (torch.uint8, torch.bool) and not x.is_floating_point() and not x.is_complex():
        x = _integer_to_uint8(x.to(torch.int64))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise StreamError(f"Images must be shaped (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(x.shape)}; reshape the array.")
    if channels_last is None:
        channels_last = x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise StreamError(f"Images have {x.shape[1]} channels; give grey (1) or RGB (3) images.")
    if x.dtype != torch.uint8:
        x = x.float()
        if x.numel() and float(x.max()) > 1.0 + 1e-6:
            raise StreamError("Float images must lie in [0, 1]; divide 0-255 data by 255 or pass it as uint8.")
        x = x.mul(255).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def _integer_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """8-bit values of integer images: as they are up to 255, else shifted down from the 16- or
    32-bit depth their values use (:func:`~driftprompt.streams.base.container_bits`)."""
    if x.numel() == 0:
        return x.to(torch.uint8)
    low, top = int(x.min()), int(x.max())
    if low < 0:
        raise StreamError(f"Integer images hold negative values (minimum {low}); give unsigned pixel values (0-255, or 0-65535 for 16-bit images).")
    if top >= 1 << 32:
        raise StreamError(f"Integer images hold values up to {top}, more than 32 bits; give 8- or 16-bit pixel values.")
    bits = container_bits(top)
    return (x >> (bits - 8) if bits > 8 else x).to(torch.uint8)


def from_arrays(images: Any, targets: Sequence[int] | np.ndarray | torch.Tensor) -> TensorImageDataset:
    """A dataset from in-memory images (numpy array or tensor) and integer labels."""
    return TensorImageDataset(to_uint8_nchw(images), torch.as_tensor(np.asarray(targets), dtype=torch.long))


def limit_per_class(dataset: TensorImageDataset, per_class: int | None, seed: int | None = None) -> TensorImageDataset:
    """Keep at most ``per_class`` samples of each class (the first ones, or a seeded choice)."""
    if per_class is None:
        return dataset
    if per_class < 1:
        raise StreamError(f"per_class must be at least 1, got {per_class}; raise it or leave it unset.")
    keep = []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for c in torch.unique(dataset.targets).tolist():
        pos = torch.nonzero(dataset.targets == c).flatten()
        if gen is not None:
            pos = pos[torch.randperm(len(pos), generator=gen)]
        keep.append(pos[:per_class].sort().values)
    positions = torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)
    return dataset.subset(positions)


# --- torchvision -----------------------------------------------------------------------------

TORCHVISION = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "svhn": "SVHN",
    "stl10": "STL10",
}


def _split_kwargs(name: str, train: bool) -> dict[str, Any]:
    if name in ("svhn", "stl10"):
        return {"split": "train" if train else "test"}
    return {"train": train}


def torchvision_dataset(name: str, root: str | os.PathLike[str] | None = None, train: bool = True, download: bool = False) -> tuple[TensorImageDataset, list[str]]:
    """Load a small torchvision dataset into memory as uint8 tensors.

    Args:
        name: one of ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``kmnist``,
            ``svhn``, ``stl10``.
        root: folder holding (or receiving) the torchvision files; default ``$DRIFTPROMPT_DATA``.
        train: the training split, else the test split.
        download: let torchvision download the files when they are missing.

    Returns:
        The dataset and the class names.
    """
    import torchvision.datasets as tvd

    key = name.lower().replace("-", "_")
    if key not in TORCHVISION:
        raise StreamError(f"Unknown torchvision dataset '{name}'; use one of {', '.join(TORCHVISION)}, or an image_folder/image_tar stream.")
    base = data_root(root)
    if base is None:
        raise StreamError(f"No folder for {name}; set stream.options.root or ${DATA_ENV} (and download: true to fetch it).")
    cls = getattr(tvd, TORCHVISION[key])
    try:
        ds = cls(str(base), download=download, **_split_kwargs(key, train))
    except RuntimeError as exc:
        if download:
            raise StreamError(f"Downloading {name} into '{base}' failed ({exc}); check the network or place the files there yourself.") from exc
        raise StreamError(f"{name} was not found under '{base}'; set stream.options.download: true to download it, or point stream.options.root at the folder that holds it.") from exc
    data = ds.data
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    images = to_uint8_nchw(data, channels_last=key in ("cifar10", "cifar100"))
    out = TensorImageDataset(images, torch.as_tensor(np.asarray(labels), dtype=torch.long))
    names = [str(c) for c in getattr(ds, "classes", [])] or [str(i) for i in range(int(out.targets.max()) + 1)]
    return out, names
