"""Built-in stream builders, announced through the ``driftprompt`` entry-point group."""

from __future__ import annotations

from typing import Sequence

from driftprompt.engine.hookspecs import hookimpl

from .base import Stream
from .splits import class_incremental
from .synthetic import synthetic_split


def synthetic_class_incremental(
    num_classes: int = 10,
    n_experiences: int = 5,
    train_per_class: int = 64,
    test_per_class: int = 32,
    image_size: int = 32,
    difficulty: float = 0.6,
    class_order: Sequence[int] | None = None,
    seed: int = 0,
) -> Stream:
    """Class-incremental stream of synthetic colour-field images (no download, for demos and tests)."""
    train, test = synthetic_split(num_classes, train_per_class, test_per_class, image_size, seed, difficulty)
    return class_incremental(train, test, n_experiences, class_order=class_order, seed=seed, name="synthetic")


@hookimpl
def register_streams(register):  # type: ignore[no-untyped-def]
    register("synthetic", synthetic_class_incremental)
