"""Continual scenarios cut from labelled datasets."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from driftprompt.engine.errors import StreamError

from .base import Experience, Stream, TensorImageDataset, targets_of


def _select(dataset: Dataset, targets: torch.Tensor, classes: Sequence[int]) -> Dataset:
    positions = torch.nonzero(torch.isin(targets, torch.as_tensor(list(classes), dtype=torch.long))).flatten()
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(positions)
    subset = Subset(dataset, positions.tolist())
    subset.targets = targets[positions]  # type: ignore[attr-defined]
    return subset


def class_order_for(classes: Sequence[int], class_order: Sequence[int] | None, seed: int | None) -> list[int]:
    """The order in which classes arrive: given explicitly, shuffled by ``seed``, or sorted."""
    classes = sorted(int(c) for c in classes)
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != classes:
            missing = sorted(set(classes) - set(order))
            extra = sorted(set(order) - set(classes))
            dupes = sorted({c for c in order if order.count(c) > 1})
            raise StreamError(
                f"class_order must list every class of the dataset exactly once (missing {missing}, unknown {extra}, repeated {dupes}); fix class_order."
            )
        return order
    if seed is None:
        return classes
    return [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]


def class_incremental(
    train: Dataset,
    test: Dataset,
    n_experiences: int,
    class_order: Sequence[int] | None = None,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    name: str = "class_incremental",
) -> Stream:
    """Split a labelled dataset into experiences with disjoint classes.

    Classes are taken in ``class_order`` (or shuffled by ``seed``; ``seed=None`` keeps them
    sorted) and dealt into ``n_experiences`` consecutive groups whose sizes differ by at most
    one, so no class is ever dropped.

    Args:
        train: training dataset of (image, target[, index]) items.
        test: test dataset over the same classes.
        n_experiences: number of experiences (at most the number of classes).
        class_order: explicit class order; must contain every class once.
        seed: shuffles the class order when ``class_order`` is not given.
        class_names: optional names, indexed by class id.
        num_classes: the head's width (default: largest class id + 1).
        name: the stream's name in logs.
    """
    train_targets = targets_of(train)
    test_targets = targets_of(test)
    classes = sorted(set(train_targets.tolist()))
    if not classes:
        raise StreamError("The training dataset has no samples; give a dataset with at least one labelled image.")
    if n_experiences < 1 or n_experiences > len(classes):
        raise StreamError(f"n_experiences must be between 1 and the number of classes ({len(classes)}), got {n_experiences}; lower n_experiences.")
    order = class_order_for(classes, class_order, seed)
    groups = [list(map(int, g)) for g in np.array_split(np.asarray(order), n_experiences)]
    experiences = [
        Experience(index=i, train=_select(train, train_targets, g), test=_select(test, test_targets, g), classes=sorted(g))
        for i, g in enumerate(groups)
    ]
    width = num_classes if num_classes is not None else max(classes) + 1
    return Stream(experiences, num_classes=width, class_names=list(class_names or []), name=name)
