"""Test-time adaptation streams: sample- or batch-wise, episodic or continual, over domains.

A :class:`TestTimeStream` is a :class:`~driftprompt.streams.base.Stream` (one experience per
domain, so every builder's contract holds) that also yields the online sequence of
``(images, targets, extras)`` batches the test-time loop consumes. Every batch's extras carry

* ``"index"``: (B,) long, the sample's position in its source dataset;
* ``"domain"``: list of B domain names (for per-domain online accuracy);
* ``"position"``: (B,) long, the sample's position in the stream;
* ``"episodic"``: bool, whether strategies should reset to the source model after each batch;
* ``"new_domain"``: bool, only when ``expose_boundaries`` is set: the batch opens a domain;
* ``"raw"``: list of B uint8 (3, H, W) images at their decoded full resolution, when the
  source keeps them (datasets with a ``decode_with_raw(i)`` method, such as the ImageNet
  variants, and no transform): test-time strategies that make views (TPT, DynaPrompt, TDA)
  cut them from these, as the official code does, while ``images`` holds the square copies.

Orders (``order``):

* ``"sequential"``: domains one after another (the continual protocol of Wang et al.,
  "Continual Test-Time Domain Adaptation", CVPR 2022);
* ``"mixed"``: all samples of all domains pooled and shuffled together (mixed-domain TTA, as
  in Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Label shift (``dirichlet``): ``None`` keeps an i.i.d. shuffle (or the stored order with
``shuffle=False``); a value gamma > 0 gives class-correlated (non-i.i.d.) order as in NOTE
(Gong et al., NeurIPS 2022) and RoTTA (Yuan et al., CVPR 2023). Exact sampling, applied within
each domain (or to the pooled samples for ``"mixed"``): with K classes and S slots (S = K
unless ``slots`` is given), for every class k draw proportions p_k ~ Dirichlet(gamma * 1_S);
shuffle the class's n_k samples and cut them into S consecutive parts at
``floor(cumsum(p_k) * n_k)``; the stream is slot 1, then slot 2, ..., each slot the
concatenation of its class parts in a random class order. Small gamma (e.g. 0.01) gives long
single-class runs; large gamma approaches i.i.d.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError

from .base import Experience, Stream, TensorImageDataset, UnreadableImageError

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, int], torch.Tensor]
ORDERS = ("sequential", "mixed")


class DomainSource(Dataset):
    """One domain of a test stream: a source dataset, optionally transformed lazily.

    Images are transformed in fixed chunks of ``chunk`` samples, each seeded by
    ``(seed, chunk number)``, so a sample's pixels do not depend on the batch size or the
    order it is asked for in. The most recent ``cache_chunks`` chunks are kept in memory.

    Datasets decoded from files (:class:`~driftprompt.streams.folders.ImageFileDataset`) are
    read on demand and transformed per request, seeded by the first requested position.

    Args:
        name: the domain's name (reported per sample).
        dataset: source images (in memory, or any dataset of (image, target, ...) items).
        transform: ``transform(images, seed) -> images`` (e.g. a corruption), or ``None``.
        seed: base seed of the transform.
    """

    def __init__(self, name: str, dataset: Dataset, transform: Transform | None = None, seed: int = 0, chunk: int = 512, cache_chunks: int = 64) -> None:
        self.name = name
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.chunk = chunk
        self.cache_chunks = cache_chunks
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.in_memory = isinstance(dataset, TensorImageDataset)
        self.targets = torch.as_tensor(dataset.targets, dtype=torch.long)  # type: ignore[attr-defined]
        self.indices = getattr(dataset, "indices", None)
        if self.indices is None:
            self.indices = torch.arange(len(self.targets))
        self.tags = {**(getattr(dataset, "tags", None) or {}), "domain": name}

    def __len__(self) -> int:
        return len(self.dataset)

    def _chunk(self, k: int) -> torch.Tensor:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        part = self.dataset.images[k * self.chunk : (k + 1) * self.chunk]
        out = part if self.transform is None else self.transform(part, self.seed * 1_000_003 + k)
        self._cache[k] = out
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return out

    def images_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Images at ``positions`` (within this domain), transformed."""
        if not self.in_memory:
            images = torch.stack([self.dataset[int(i)][0] for i in positions])
            return images if self.transform is None else self.transform(images, self.seed * 1_000_003 + int(positions[0]))
        if self.transform is None:
            return self.dataset.images[positions]
        chunks = positions // self.chunk
        out = torch.empty((len(positions), *self.dataset.images.shape[1:]), dtype=self.dataset.images.dtype)
        for k in torch.unique(chunks).tolist():
            sel = chunks == k
            out[sel] = self._chunk(k)[positions[sel] - k * self.chunk]
        return out

    @property
    def keeps_raw(self) -> bool:
        """Whether :meth:`images_and_raw` returns full-resolution images too."""
        return self.transform is None and hasattr(self.dataset, "decode_with_raw")

    def images_and_raw(self, positions: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images at ``positions`` and, when the source keeps them, the raw decoded images."""
        if not self.keeps_raw:
            return self.images_at(positions), None
        pairs = [self.dataset.decode_with_raw(int(i)) for i in positions]  # type: ignore[attr-defined]
        return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images_at(torch.tensor([i]))[0], int(self.targets[i]), int(self.indices[i])

    def materialise(self) -> TensorImageDataset:
        """The whole domain as an in-memory dataset (tagged with its name)."""
        images = self.images_at(torch.arange(len(self)))
        return TensorImageDataset(images, self.targets, self.indices, self.tags)


def dirichlet_order(labels: np.ndarray, gamma: float, rng: np.random.Generator, slots: int | None = None) -> np.ndarray:
    """Positions of ``labels`` in class-correlated order (see the module docstring for the exact sampling)."""
    if gamma <= 0:
        raise StreamError(f"dirichlet must be positive, got {gamma}; use e.g. 0.1 for strong label shift or leave it unset for i.i.d.")
    classes = np.unique(labels)
    n_slots = slots or len(classes)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    for c in classes:
        pos = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet([gamma] * n_slots)
        cuts = (np.cumsum(p)[:-1] * len(pos)).astype(int)
        for s, piece in enumerate(np.split(pos, cuts)):
            parts[s].append(piece)
    order = []
    for slot in parts:
        for j in rng.permutation(len(slot)):
            order.append(slot[j])
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


@dataclass
class TestTimeStream(Stream):
    """A stream of test batches over one or more domains (see the module docstring).

    Attributes:
        domains: the domains, in arrival order for ``"sequential"``.
        batch_size: samples per batch (1: sample-wise adaptation).
        order: ``"sequential"`` or ``"mixed"``.
        shuffle: shuffle within each domain (or the pool); ``False`` keeps stored order.
        dirichlet: label-shift concentration gamma, or ``None`` for no label shift.
        slots: Dirichlet slots (default: number of classes).
        episodic: strategies should reset to the source model after every batch.
        expose_boundaries: add ``"new_domain"`` to the extras.
        seed: seeds the order.
    """

    domains: list[DomainSource] = field(default_factory=list)
    batch_size: int = 1
    order: str = "sequential"
    shuffle: bool = True
    dirichlet: float | None = None
    slots: int | None = None
    episodic: bool = False
    expose_boundaries: bool = False
    seed: int = 0

    __test__ = False  # not a pytest test class despite its name

    def __post_init__(self) -> None:
        if not self.domains:
            raise StreamError("A test-time stream needs at least one domain; give a dataset or a corruption list.")
        if self.order not in ORDERS:
            raise StreamError(f"Unknown test-time order '{self.order}'; use one of {', '.join(ORDERS)}.")
        if self.batch_size < 1:
            raise StreamError(f"batch_size must be at least 1, got {self.batch_size}; use 1 for sample-wise streams.")

    @property
    def num_samples(self) -> int:
        return sum(len(d) for d in self.domains)

    def plan(self) -> list[tuple[int, np.ndarray]]:
        """The stream order as runs of ``(domain number, positions within the domain)``."""
        rng = np.random.default_rng(self.seed)
        if self.order == "sequential":
            return [(k, self._arrange(d.targets.numpy(), rng)) for k, d in enumerate(self.domains)]
        labels = np.concatenate([d.targets.numpy() for d in self.domains])
        owner = np.concatenate([np.full(len(d), k) for k, d in enumerate(self.domains)])
        local = np.concatenate([np.arange(len(d)) for d in self.domains])
        order = self._arrange(labels, rng)
        return [(int(owner[i]), np.asarray([local[i]])) for i in order]

    def _arrange(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.dirichlet is not None:
            return dirichlet_order(labels, float(self.dirichlet), rng, self.slots)
        return rng.permutation(len(labels)) if self.shuffle else np.arange(len(labels))

    def _samples(self) -> Iterator[tuple[int, int]]:
        for k, positions in self.plan():
            for p in positions:
                yield k, int(p)

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """Yield the stream's ``(images, targets, extras)`` batches in order."""
        size = batch_size or self.batch_size
        pending: list[tuple[int, int]] = []
        position = 0
        last_domain = -1
        for item in self._samples():
            pending.append(item)
            if len(pending) == size:
                batch, last_domain = self._readable_batch(pending, position, last_domain)
                position += len(pending)
                pending = []
                if batch is not None:
                    yield batch
        if pending:
            batch = self._readable_batch(pending, position, last_domain)[0]
            if batch is not None:
                yield batch

    def _readable_batch(self, items: list[tuple[int, int]], position: int, last_domain: int) -> tuple[tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None, int]:
        """:meth:`_batch`, leaving out (and counting in ``skipped``) images found truncated or
        corrupt only now that they are decoded; ``None`` when none of them can be read."""
        try:
            return self._batch(items, position, last_domain)
        except UnreadableImageError:
            pass
        good = []
        for k, p in items:
            try:
                self.domains[k].images_and_raw(torch.tensor([p]))
                good.append((k, p))
            except UnreadableImageError as exc:
                self.skipped = int(getattr(self, "skipped", 0)) + 1
                log.warning("Skipped an unreadable test image: %s", exc)
        if not good:
            return None, last_domain
        return self._batch(good, position, last_domain)

    def _batch(self, items: list[tuple[int, int]], position: int, last_domain: int) -> tuple[tuple[torch.Tensor, torch.Tensor, dict[str, Any]], int]:
        dom = torch.tensor([k for k, _ in items])
        pos = torch.tensor([p for _, p in items])
        images: torch.Tensor | None = None
        targets = torch.empty(len(items), dtype=torch.long)
        index = torch.empty(len(items), dtype=torch.long)
        raw: list[torch.Tensor | None] = [None] * len(items)
        for k in torch.unique(dom).tolist():
            sel = dom == k
            d = self.domains[k]
            part, part_raw = d.images_and_raw(pos[sel])
            if images is None:
                images = torch.empty((len(items), *part.shape[1:]), dtype=part.dtype)
            images[sel] = part
            targets[sel] = d.targets[pos[sel]]
            index[sel] = d.indices[pos[sel]]
            if part_raw is not None:
                for j, r in zip(torch.nonzero(sel).flatten().tolist(), part_raw):
                    raw[j] = r
        extras: dict[str, Any] = {
            "index": index,
            "domain": [self.domains[k].name for k, _ in items],
            "position": torch.arange(position, position + len(items)),
            "episodic": self.episodic,
        }
        if self.expose_boundaries:
            extras["new_domain"] = items[0][0] != last_domain
        if all(r is not None for r in raw):
            extras["raw"] = raw
        assert images is not None
        return (images, targets, extras), items[-1][0]

    def num_batches(self, batch_size: int | None = None) -> int:
        size = batch_size or self.batch_size
        return -(-self.num_samples // size)


def test_time_stream(
    domains: Sequence[DomainSource],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    name: str = "test_time",
    label_mask: torch.Tensor | None = None,
    **options: Any,
) -> TestTimeStream:
    """Build a :class:`TestTimeStream`; ``options`` are its attributes (batch_size, order, ...)."""
    experiences = [Experience(index=i, train=d, test=d, classes=sorted(set(d.targets.tolist())), domain=d.name) for i, d in enumerate(domains)]
    return TestTimeStream(experiences=experiences, num_classes=num_classes, class_names=list(class_names or []), name=name, scenario="test_time", label_mask=label_mask, domains=list(domains), **options)


test_time_stream.__test__ = False  # type: ignore[attr-defined]


def corruption_domains(dataset: TensorImageDataset, corruptions: Sequence[str], severities: Sequence[int], seed: int = 0, variant: str = "auto", include_clean: bool = False) -> list[DomainSource]:
    """One lazily corrupted domain per (corruption, severity), named ``"<corruption>-<severity>"``.

    Corruptions are outer, severities inner: ``[fog-1, fog-2, ..., snow-1, ...]``.
    """
    from .corruptions import check_corruption, corrupt

    if not corruptions and not include_clean:
        raise StreamError("The corruption list is empty; name at least one corruption (see streams.corruptions.CORRUPTIONS).")
    out = [DomainSource("clean", dataset)] if include_clean else []
    for i, name in enumerate(corruptions):
        for s in severities:
            check_corruption(name, s)

            def fn(images: torch.Tensor, chunk_seed: int, _n: str = name, _s: int = int(s)) -> torch.Tensor:
                return corrupt(images, _n, _s, seed=chunk_seed, variant=variant)

            out.append(DomainSource(f"{name}-{s}", dataset, fn, seed=seed * 1000 + i * 10 + int(s)))
    return out
