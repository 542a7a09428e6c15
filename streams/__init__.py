"""Streams: datasets, continual scenarios, corruptions and test-time streams."""

from .base import Experience, Stream, TensorImageDataset, iterate, targets_of
from .corruptions import CORRUPTIONS, corrupt
from .scenarios import blurry, domain_incremental, online, online_batches, task_incremental
from .sources import from_arrays, resolve_path, torchvision_dataset
from .splits import class_incremental
from .synthetic import synthetic_split
from .testtime import DomainSource, TestTimeStream, corruption_domains, test_time_stream
from .transforms import EvalTransform, PretrainedConfig, TrainAugment, eval_transform_for, train_augment_for

__all__ = [
    "CORRUPTIONS",
    "DomainSource",
    "EvalTransform",
    "Experience",
    "PretrainedConfig",
    "Stream",
    "TensorImageDataset",
    "TestTimeStream",
    "TrainAugment",
    "blurry",
    "class_incremental",
    "corrupt",
    "corruption_domains",
    "domain_incremental",
    "eval_transform_for",
    "from_arrays",
    "iterate",
    "online",
    "online_batches",
    "resolve_path",
    "synthetic_split",
    "targets_of",
    "task_incremental",
    "test_time_stream",
    "torchvision_dataset",
    "train_augment_for",
]
