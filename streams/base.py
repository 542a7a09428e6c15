"""Plain data types of a stream: datasets of images, experiences, streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import logging

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from driftprompt.engine.errors import StreamError

log = logging.getLogger(__name__)


class UnreadableImageError(StreamError):
    """A lazily decoded image turned out truncated or corrupt when its batch was read.

    Batch iteration (:func:`iterate`) skips such a sample and counts it in the dataset's
    ``skipped``, as for an image caught when the dataset was built; indexing the dataset
    directly raises it with its one-sentence message.
    """

    def __init__(self, message: str, file: str = "") -> None:
        super().__init__(message)
        self.file = file


class _SkipUnreadable(Dataset):
    """Wraps a dataset so that an unreadable item becomes ``None`` (dropped when collating)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except UnreadableImageError as exc:
            return ("unreadable", exc.file or str(exc))


def _collate_readable(items: list[Any]) -> tuple[Any, list[str]]:
    bad = [item[1] for item in items if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0] == "unreadable"]
    good = [item for item in items if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0] == "unreadable")]
    return (default_collate(good) if good else None), bad


def _skipped_root(dataset: Dataset) -> Dataset:
    """The dataset that counts skipped files (through ``Subset`` wrappers)."""
    while not hasattr(dataset, "skipped") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # type: ignore[attr-defined]
    return dataset


def container_bits(top: int) -> int:
    """The bit depth (8, 16 or 32) of integer pixels whose largest value is ``top``: values
    below 256 are 8-bit, below 65536 16-bit. One rule for arrays and for image files, so the
    same 16-bit data gives the same 8-bit pixels however it arrives."""
    return 8 if top < 1 << 8 else 16 if top < 1 << 16 else 32


