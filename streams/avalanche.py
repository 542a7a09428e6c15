"""Avalanche benchmarks as driftprompt streams.

Avalanche (Lomonaco et al., "Avalanche: an End-to-End Library for Continual Learning", CVPR
Workshops 2021; ``pip install -e ".[avalanche]"``, avalanche-lib 0.6) describes a benchmark by
a train stream and a test stream of experiences, each with a ``dataset`` whose items are
``(x, y[, task_label])``. :func:`from_avalanche` turns the train stream into driftprompt
experiences and pairs each with its test data. It reads only what every Avalanche 0.6
benchmark has (experiences with a ``dataset``; the datasets' ``targets`` and, when present,
``targets_task_labels``), so the classic generators (``nc_benchmark``, ``ni_benchmark``,
``SplitCIFAR10`` and the like), the new API (``benchmark_from_datasets``, whose
``DatasetExperience`` has no ``classes_in_this_experience``) and online streams
(``split_online_stream``) all convert.

Raw images. Avalanche datasets carry transform groups (``train``/``eval``): SplitCIFAR10, for
one, applies ``ToTensor`` and ``Normalize`` with the CIFAR-10 statistics (ContinualAI/avalanche
v0.6.0 avalanche/benchmarks/classic/ccifar10.py:23-37), while driftprompt's backbones resize and
normalise images themselves. The current transform group is therefore removed with
``AvalancheDataset.remove_current_transform_group()`` (avalanche/benchmarks/utils/data.py:412),
which keeps the frozen groups that carry Avalanche's class remapping, and items are read as the
wrapped dataset returns them (PIL images, uint8 arrays or tensors). The ``train`` group's
augmentations go with it: use the ``augment`` strategy instead. An item that still comes out
normalised (a float tensor outside [0, 1], e.g. from a ``Normalize`` in the wrapped torchvision
dataset's own ``transform``, or with ``keep_transforms=True``) is refused with one sentence
instead of being normalised twice.

Scenario kinds (``Stream.scenario``), found from the data unless ``scenario`` is given:

* ``task_incremental``: the train experiences carry more than one distinct task label
  (``nc_benchmark(task_labels=True)``, ``task_incremental_benchmark``);
* ``class_incremental``: the experiences' classes are disjoint (``nc_benchmark``,
  SplitCIFAR-style benchmarks, ``class_incremental_benchmark``);
* ``domain_incremental``: classes recur across experiences (``ni_benchmark`` and
  ``new_instances_benchmark``, whose train experiences are random parts of one dataset, or
  one dataset per domain).

Test pairing: a test stream as long as the train stream is paired by position. A single test
experience is, for class- and task-incremental streams, filtered to each experience's classes.
For a domain-incremental stream it is one shared test set: Avalanche's new-instances generators
leave it whole because "it is more natural to test on the full test set at each step"
(ContinualAI/avalanche avalanche/benchmarks/scenarios/supervised.py:295-297). It becomes the
test set of experience 0 only and the later experiences have none, so row ``i`` of the accuracy
matrix evaluates the shared set once, in column 0, instead of repeating it in identical columns:
the final average accuracy is the shared-set accuracy after the last experience and the average
incremental accuracy its mean over the rows. The later columns are listed under
``empty_test_experiences``, which forgetting and backward transfer leave out: they are taken
over the shared set alone (forgetting ``max_{i<T-1} a[i, 0] - a[T-1, 0]``, backward transfer
``a[T-1, 0] - a[0, 0]``), never over copies of one column.

Online streams: the sub-experiences of ``split_online_stream`` (``OnlineCLExperience``,
ContinualAI/avalanche avalanche/benchmarks/scenarios/online.py:106) are grouped back by their
``origin_experience``, in arrival order, and the stream is marked online
(:func:`~driftprompt.streams.scenarios.online`: one pass in stored order), with boundaries
exposed only when the sub-experiences were made with ``access_task_boundaries=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError

from .base import Experience, Stream
from .scenarios import online as mark_online

KINDS = ("class_incremental", "task_incremental", "domain_incremental")


def avalanche_available() -> bool:
    """True when ``avalanche`` (avalanche-lib) is installed; found without importing it, which takes seconds."""
    return importlib.util.find_spec("avalanche") is not None


def _to_image(x: Any) -> torch.Tensor:
    """A (3, H, W) tensor from what an Avalanche item holds: a tensor (float 0-1 or uint8), an array or a PIL image."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x.convert("RGB") if hasattr(x, "convert") else x)
        x = torch.from_numpy(arr.copy())
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x


