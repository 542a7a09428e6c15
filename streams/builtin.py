"""Built-in stream builders, announced through the ``driftprompt`` entry-point group.

A config names a builder and its options::

    stream:
      name: image_tar
      options: {path: cifar10-jpeg.tar.gz, scenario: class_incremental, n_experiences: 5}

Continual builders (``cifar10``, ``cifar100``, ``torchvision``, ``image_folder``,
``image_tar``) share the scenario options documented in :func:`make_scenario`; test-time
builders (``corruption_test_time``, ``imagenet_test_time``) return a
:class:`~driftprompt.streams.testtime.TestTimeStream`.
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

import torch
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError
from driftprompt.engine.hookspecs import hookimpl

from .base import Stream, TensorImageDataset, targets_of
from .corruptions import CORRUPTIONS, check_corruption, corrupt
from .folders import files_of, lazy_splits, read_class_names, read_folder, read_tar, stratified_split
from .imagenet import class_names as imagenet_class_names
from .imagenet import imagenet_variant, label_mask, subset_indices
from .scenarios import SCENARIOS, blurry, domain_incremental, online, shuffle_within, task_incremental
from .sources import limit_per_class, resolve_path, torchvision_dataset
from .splits import class_incremental
from .synthetic import synthetic_split
from .testtime import DomainSource, TestTimeStream, corruption_domains, test_time_stream

#: ``class_order`` option: an explicit list, ``"natural"`` (the dataset's label order 0, 1, 2, ...,
#: as the L2P, DualPrompt and CODA-Prompt reference code uses), or ``None`` (shuffled by ``seed``).
ClassOrder = Union[Sequence[int], Literal["natural"], None]


def resolve_class_order(class_order: ClassOrder, train: Dataset) -> Sequence[int] | None:
    """``"natural"`` becomes the sorted labels of ``train``; anything else is returned as it is."""
    if isinstance(class_order, str):
        if class_order != "natural":
            raise StreamError(f"class_order '{class_order}' is not known; give 'natural', a list of every class, or leave it out to shuffle by seed.")
        return sorted(int(c) for c in torch.unique(targets_of(train)).tolist())
    return class_order


def synthetic_class_incremental(
    num_classes: int = 10,
    n_experiences: int = 5,
    train_per_class: int = 64,
    test_per_class: int = 32,
    image_size: int = 32,
    difficulty: float = 0.6,
    class_order: ClassOrder = None,
    seed: int = 0,
) -> Stream:
    """Class-incremental stream of synthetic colour-field images (no download, for demos and tests)."""
    train, test = synthetic_split(num_classes, train_per_class, test_per_class, image_size, seed, difficulty)
    return class_incremental(train, test, n_experiences, class_order=resolve_class_order(class_order, train), seed=seed, name="synthetic")


def make_scenario(
    train: Dataset,
    test: Dataset,
    class_names: Sequence[str],
    name: str,
    scenario: str = "class_incremental",
    n_experiences: int = 5,
    class_order: ClassOrder = None,
    seed: int = 0,
    leak: float = 0.1,
    disjoint_fraction: float = 0.0,
    domains: Sequence[str] | None = None,
    severity: int = 5,
    share_samples: bool = False,
    online_pass: bool = False,
    boundaries: bool = True,
) -> Stream:
    """Cut a labelled dataset into a continual stream.

    Args:
        scenario: ``class_incremental``, ``task_incremental``, ``domain_incremental`` or
            ``blurry``.
        n_experiences: experiences (class- and task-incremental, blurry).
        class_order: explicit class order, or ``"natural"`` for the label order 0, 1, 2, ...;
            left out, ``seed`` shuffles the classes.
        leak, disjoint_fraction: blurry-boundary parameters (see ``scenarios.blurry``).
        domains: corruption names, one experience each (domain-incremental; default all 15).
        severity: corruption severity 1-5 of every domain.
        share_samples: every domain sees all samples (default: disjoint parts).
        online_pass: single pass in arrival order (the order is fixed by ``seed``).
        boundaries: expose experience boundaries (only meaningful with ``online_pass``).
    """
    width = len(class_names) or int(targets_of(train).max()) + 1
    class_order = resolve_class_order(class_order, train)
    if scenario == "class_incremental":
        stream = class_incremental(train, test, n_experiences, class_order=class_order, seed=seed, class_names=class_names, num_classes=width, name=name)
    elif scenario == "task_incremental":
        stream = task_incremental(train, test, n_experiences, class_order=class_order, seed=seed, class_names=class_names, num_classes=width, name=name)
    elif scenario == "blurry":
        stream = blurry(train, test, n_experiences, leak=leak, disjoint_fraction=disjoint_fraction, class_order=class_order, seed=seed, class_names=class_names, num_classes=width, name=name)
    elif scenario == "domain_incremental":
        names = list(domains) if domains is not None else list(CORRUPTIONS)
        for d in names:
            check_corruption(d, severity)
        labels = {f"{d}-{severity}": d for d in names}

        def transform(images: torch.Tensor, domain: str, chunk_seed: int) -> torch.Tensor:
            return corrupt(images, labels[domain], severity, seed=chunk_seed)

        stream = domain_incremental(train, test, list(labels), transform, share_samples=share_samples, seed=seed, num_classes=width, class_names=class_names, name=name)
    else:
        raise StreamError(f"Unknown scenario '{scenario}'; use one of {', '.join(SCENARIOS)}.")
    if online_pass:
        stream = online(shuffle_within(stream, seed), boundaries)
    return stream


def _names(names: list[str], class_names_file: str | None, root: str | None) -> list[str]:
    if class_names_file is None:
        return names
    return read_class_names(resolve_path(class_names_file, root, "class_names_file"), len(names))


def _limit(train: TensorImageDataset, test: TensorImageDataset, per_class: int | None, test_per_class: int | None, seed: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    return limit_per_class(train, per_class, seed), limit_per_class(test, test_per_class if test_per_class is not None else per_class, seed)


def torchvision_stream(
    dataset: str = "cifar10",
    root: str | None = None,
    download: bool = False,
    per_class: int | None = None,
    test_per_class: int | None = None,
    scenario: str = "class_incremental",
    n_experiences: int = 5,
    class_order: ClassOrder = None,
    seed: int = 0,
    leak: float = 0.1,
    disjoint_fraction: float = 0.0,
    domains: Sequence[str] | None = None,
    severity: int = 5,
    share_samples: bool = False,
    online_pass: bool = False,
    boundaries: bool = True,
) -> Stream:
    """A torchvision dataset (cifar10, cifar100, mnist, ...) cut into a continual scenario; downloads only with download: true."""
    train, names = torchvision_dataset(dataset, root, True, download)
    test, _ = torchvision_dataset(dataset, root, False, download)
    train, test = _limit(train, test, per_class, test_per_class, seed)
    return make_scenario(train, test, names, dataset, scenario, n_experiences, class_order, seed, leak, disjoint_fraction, domains, severity, share_samples, online_pass, boundaries)


def cifar10(root: str | None = None, download: bool = False, per_class: int | None = None, test_per_class: int | None = None, scenario: str = "class_incremental", n_experiences: int = 5, class_order: ClassOrder = None, seed: int = 0, leak: float = 0.1, disjoint_fraction: float = 0.0, domains: Sequence[str] | None = None, severity: int = 5, share_samples: bool = False, online_pass: bool = False, boundaries: bool = True) -> Stream:
    """CIFAR-10 (torchvision files under root or $DRIFTPROMPT_DATA) as a continual scenario."""
    return torchvision_stream("cifar10", root, download, per_class, test_per_class, scenario, n_experiences, class_order, seed, leak, disjoint_fraction, domains, severity, share_samples, online_pass, boundaries)


def cifar100(root: str | None = None, download: bool = False, per_class: int | None = None, test_per_class: int | None = None, scenario: str = "class_incremental", n_experiences: int = 10, class_order: ClassOrder = None, seed: int = 0, leak: float = 0.1, disjoint_fraction: float = 0.0, domains: Sequence[str] | None = None, severity: int = 5, share_samples: bool = False, online_pass: bool = False, boundaries: bool = True) -> Stream:
    """CIFAR-100 (torchvision files under root or $DRIFTPROMPT_DATA) as a continual scenario."""
    return torchvision_stream("cifar100", root, download, per_class, test_per_class, scenario, n_experiences, class_order, seed, leak, disjoint_fraction, domains, severity, share_samples, online_pass, boundaries)


def image_folder(
    path: str,
    root: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.2,
    image_size: int | None = None,
    in_memory: bool | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    class_names_file: str | None = None,
    cache_dir: str | None = None,
    scenario: str = "class_incremental",
    n_experiences: int = 5,
    class_order: ClassOrder = None,
    seed: int = 0,
    leak: float = 0.1,
    disjoint_fraction: float = 0.0,
    domains: Sequence[str] | None = None,
    severity: int = 5,
    share_samples: bool = False,
    online_pass: bool = False,
    boundaries: bool = True,
) -> Stream:
    """An image folder (<split>/<class>/<image>, or <class>/<image> split by test_fraction) cut into a continual scenario.

    ``in_memory`` (default: when there are at most 20,000 images or ``image_size`` <= 64)
    decodes everything once; otherwise images are decoded per batch from the files (use
    ``train.num_workers`` for parallel decoding; blurry and domain-incremental scenarios need
    ``in_memory: true``).
    """
    folder = resolve_path(path, root, "path")
    flat = not (folder / train_split).is_dir() and not (folder / test_split).is_dir()
    splits: tuple[str | None, ...] = (None,) if flat else (train_split, test_split)
    n_files = sum(len(files_of(folder, s)) for s in splits)
    if in_memory is None:
        in_memory = n_files <= 20_000 or (image_size is not None and image_size <= 64)
    if in_memory:
        parts, names = read_folder(folder, splits, None if flat else per_class, image_size, cache_dir)
        if flat:
            train_pos, test_pos = stratified_split(parts[None].targets, test_fraction, seed)
            train, test = parts[None].subset(train_pos), parts[None].subset(test_pos)
        else:
            train, test = parts[train_split], parts[test_split]
        train, test = _limit(train, test, per_class, test_per_class, seed)
    else:
        train, test, names = lazy_splits(folder, splits, test_fraction, image_size or 224, per_class, test_per_class, seed)
    return make_scenario(train, test, _names(names, class_names_file, root), folder.name, scenario, n_experiences, class_order, seed, leak, disjoint_fraction, domains, severity, share_samples, online_pass, boundaries)


def image_tar(
    path: str,
    root: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_size: int | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    class_names_file: str | None = None,
    cache_dir: str | None = None,
    scenario: str = "class_incremental",
    n_experiences: int = 5,
    class_order: ClassOrder = None,
    seed: int = 0,
    leak: float = 0.1,
    disjoint_fraction: float = 0.0,
    domains: Sequence[str] | None = None,
    severity: int = 5,
    share_samples: bool = False,
    online_pass: bool = False,
    boundaries: bool = True,
) -> Stream:
    """A tar archive of image folders, read in place (never extracted), cut into a continual scenario."""
    archive = resolve_path(path, root, "path")
    test_limit = test_per_class if test_per_class is not None else per_class
    limit = None if per_class is None else max(per_class, test_limit or 0)
    parts, names = read_tar(archive, (train_split, test_split), limit, image_size, cache_dir)
    train, test = _limit(parts[train_split], parts[test_split], per_class, test_per_class, seed)
    return make_scenario(train, test, _names(names, class_names_file, root), archive.name.split(".")[0], scenario, n_experiences, class_order, seed, leak, disjoint_fraction, domains, severity, share_samples, online_pass, boundaries)


def _test_source(source: str, path: str | None, root: str | None, split: str, download: bool, image_size: int | None, per_class: int | None, cache_dir: str | None, seed: int) -> tuple[TensorImageDataset, list[str]]:
    if source == "image_tar":
        parts, names = read_tar(resolve_path(path, root, "path"), (split,), per_class, image_size, cache_dir)
        return limit_per_class(parts[split], per_class, seed), names
    if source == "image_folder":
        parts, names = read_folder(resolve_path(path, root, "path"), (split,), per_class, image_size, cache_dir)
        return limit_per_class(parts[split], per_class, seed), names
    if source == "synthetic":
        _, test = synthetic_split(10, 1, per_class or 32, image_size or 32, seed)
        return test, [str(i) for i in range(10)]
    data, names = torchvision_dataset(source, root, split == "train", download)
    return limit_per_class(data, per_class, seed), names


def corruption_test_time(
    source: str = "cifar10",
    path: str | None = None,
    root: str | None = None,
    split: str = "test",
    download: bool = False,
    image_size: int | None = None,
    per_class: int | None = None,
    cache_dir: str | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (5,),
    include_clean: bool = False,
    variant: str = "auto",
    batch_size: int = 1,
    order: str = "sequential",
    shuffle: bool = True,
    dirichlet: float | None = None,
    slots: int | None = None,
    episodic: bool = False,
    expose_boundaries: bool = False,
    seed: int = 0,
) -> TestTimeStream:
    """A test-time stream of corrupted test images (CIFAR-10-C style; CoTTA order and severity 5 by default).

    ``source`` is a torchvision name (cifar10, cifar100, ...), ``image_tar`` or
    ``image_folder`` (with ``path``), or ``synthetic``.
    """
    data, names = _test_source(source, path, root, split, download, image_size, per_class, cache_dir, seed)
    domains = corruption_domains(data, list(corruptions) if corruptions is not None else list(CORRUPTIONS), list(severities), seed, variant, include_clean)
    return test_time_stream(domains, len(names), names, f"{source}-c", batch_size=batch_size, order=order, shuffle=shuffle, dirichlet=dirichlet, slots=slots, episodic=episodic, expose_boundaries=expose_boundaries, seed=seed)


def imagenet_test_time(
    dataset: str = "imagenet_r",
    path: str | None = None,
    root: str | None = None,
    split: str = "val",
    image_size: int = 224,
    label_space: str = "imagenet",
    per_class: int | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (5,),
    batch_size: int = 64,
    order: str = "sequential",
    shuffle: bool = True,
    dirichlet: float | None = None,
    slots: int | None = None,
    episodic: bool = False,
    expose_boundaries: bool = False,
    seed: int = 0,
) -> TestTimeStream:
    """ImageNet, -A, -R, -V2 or -Sketch as a test-time stream, with CLIP names and the subset label mask."""
    folder = resolve_path(path if path is not None else dataset, root, "path")
    data = imagenet_variant(dataset, folder, split, image_size, label_space, per_class)
    if corruptions:
        domains: list[DomainSource] = []
        for i, name in enumerate(corruptions):
            for s in severities:
                check_corruption(name, s)
                domains.append(DomainSource(f"{name}-{s}", data, lambda x, k, _n=name, _s=int(s): corrupt(x, _n, _s, seed=k, variant="imagenet"), seed * 1000 + i * 10 + int(s)))
    else:
        domains = [DomainSource(dataset, data)]
    names = imagenet_class_names(dataset, label_space)
    width = 1000 if label_space == "imagenet" else len(subset_indices(dataset))
    mask = label_mask(dataset) if label_space == "imagenet" else None
    return test_time_stream(domains, width, names, dataset, mask, batch_size=batch_size, order=order, shuffle=shuffle, dirichlet=dirichlet, slots=slots, episodic=episodic, expose_boundaries=expose_boundaries, seed=seed)


@hookimpl
def register_streams(register):  # type: ignore[no-untyped-def]
    register("synthetic", synthetic_class_incremental)
    register("cifar10", cifar10)
    register("cifar100", cifar100)
    register("torchvision", torchvision_stream)
    register("image_folder", image_folder)
    register("image_tar", image_tar)
    register("corruption_test_time", corruption_test_time)
    register("imagenet_test_time", imagenet_test_time)


__all__ = ["cifar10", "cifar100", "corruption_test_time", "image_folder", "image_tar", "imagenet_test_time", "make_scenario", "register_streams", "synthetic_class_incremental", "torchvision_stream"]
