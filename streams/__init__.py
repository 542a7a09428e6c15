"""Streams: datasets, continual scenarios and test-time streams."""

from .base import Experience, Stream, TensorImageDataset, iterate, targets_of
from .splits import class_incremental
from .synthetic import synthetic_split

__all__ = ["Experience", "Stream", "TensorImageDataset", "class_incremental", "iterate", "synthetic_split", "targets_of"]