def _check_range(image: torch.Tensor, where: str) -> None:
    """Refuse an image that has already been normalised (a float tensor outside [0, 1])."""
    if image.is_floating_point() and image.numel():
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise StreamError(
                f"{where} yields images already normalised (values {low:.2f}..{high:.2f}) and driftprompt normalises for its backbone itself; "
                "remove Normalize from the wrapped dataset's own transform (Avalanche's transform groups are removed unless keep_transforms=True)."
            )


def _raw(dataset: Any, keep_transforms: bool) -> Any:
    """The dataset without its current Avalanche transform group (frozen groups, e.g. class remapping, stay)."""
    if keep_transforms or not hasattr(dataset, "remove_current_transform_group"):
        return dataset
    return dataset.remove_current_transform_group()


def _targets(dataset: Any) -> list[int]:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return [int(dataset[i][1]) for i in range(len(dataset))]
    return [int(t) for t in targets]


class AvalancheItems(Dataset):
    """Avalanche datasets, one after another, seen as ``(image, target, index)`` items.

    Args:
        datasets: Avalanche datasets (several for an online experience's sub-experiences).
        task_id: added to every batch's extras as ``"task_id"`` when not ``None``.
        offset: ``index`` is the position in the concatenation plus ``offset``, so that the
            samples of different experiences keep distinct ids.
        keep_transforms: read items through the datasets' current transform group instead
            of removing it.
    """

    def __init__(self, datasets: Any, task_id: int | None = None, offset: int = 0, keep_transforms: bool = False) -> None:
        parts = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
        self.parts = [_raw(d, keep_transforms) for d in parts]
        self.starts = np.cumsum([0] + [len(d) for d in self.parts])
        self.targets = torch.as_tensor([t for d in self.parts for t in _targets(d)], dtype=torch.long)
        self.offset = offset
        self.tags: dict[str, Any] = {} if task_id is None else {"task_id": int(task_id)}
        self.size: tuple[int, ...] | None = None  # (H, W) of the first item, once checked

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        item = self.parts[k][i - int(self.starts[k])]
        image = _to_image(item[0])
        if self.size is not None and tuple(image.shape[1:]) != self.size:
            raise StreamError(
                f"The Avalanche images differ in size ({self.size[0]}x{self.size[1]} and {image.shape[1]}x{image.shape[2]}) and cannot be batched raw; "
                "give the benchmark transform groups that resize without normalising (Resize and PILToTensor) and convert with keep_transforms=True."
            )
        return image, int(item[1]), self.offset + i

    def check_range(self, where: str) -> None:
        """Raise :class:`StreamError` when the first item is already normalised; later items must have its size."""
        if len(self):
            image = self[0][0]
            _check_range(image, where)
            self.size = tuple(image.shape[1:])


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


@contextlib.contextmanager
def _unmasked(exp: Any) -> Iterator[None]:
    """Read an Avalanche experience's attributes whatever its mode (train/eval copies mask some)."""
    unmask = getattr(exp, "no_attribute_masking", None)
    with unmask() if unmask is not None else contextlib.nullcontext():
        yield


def _attr(exp: Any, name: str, default: Any = None) -> Any:
    with _unmasked(exp):
        try:
            return getattr(exp, name, default)
        except ValueError:  # avalanche's MaskedAttributeError
            return default