def unreadable_images(stream: Any) -> int:
    """Images of ``stream`` left out because they could not be decoded: those caught when its
    datasets were built and those found truncated only when their batch was read."""
    own = int(getattr(stream, "skipped", 0) or 0)  # a test-time stream counts its own
    roots = {id(r): r for exp in getattr(stream, "experiences", []) or [] for r in (_skipped_root(exp.train), _skipped_root(exp.test)) if r is not None}
    return own + sum(int(getattr(r, "skipped", 0) or 0) for r in roots.values())


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W) with integer labels.

    Batches are cut by indexing the tensors directly (``batches``), which is far cheaper than
    collating one item at a time; ``__getitem__`` keeps the ordinary Dataset protocol.

    Args:
        images: uint8 (N, 3, H, W) or float (N, 3, H, W) in [0, 1].
        targets: integer class labels (N,).
        indices: the samples' positions in the source dataset (default 0..N-1), so that
            every sample keeps its identity through splits.
        tags: constant per-dataset facts added to every batch's extras: ``"task_id"`` (int,
            becomes a (B,) long tensor) and ``"domain"`` (str, becomes a list of B strings).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        indices: torch.Tensor | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.dim() != 4 or images.shape[1] != 3:
            raise StreamError(f"Images must be shaped (N, 3, H, W), got {tuple(images.shape)}; convert grey images to 3 channels.")
        if images.shape[0] != targets.shape[0]:
            raise StreamError(f"{images.shape[0]} images but {targets.shape[0]} labels; give one label per image.")
        self.images = images
        self.targets = targets
        self.indices = torch.arange(len(targets)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.tags: dict[str, Any] = dict(tags or {})
        self.skipped: int = 0  # unreadable source images left out (see streams.folders)
        self.resident: tuple[torch.Tensor, torch.Tensor] | None = None  # device copies (see to_device)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.targets[i]), int(self.indices[i])

    def subset(self, positions: torch.Tensor) -> TensorImageDataset:
        """A new dataset holding the samples at ``positions`` (indices are kept)."""
        return TensorImageDataset(self.images[positions], self.targets[positions], self.indices[positions], self.tags)

    def with_tags(self, **tags: Any) -> TensorImageDataset:
        """The same samples (tensors shared, not copied) with extra batch tags."""
        return TensorImageDataset(self.images, self.targets, self.indices, {**self.tags, **tags})

    def to_device(self, device: torch.device | str) -> TensorImageDataset:
        """Keep a copy of the images (as stored: uint8 stays uint8) and labels on ``device``.

        :meth:`batches` then cuts every batch there, with the same order as before (the
        shuffle is still drawn on the CPU, from the same generator), so no image crosses the
        bus per step. ``images``, ``targets`` and ``indices`` stay on the CPU for everything
        else. A CPU ``device`` drops the copy. Returns the dataset.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
        if device.type == "cpu":
            self.resident = None
        elif self.resident is None or self.resident[0].device != device:
            self.resident = (self.images.to(device), self.targets.to(device))
        return self

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        on_device: torch.Tensor | None = None  # the order on the resident copy's device
        for start in range(0, len(self), batch_size):
            pos = order[start : start + batch_size]
            extras = tag_extras({"index": self.indices[pos]}, self.tags, len(pos))
            resident = self.resident  # read per batch: it may be made while this iterator runs
            if resident is None:
                yield self.images[pos], self.targets[pos], extras
                continue
            if on_device is None or on_device.device != resident[0].device:
                on_device = order.to(resident[0].device)  # one copy per pass, not one per batch
            dev_pos = on_device[start : start + batch_size]
            yield resident[0][dev_pos], resident[1][dev_pos], extras


def tag_extras(extras: dict[str, Any], tags: dict[str, Any], n: int) -> dict[str, Any]:
    """Add constant dataset tags to a batch's extras, expanded to one entry per sample."""
    for key, value in tags.items():
        if key == "domain" or isinstance(value, str):
            extras[key] = [value] * n
        elif isinstance(value, (int, bool)):
            extras[key] = torch.full((n,), int(value), dtype=torch.long)
        else:
            extras[key] = value
    return extras


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
    tags = dict(getattr(dataset, "tags", None) or {})
    loader = DataLoader(
        _SkipUnreadable(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        collate_fn=_collate_readable,
    )
    counter = _skipped_root(dataset)
    for batch, bad in loader:
        if bad:
            # a file that passed the header check but is truncated: skipped and counted (once,
            # whatever the epoch) like one caught when the dataset was built
            known: set[str] = counter.__dict__.setdefault("unreadable_files", set())
            new = [f for f in bad if f not in known]
            known.update(new)
            if new:
                if hasattr(counter, "skipped"):
                    counter.skipped = int(counter.skipped) + len(new)  # type: ignore[attr-defined]
                log.warning("Skipped %d unreadable image(s) while reading a batch (first: %s); remove or replace them to silence this.", len(new), new[0])
        if batch is None:
            continue
        images, targets = batch[0], batch[1]
        extras = {"index": batch[2]} if len(batch) > 2 else {}
        yield images, targets, tag_extras(extras, tags, int(images.shape[0]))


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
        major_classes: for blurry streams, the classes this experience introduces (``classes``
            then also lists the classes of samples that leaked in from other experiences).
    """

    index: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_id: int | None = None
    domain: str | None = None
    major_classes: list[int] | None = None


@dataclass
class Stream:
    """An ordered list of experiences over ``num_classes`` classes.

    Attributes:
        experiences: the experiences, in arrival order.
        num_classes: width of the head.
        class_names: optional names indexed by class id.
        name: the stream's name in logs.
        scenario: ``"class_incremental"``, ``"task_incremental"``, ``"domain_incremental"``
            or ``"blurry"``.
        online: single pass over the training data in arrival order (one epoch, no shuffle).
        boundaries: whether experience boundaries are announced to strategies; with
            ``False`` an online learner must not rely on ``experience_start``/``_end``.
        label_mask: for test-time subsets of a wider label space (ImageNet-A/R), the boolean
            mask of the classes predictions may take; ``None`` means all of them.
    """

    experiences: list[Experience]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "stream"
    scenario: str = "class_incremental"
    online: bool = False
    boundaries: bool = True
    label_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # A continual stream is scored on its test splits; with none at all no metric exists.
        sizes = []
        for exp in self.experiences:
            try:
                sizes.append(len(exp.test))
            except TypeError:  # a test set of unknown length: checked when it is read
                return
        if sizes and not any(sizes):
            raise StreamError(f"No experience of stream '{self.name}' has a test image, so no accuracy can be measured; give it test data (a test split, or test_per_class of at least 1).")

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)
