"""Continual scenarios beyond plain class-incremental splits.

* task-incremental: class-incremental experiences that also carry a task id (van de Ven &
  Tolias, "Three scenarios for continual learning", 2019);
* domain-incremental: the same classes in every experience, each experience a new domain,
  here a corruption (Hendrycks & Dietterich, ICLR 2019) or any image function;
* blurry: class-incremental experiences with leaked samples, Blurry-M (Bang et al., "Rainbow
  Memory", CVPR 2021) and its i-Blurry-N-M generalisation (Koh et al., "Online Continual
  Learning on Class Incremental Blurry Task Configuration with Anytime Inference", ICLR 2022);
* online: any of the above, marked for a single pass in arrival order, with boundaries
  exposed or hidden.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError

from .base import Experience, Stream, TensorImageDataset, targets_of
from .splits import class_incremental, class_order_for

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental", "blurry")


def task_incremental(train: Dataset, test: Dataset, n_experiences: int, **kwargs: object) -> Stream:
    """Class-incremental experiences whose task ids are known at training and test time.

    Experience ``i`` has ``task_id = i``; its datasets add ``"task_id"`` to every batch's extras
    (a (B,) long tensor). Arguments as :func:`~driftprompt.streams.splits.class_incremental`.
    """
    stream = class_incremental(train, test, n_experiences, **kwargs)  # type: ignore[arg-type]
    for exp in stream:
        exp.task_id = exp.index
        exp.train = _tagged(exp.train, task_id=exp.index)
        exp.test = _tagged(exp.test, task_id=exp.index)
    stream.scenario = "task_incremental"
    return stream


def _tagged(dataset: Dataset, **tags: object) -> Dataset:
    if isinstance(dataset, TensorImageDataset):
        return dataset.with_tags(**tags)
    merged = {**(getattr(dataset, "tags", None) or {}), **tags}
    dataset.tags = merged  # type: ignore[attr-defined]
    return dataset


def domain_incremental(
    train: TensorImageDataset,
    test: TensorImageDataset,
    domains: Sequence[str],
    transform: Callable[[torch.Tensor, str, int], torch.Tensor],
    share_samples: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "domain_incremental",
    chunk: int = 512,
) -> Stream:
    """The same classes under a sequence of domains, one experience per domain.

    Args:
        train, test: in-memory source datasets.
        domains: domain names, in arrival order.
        transform: ``transform(images, domain, chunk_seed)`` maps a uint8 batch into the
            domain (deterministic for a given seed).
        share_samples: every experience sees all samples (in its own domain); by default the
            samples are dealt into disjoint, class-stratified parts, one per domain, so that no
            image is seen twice.
        seed: seeds the dealing and the domain transforms.
        chunk: images transformed per call (results do not depend on the batch size later).
    """
    if not domains:
        raise StreamError("The domain list is empty; give at least one domain (e.g. a corruption name).")
    train_parts = _deal(train, len(domains), seed, share_samples)
    test_parts = _deal(test, len(domains), seed + 1, share_samples)
    classes = sorted(set(targets_of(train).tolist()))
    experiences = []
    for i, domain in enumerate(domains):
        tr = _apply(train_parts[i], domain, transform, seed * 1000 + 2 * i, chunk).with_tags(domain=domain)
        te = _apply(test_parts[i], domain, transform, seed * 1000 + 2 * i + 1, chunk).with_tags(domain=domain)
        experiences.append(Experience(index=i, train=tr, test=te, classes=classes, domain=domain))
    width = num_classes if num_classes is not None else max(classes) + 1
    return Stream(experiences, num_classes=width, class_names=list(class_names or []), name=name, scenario="domain_incremental")


def _deal(dataset: TensorImageDataset, n: int, seed: int, share: bool) -> list[TensorImageDataset]:
    """Split into ``n`` class-stratified parts whose sizes per class differ by at most one."""
    if share:
        return [dataset] * n
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for c in torch.unique(dataset.targets).tolist():
        pos = torch.nonzero(dataset.targets == c).flatten()
        pos = pos[torch.randperm(len(pos), generator=gen)]
        for k, piece in enumerate(torch.tensor_split(pos, n)):
            parts[k].append(piece)
    out = [dataset.subset(torch.cat(p).sort().values) for p in parts]
    if any(len(p) == 0 for p in out):
        raise StreamError(f"{len(dataset)} samples cannot fill {n} domains; use fewer domains, more samples per class, or share_samples: true.")
    return out


def _apply(ds: TensorImageDataset, domain: str, transform: Callable[[torch.Tensor, str, int], torch.Tensor], seed: int, chunk: int) -> TensorImageDataset:
    pieces = [transform(ds.images[s : s + chunk], domain, seed * 100003 + k) for k, s in enumerate(range(0, len(ds), chunk))]
    images = torch.cat(pieces) if pieces else ds.images
    return TensorImageDataset(images, ds.targets, ds.indices, ds.tags)


def blurry(
    train: Dataset,
    test: Dataset,
    n_experiences: int,
    leak: float = 0.1,
    disjoint_fraction: float = 0.0,
    class_order: Sequence[int] | None = None,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    name: str = "blurry",
) -> Stream:
    """Class-incremental experiences with blurry boundaries (i-Blurry-N-M; Blurry-M for N=0).

    Exact definition used here:

    1. Classes are ordered (``class_order``, or shuffled by ``seed``) and dealt into
       ``n_experiences`` groups as in :func:`class_incremental`: each class has a *home*
       experience.
    2. The first ``round(disjoint_fraction * C)`` classes of the order are *disjoint*: all their
       training samples stay at home. The other classes are *blurry*.
    3. For every blurry class with ``n`` training samples, ``round(leak * n)`` of them, chosen
       uniformly at random, move to other experiences, each to one drawn uniformly among the
       experiences other than its home.

    ``disjoint_fraction=0`` is Blurry-M of Bang et al. (M = 100 * leak); ``disjoint_fraction``
    N/100 with ``leak`` M/100 is i-Blurry-N-M of Koh et al. Test sets are not blurred: the test
    set of experience ``i`` holds its home classes. ``Experience.classes`` lists every class
    present in the experience's training data (home and leaked, so logit masks admit them),
    ``Experience.major_classes`` only the home classes.
    """
    if not 0.0 <= leak <= 1.0:
        raise StreamError(f"blurry leak must lie in [0, 1], got {leak}; use e.g. 0.1 for Blurry-10.")
    if not 0.0 <= disjoint_fraction <= 1.0:
        raise StreamError(f"disjoint_fraction must lie in [0, 1], got {disjoint_fraction}; use e.g. 0.5 for i-Blurry-50.")
    base = class_incremental(train, test, n_experiences, class_order=class_order, seed=seed, class_names=class_names, num_classes=num_classes, name=name)
    if not isinstance(train, TensorImageDataset):
        raise StreamError("Blurry streams need an in-memory dataset; load the data with an in-memory source (in_memory: true).")
    if n_experiences == 1 or leak == 0.0:
        for exp in base:
            exp.major_classes = list(exp.classes)
        base.scenario = "blurry"
        return base
    order = class_order_for(sorted(set(train.targets.tolist())), class_order, seed)
    home = {c: i for i, exp in enumerate(base) for c in exp.classes}
    n_disjoint = round(disjoint_fraction * len(order))
    blurry_classes = order[n_disjoint:]
    rng = np.random.default_rng(0 if seed is None else seed)
    assignment = torch.tensor([home[int(t)] for t in train.targets.tolist()], dtype=torch.long)
    for c in blurry_classes:
        pos = torch.nonzero(train.targets == c).flatten().numpy()
        moved = rng.choice(pos, size=round(leak * len(pos)), replace=False)
        others = [k for k in range(n_experiences) if k != home[c]]
        assignment[torch.as_tensor(moved, dtype=torch.long)] = torch.as_tensor(rng.choice(others, size=len(moved)), dtype=torch.long)
    experiences = []
    for exp in base:
        part = train.subset(torch.nonzero(assignment == exp.index).flatten())
        present = sorted(set(part.targets.tolist()))
        experiences.append(replace(exp, train=part, classes=present, major_classes=list(exp.classes)))
    return replace(base, experiences=experiences, scenario="blurry")


def online(stream: Stream, boundaries: bool = True) -> Stream:
    """Mark a stream for single-pass online learning in arrival order.

    The experiences keep their data; ``stream.online`` asks the loop for one epoch without
    shuffling and ``stream.boundaries`` says whether strategies may be told where experiences
    begin and end. :func:`online_batches` yields the whole training sequence as one run of
    batches, with ``"experience"`` in the extras only when boundaries are exposed.
    """
    stream.online = True
    stream.boundaries = boundaries
    return stream


def online_batches(stream: Stream, batch_size: int) -> object:
    """Yield every training sample once, experience after experience, in stored order."""
    from .base import iterate

    for exp in stream:
        for images, targets, extras in iterate(exp.train, batch_size, shuffle=False):
            if stream.boundaries:
                extras["experience"] = torch.full((images.shape[0],), exp.index, dtype=torch.long)
            yield images, targets, extras


def shuffle_within(stream: Stream, seed: int = 0) -> Stream:
    """Fix a random arrival order inside every training set (online streams are not reshuffled)."""
    gen = torch.Generator().manual_seed(seed)
    for exp in stream:
        if isinstance(exp.train, TensorImageDataset):
            exp.train = exp.train.subset(torch.randperm(len(exp.train), generator=gen))
    return stream


def joint(stream: Stream) -> Stream:
    """Every experience of ``stream`` merged into one: the joint-training upper bound.

    The single experience trains on the union of the training sets, knows every class of the
    stream, and is tested on the union of the test sets, so a run's accuracy matrix has one
    row and one column. In-memory experiences of one image size are concatenated into one
    :class:`TensorImageDataset` (sample indices kept; per-experience tags such as
    ``task_id`` and ``domain`` are dropped, since one experience has one task and no single
    domain); others become a ``ConcatDataset`` with ``targets``.
    """
    from torch.utils.data import ConcatDataset

    if len(stream) == 0:
        raise StreamError("The stream has no experience to merge; give joint a stream with at least one experience.")

    def merge(parts: list[Dataset]) -> Dataset:
        tensors = [p for p in parts if isinstance(p, TensorImageDataset)]
        if len(tensors) == len(parts) and len({(tuple(p.images.shape[1:]), p.images.dtype) for p in tensors}) == 1:
            return TensorImageDataset(torch.cat([p.images for p in tensors]), torch.cat([p.targets for p in tensors]), torch.cat([p.indices for p in tensors]))
        merged = ConcatDataset([p for p in parts if len(p)])  # type: ignore[arg-type]
        merged.targets = torch.cat([targets_of(p) for p in parts if len(p)])  # type: ignore[attr-defined]
        return merged

    classes = sorted({c for exp in stream for c in exp.classes})
    single = Experience(index=0, train=merge([exp.train for exp in stream]), test=merge([exp.test for exp in stream]), classes=classes)
    scenario = "class_incremental" if stream.scenario in ("task_incremental", "blurry") else stream.scenario
    return Stream([single], num_classes=stream.num_classes, class_names=list(stream.class_names), name=f"{stream.name}-joint", scenario=scenario)


def check_experiences(n_experiences: int, n_classes: int) -> None:
    """Refuse more experiences than classes, with the fix."""
    if n_experiences < 1 or n_experiences > n_classes:
        raise StreamError(f"n_experiences must be between 1 and the number of classes ({n_classes}), got {n_experiences}; lower n_experiences.")


__all__ = ["SCENARIOS", "blurry", "domain_incremental", "online", "online_batches", "shuffle_within", "task_incremental"]