def _task_labels(datasets: Sequence[Any], exp: Any) -> list[int]:
    """The task labels present in an experience: from its datasets, else the experience, else 0."""
    attrs = [getattr(d, "targets_task_labels", None) for d in datasets]
    if attrs and all(a is not None for a in attrs):
        labels = {int(t) for a in attrs for t in (a.uniques if hasattr(a, "uniques") else a)}
        if labels:
            return sorted(labels)
    declared = _attr(exp, "task_labels")
    return sorted({int(t) for t in declared}) if declared else [0]


def _group_online(train: list[Any]) -> tuple[list[tuple[Any, list[Any]]], bool | None]:
    """Group sub-experiences of ``split_online_stream`` by ``origin_experience``.

    Returns ``[(representative experience, [datasets])]`` in arrival order and, for an online
    stream, whether boundaries were exposed (``access_task_boundaries``); ``None`` otherwise.
    """
    if not any(_attr(e, "sub_stream_length") is not None or _attr(e, "origin_experience") is not None for e in train):
        return [(e, [e.dataset]) for e in train], None
    groups: list[tuple[Any, list[Any]]] = []
    origin_of_last: Any = None
    boundaries = False
    for e in train:
        origin = _attr(e, "origin_experience")
        if origin is None:
            raise StreamError("An online Avalanche sub-experience has no origin_experience (continuous linear decay streams have none); split the stream with split_online_stream's fixed-size split instead.")
        boundaries = boundaries or bool(_attr(e, "access_task_boundaries", False))
        if groups and origin is origin_of_last:
            groups[-1][1].append(e.dataset)
        else:
            groups.append((origin, [e.dataset]))
        origin_of_last = origin
    return groups, boundaries


def scenario_kind(class_sets: Sequence[set[int]], task_labels: Sequence[Sequence[int]]) -> str:
    """The driftprompt scenario of an Avalanche train stream, from its classes and task labels.

    More than one distinct task label: ``task_incremental``; classes shared by two experiences
    (new instances of known classes): ``domain_incremental``; otherwise ``class_incremental``.
    """
    if len({t for labels in task_labels for t in labels}) > 1:
        return "task_incremental"
    seen: set[int] = set()
    for classes in class_sets:
        if seen & classes:
            return "domain_incremental"
        seen |= classes
    return "class_incremental"


def _streams(benchmark: Any, train_stream: Any, test_stream: Any) -> tuple[Iterable[Any], Iterable[Any]]:
    """The train and test streams: given, else the benchmark's (an ``OnlineCLScenario``'s online and original ones)."""
    for name in ("train_stream", "train_online_stream"):
        train_stream = getattr(benchmark, name, None) if train_stream is None else train_stream
    for name in ("test_stream", "original_test_stream"):
        test_stream = getattr(benchmark, name, None) if test_stream is None else test_stream
    if train_stream is None or test_stream is None:
        what = "nothing" if benchmark is None else type(benchmark).__name__
        raise StreamError(f"{what} is not an Avalanche benchmark (no train_stream/test_stream); pass e.g. avalanche.benchmarks.nc_benchmark(...), or train_stream= and test_stream=.")
    return train_stream, test_stream


