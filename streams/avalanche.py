"""Avalanche benchmarks as driftprompt streams.

Avalanche (Lomonaco et al., "Avalanche: an End-to-End Library for Continual Learning", CVPR
Workshops 2021; ``pip install -e ".[avalanche]"``) describes a benchmark by its
``train_stream`` and ``test_stream``; each experience has a ``dataset`` whose items are
``(x, y, task_label, ...)``, the ids ``classes_in_this_experience`` and a ``task_label``.
:func:`from_avalanche` turns the train stream into driftprompt experiences (one per Avalanche
experience) and pairs each with its test data. Only these documented attributes are used, so
benchmarks built with ``nc_benchmark``, ``ni_benchmark``, ``SplitCIFAR10`` and the like work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError

from .base import Experience, Stream


def avalanche_available() -> bool:
    """True when ``avalanche`` (avalanche-lib) can be imported."""
    try:
        import avalanche  # noqa: F401
    except ImportError:
        return False
    return True


def _to_image(x: Any) -> torch.Tensor:
    """A (3, H, W) tensor from what an Avalanche item holds: a tensor (float 0-1 or uint8) or a PIL image."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x.convert("RGB") if hasattr(x, "convert") else x)
        x = torch.from_numpy(arr.copy())
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x


class AvalancheItems(Dataset):
    """An Avalanche dataset seen as ``(image, target, index)`` items with a ``targets`` tensor.

    ``index`` is the position in the Avalanche dataset, prefixed by ``offset`` so that samples
    of different experiences keep distinct ids.
    """

    def __init__(self, dataset: Any, task_id: int | None = None, offset: int = 0) -> None:
        self.dataset = dataset
        self.targets = torch.as_tensor([int(t) for t in dataset.targets], dtype=torch.long)
        self.offset = offset
        self.tags: dict[str, Any] = {} if task_id is None else {"task_id": int(task_id)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        item = self.dataset[i]
        return _to_image(item[0]), int(item[1]), self.offset + i


def _task(exp: Any) -> int | None:
    labels = getattr(exp, "task_labels", None)
    if labels is not None and len(set(labels)) > 1:
        raise StreamError("An Avalanche experience holds several task labels; split it into one experience per task first.")
    return int(getattr(exp, "task_label", labels[0] if labels else 0))


def from_avalanche(benchmark: Any, task_incremental: bool | None = None, name: str = "avalanche") -> Stream:
    """Convert an Avalanche benchmark.

    Args:
        benchmark: an object with ``train_stream`` and ``test_stream`` (and ``n_classes``).
        task_incremental: expose task ids (``Experience.task_id`` and a ``"task_id"`` batch
            extra); default: when the train stream has more than one distinct task label.
        name: the stream's name in logs.

    Pairing: a test stream as long as the train stream is paired by position; a single test
    experience is filtered, for each train experience, to that experience's classes.
    """
    if not hasattr(benchmark, "train_stream") or not hasattr(benchmark, "test_stream"):
        raise StreamError(f"{type(benchmark).__name__} is not an Avalanche benchmark (no train_stream/test_stream); pass e.g. avalanche.benchmarks.classic.SplitCIFAR10(...).")
    train = list(benchmark.train_stream)
    test = list(benchmark.test_stream)
    if not train:
        raise StreamError("The Avalanche benchmark's train stream is empty; build it with at least one experience.")
    if len(test) not in (1, len(train)):
        raise StreamError(f"The Avalanche test stream has {len(test)} experiences for {len(train)} train experiences; use a benchmark whose test stream has one experience or one per train experience.")
    tasks = [_task(e) for e in train]
    if task_incremental is None:
        task_incremental = len(set(tasks)) > 1
    experiences = []
    offset = 0
    for i, exp in enumerate(train):
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        task = tasks[i] if task_incremental else None
        tr = AvalancheItems(exp.dataset, task, offset)
        offset += len(tr)
        if len(test) == len(train):
            te: Dataset = AvalancheItems(test[i].dataset, task, 10**9 + i * 10**7)
        else:
            whole = AvalancheItems(test[0].dataset, task, 10**9)
            keep = torch.nonzero(torch.isin(whole.targets, torch.tensor(classes))).flatten()
            te = _Filtered(whole, keep)
        experiences.append(Experience(index=i, train=tr, test=te, classes=classes, task_id=task))
    n_classes = int(getattr(benchmark, "n_classes", 0) or max(max(e.classes) for e in experiences) + 1)
    return Stream(experiences, num_classes=n_classes, name=name, scenario="task_incremental" if task_incremental else "class_incremental")


class _Filtered(Dataset):
    def __init__(self, base: AvalancheItems, keep: torch.Tensor) -> None:
        self.base = base
        self.keep = keep
        self.targets = base.targets[keep]
        self.tags = base.tags

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.base[int(self.keep[i])]
