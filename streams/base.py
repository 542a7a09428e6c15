"""Plain data types of a stream: datasets of images, experiences, streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from driftprompt.engine.errors import StreamError


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W) with integer labels.

    Batches are cut by indexing the tensors directly (``batches``), which is far cheaper than
    collating one item at a time; ``__getitem__`` keeps the ordinary Dataset protocol.

    Args:
        images: uint8 (N, 3, H, W) or float (N, 3, H, W) in [0, 1].
        targets: integer class labels (N,).
        indices: the samples' positions in the source dataset (default 0..N-1), so that
            every sample keeps its identity through splits.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int], indices: torch.Tensor | None = None) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.dim() != 4 or images.shape[1] != 3:
            raise StreamError(f"Images must be shaped (N, 3, H, W), got {tuple(images.shape)}; convert grey images to 3 channels.")
        if images.shape[0] != targets.shape[0]:
            raise StreamError(f"{images.shape[0]} images but {targets.shape[0]} labels; give one label per image.")
        self.images = images
        self.targets = targets
        self.indices = torch.arange(len(targets)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.targets[i]), int(self.indices[i])

    def subset(self, positions: torch.Tensor) -> TensorImageDataset:
        """A new dataset holding the samples at ``positions`` (indices are kept)."""
        return TensorImageDataset(self.images[positions], self.targets[positions], self.indices[positions])

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            pos = order[start : start + batch_size]
            yield self.images[pos], self.targets[pos], {"index": self.indices[pos]}


def targets_of(dataset: Dataset) -> torch.Tensor:
    """Labels of every sample of a dataset (``targets`` attribute, or by iterating once)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def iterate(dataset: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Yield ``(images, targets, extras)`` batches from any dataset of (image, target[, index])."""
    if isinstance(dataset, TensorImageDataset):
        yield from dataset.batches(batch_size, shuffle, generator)
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    for batch in loader:
        images, targets = batch[0], batch[1]
        extras = {"index": batch[2]} if len(batch) > 2 else {}
        yield images, targets, extras


@dataclass
class Experience:
    """One step of a continual stream: its data and what is known about it.

    Attributes:
        index: position in the stream.
        train: training dataset (items are (image, target, index)).
        test: test dataset of the same classes or domain.
        classes: the classes that occur in this experience, sorted.
        task_id: task label (exposed only by task-incremental scenarios).
        domain: domain name for domain-incremental streams.
    """

    index: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_id: int | None = None
    domain: str | None = None


@dataclass
class Stream:
    """An ordered list of experiences over ``num_classes`` classes."""

    experiences: list[Experience]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "stream"

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)