def from_avalanche(
    benchmark: Any = None,
    *,
    train_stream: Any = None,
    test_stream: Any = None,
    scenario: str | None = None,
    keep_transforms: bool = False,
    name: str = "avalanche",
) -> Stream:
    """Convert an Avalanche benchmark (or a train and a test stream) into a :class:`Stream`.

    Args:
        benchmark: an Avalanche benchmark: anything with ``train_stream`` and ``test_stream``
            (an ``OnlineCLScenario``'s ``train_online_stream`` and ``original_test_stream`` too).
        train_stream: the train stream to use instead of the benchmark's, e.g.
            ``split_online_stream(benchmark.train_stream, experience_size=10)``.
        test_stream: the test stream to use instead of the benchmark's.
        scenario: ``class_incremental``, ``task_incremental`` or ``domain_incremental``;
            by default found from the data (see the module docstring). Task-incremental
            streams expose ``Experience.task_id`` and a ``"task_id"`` batch extra.
        keep_transforms: read items through Avalanche's current transform group (for
            transforms that keep images raw, such as a resize) instead of removing it;
            normalised items are refused either way.
        name: the stream's name in logs.

    Raises:
        StreamError: no train/test stream, an empty train stream, a test stream that is
            neither one experience nor one per train experience, several task labels in one
            experience, normalised images, or an unknown ``scenario``.
    """
    if scenario is not None and scenario not in KINDS:
        raise StreamError(f"Unknown Avalanche scenario '{scenario}'; use one of {', '.join(KINDS)}, or leave it out to detect it.")
    train_s, test_s = _streams(benchmark, train_stream, test_stream)
    groups, boundaries = _group_online(list(train_s))
    test = list(test_s)
    if not groups:
        raise StreamError("The Avalanche benchmark's train stream is empty; build it with at least one experience.")
    if len(test) not in (1, len(groups)):
        unit = "origin experiences of the online stream" if boundaries is not None else "train experiences"
        raise StreamError(f"The Avalanche test stream has {len(test)} experiences for {len(groups)} {unit}; use a test stream with one experience or one per train experience.")

    tasks = []
    for exp, datasets in groups:
        labels = _task_labels(datasets, exp)
        if len(labels) > 1:
            raise StreamError("An Avalanche experience holds several task labels; split it into one experience per task first.")
        tasks.append(labels)
    train_sets = [AvalancheItems(datasets, None, 0, keep_transforms) for _, datasets in groups]
    class_sets = [set(t.targets.tolist()) for t in train_sets]
    kind = scenario or scenario_kind(class_sets, tasks)
    one_test = len(test) == 1 and len(groups) > 1
    if kind == "task_incremental" and one_test and scenario_kind(class_sets, [[0]]) == "domain_incremental":
        raise StreamError("The Avalanche benchmark has a task label per train experience but one shared test set, so a test image's task is unknown; build it with task_labels=False (new instances) or with one test experience per task.")

    experiences = []
    offset = 0
    shared = AvalancheItems(test[0].dataset, None, 10**9, keep_transforms) if one_test else None
    for i, ((exp, _), tr) in enumerate(zip(groups, train_sets)):
        task = tasks[i][0] if kind == "task_incremental" else None
        tr.offset, tr.tags = offset, ({} if task is None else {"task_id": task})
        offset += len(tr)
        tr.check_range(f"Avalanche train experience {i}")
        classes = sorted(class_sets[i])
        te: Dataset
        if shared is None:
            te = AvalancheItems(test[i].dataset, task, 10**9 + i * 10**7, keep_transforms)
            te.check_range(f"Avalanche test experience {i}")
        elif kind == "domain_incremental":
            te = shared if i == 0 else _Filtered(shared, torch.zeros(0, dtype=torch.long))
        else:
            keep = torch.nonzero(torch.isin(shared.targets, torch.tensor(classes))).flatten()
            te = _Filtered(shared, keep)
            te.tags = {} if task is None else {"task_id": task}
        experiences.append(Experience(index=i, train=tr, test=te, classes=classes, task_id=task))
    if shared is not None:
        shared.check_range("The Avalanche test experience")
    targets = [int(e.train.targets.max()) for e in experiences if len(e.train)] + [int(e.test.targets.max()) for e in experiences if len(e.test)]
    n_classes = int(getattr(benchmark, "n_classes", 0) or (max(targets) + 1 if targets else 0))
    stream = Stream(experiences, num_classes=n_classes, name=name, scenario=kind)
    return mark_online(stream, boundaries=boundaries) if boundaries is not None else stream


__all__ = ["AvalancheItems", "KINDS", "avalanche_available", "from_avalanche", "scenario_kind"]
