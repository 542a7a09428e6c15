"""Shared fixtures of the stream tests: the CIFAR-10 archive (skipped when absent) and tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from driftprompt.streams import TensorImageDataset

REPO = Path(__file__).resolve().parents[2]
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"


def data_dir() -> Path | None:
    """$DRIFTPROMPT_DATA, else ../shared/data next to the repository, when it holds the archive."""
    for candidate in (os.environ.get("DRIFTPROMPT_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / ARCHIVE_NAME).is_file():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    found = data_dir()
    if found is None:
        pytest.skip(f"{ARCHIVE_NAME} not found: set DRIFTPROMPT_DATA to the folder that holds it (or place it in ../shared/data)")
    return found


def labelled(num_classes: int, per_class: int, size: int = 8, seed: int = 0) -> TensorImageDataset:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(targets), 3, size, size), dtype=torch.uint8, generator=gen)
    return TensorImageDataset(images, targets)
