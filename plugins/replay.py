"""Experience replay (ER) and Dark Experience Replay++ (DER++): the rehearsal baselines.

``replay`` is ER (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019):
a bounded buffer of raw training images and their labels; at every training step a minibatch
drawn from it is trained together with the current batch. ``der`` is DER++ (Buzzega et al.,
"Dark Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020):
the buffer also keeps the logits each sample had when it was stored, and the loss is

    CE(current batch) + alpha * MSE(logits of buffer minibatch 1, their stored logits)
                      + beta * CE(buffer minibatch 2, its stored labels).

Both follow the reference implementation, aimagelab/mammoth (cited as file:line):

* ER concatenates the buffer minibatch to the current batch and takes one cross-entropy over
  both (models/er.py:53-60); the current samples are stored after the optimizer step, as
  they were loaded, without augmentation (models/er.py:64-65).
* DER++: two independent buffer minibatches, the MSE over every logit of the head and the
  cross-entropy on the second (models/derpp.py:40-51); the current samples are stored with
  the logits of the forward pass that trained them (models/derpp.py:56-58).
* replayed samples are drawn uniformly without replacement, at most the buffer's size
  (utils/buffer.py:520-529); ``minibatch_size`` defaults to the training batch size
  (main.py:435-436).
* ``policy="reservoir"`` is the buffer's reservoir rule (utils/buffer.py:126-133): the first
  ``buffer_size`` samples fill it, then the n-th sample replaces a uniform slot with
  probability ``buffer_size / n``.
* one difference: a sample that is already in the buffer when it is offered again (in a
  later epoch) is skipped, where the reference stores a second copy; so a buffer as large as
  the data holds every sample once.
* defaults: ``alpha=0.2``, ``beta=0.5`` and ``buffer_size=500`` are the DER++ row for
  seq-cifar10 with a 500-sample buffer (utils/best_args.py:665-670).

The default buffer policy is class-balanced reservoir sampling (CBRS, Chrysakis & Moens,
"Online Continual Learning from Imbalanced Data", ICML 2020, Algorithm 1), which keeps about
``buffer_size / classes`` samples of every class seen: while the buffer is not full every
sample is stored; then a sample of a class that is not among the largest in the buffer
replaces a random sample of a largest class, and a sample of a largest class replaces a
random sample of its own class with probability (stored samples of its class) / (samples of
its class seen so far), so each class keeps a uniform sample of its own stream. Here "full
class" is read as "one of the classes with the most samples in the buffer now".

How replayed samples enter a step. At ``batch_start`` (``tryfirst``) the strategy appends the
replayed images, preprocessed exactly like the current ones, to ``state.inputs``, their
labels to ``state.targets`` and their extras to ``state.batch``; then every other strategy
sees one ordinary, larger batch: L2P selects prompts for each replayed sample, DualPrompt and
CODA-Prompt prefix them, ``finetune`` and the prompt strategies take their cross-entropy over
all of it, and the projection strategies (``pgp``, ``nsp``) project the gradient of that one
loss. One forward per step also gives DER++ exactly the reference's logits, since a ViT
treats every sample of a batch independently. ``state.batch["replayed"]`` marks the appended
rows and ``state.batch["replay_classes"]`` lists their labels.

The train-time class mask. ``finetune`` (``mask_current``), ``l2p``, ``dualprompt``,
``coda_prompt``, ``vpt``, ``lora`` and ``qprompt`` (``train_mask``) mask the logits of classes
outside the current experience before the loss. A replayed old-class target would then meet
a masked logit and have a cross-entropy of about 3e38. ``mask_to_current_experience`` also
allows every class listed in ``state.batch["replay_classes"]``, so with replay the mask
admits exactly the classes present in the batch: the current experience's and the replayed
samples'. Old classes that are absent from the batch stay masked, as the mask intends.

Order with other strategies: list ``replay`` (or ``der``) before ``augment`` so that the
replayed images are augmented too (both act ``tryfirst`` at ``batch_start``, in config
order). A strategy that collects statistics at ``batch_start`` (``ncm``'s class means, the
projection strategies' representation matrices) sees the replayed samples as well.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from driftprompt.engine import ConfigError, PluginError, State, hookimpl

log = logging.getLogger(__name__)

POLICIES = ("class_balanced", "reservoir")


# --- pure functions ---------------------------------------------------------------------


def reservoir_slot(labels: list[int], seen: int, capacity: int, generator: torch.Generator) -> int:
    """Slot for the ``seen``-th sample (0-based) under plain reservoir sampling, or -1.

    ``len(labels)`` slots are filled; while fewer than ``capacity`` the sample is appended.
    """
    if len(labels) < capacity:
        return len(labels)
    r = int(torch.randint(0, seen + 1, (1,), generator=generator))
    return r if r < capacity else -1


def class_balanced_slot(labels: list[int], label: int, class_seen: int, capacity: int, generator: torch.Generator, counts: dict[int, int] | None = None) -> int:
    """Slot for a sample of class ``label`` under class-balanced reservoir sampling, or -1.

    Args:
        labels: the labels stored in the buffer, by slot.
        label: the incoming sample's class.
        class_seen: samples of ``label`` seen so far, this one included.
        capacity: the buffer's size.
        generator: the source of randomness.
        counts: the number of stored samples per class, if the caller keeps it (else counted).
    """
    if len(labels) < capacity:
        return len(labels)
    if counts is None:
        counts = {}
        for c in labels:
            counts[c] = counts.get(c, 0) + 1
    counts = {c: n for c, n in counts.items() if n > 0}
    largest = max(counts.values())
    own = counts.get(label, 0)
    if own < largest:  # replace a random sample of a random largest class
        big = sorted(c for c, n in counts.items() if n == largest)
        victim = big[int(torch.randint(0, len(big), (1,), generator=generator))]
    else:  # keep a uniform sample of the class's own stream
        if float(torch.rand((), generator=generator)) >= own / max(class_seen, 1):
            return -1
        victim = label
    slots = [i for i, c in enumerate(labels) if c == victim]
    return slots[int(torch.randint(0, len(slots), (1,), generator=generator))]


def der_terms(logits: torch.Tensor, stored: torch.Tensor, logits2: torch.Tensor, labels2: torch.Tensor, alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """DER++'s two buffer terms: ``alpha * MSE(logits, stored)`` and ``beta * CE(logits2, labels2)``.

    The MSE is averaged over every element (``F.mse_loss``), as models/derpp.py:44.
    """
    out: dict[str, torch.Tensor] = {}
    if logits.shape[0]:
        out["der_mse"] = alpha * F.mse_loss(logits.float(), stored.float())
    if logits2.shape[0]:
        out["der_ce"] = beta * F.cross_entropy(logits2.float(), labels2)
    return out


def _positions(dataset: Any) -> dict[int, int] | None:
    """Map a batch's ``"index"`` values to positions in ``dataset`` (``None``: they are positions)."""
    indices = getattr(dataset, "indices", None)
    if indices is None:
        return None
    values = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return {int(v): i for i, v in enumerate(values)}


def _item(dataset: Any, position: int, index: int) -> tuple[torch.Tensor, int]:
    """The raw image and label at ``position`` of ``dataset``, whose ``"index"`` is ``index``."""
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if torch.is_tensor(images) and targets is not None and len(targets) == len(images):
        return images[position], int(targets[position])
    try:
        item = dataset[position]
    except IndexError:
        item = None
    if item is None or (len(item) > 2 and int(item[2]) != index):
        raise PluginError(f"replay cannot find sample {index} of the batch at its position in the experience's training data; give the dataset an 'indices' attribute (as Subset and TensorImageDataset have) or items whose index is their position.")
    return torch.as_tensor(item[0]), int(item[1])


def _label(dataset: Any, position: int) -> int | None:
    """The label at ``position`` when the dataset lists its labels (no image decoded), else ``None``."""
    targets = getattr(dataset, "targets", None)
    try:
        return int(targets[position]) if targets is not None and len(targets) == len(dataset) else None
    except (TypeError, IndexError):
        return None


# --- the strategies ---------------------------------------------------------------------


class Replay:
    """Experience replay: a class-balanced reservoir of raw images replayed in every step.

    Args:
        buffer_size: samples the buffer holds (500, the DER paper's middle buffer). A buffer
            larger than the stream's training data holds all of it: a warning says so when
            the last experience starts, and the size becomes the data's.
        minibatch_size: replayed samples added to each training batch; ``None`` takes
            ``train.batch_size`` (as mammoth main.py:435-436).
        policy: ``"class_balanced"`` (CBRS, default) or ``"reservoir"`` (mammoth's buffer).
    """

    stores_logits = False

    def __init__(self, buffer_size: int = 500, minibatch_size: int | None = None, policy: str = "class_balanced") -> None:
        if int(buffer_size) < 1:
            raise ConfigError(f"replay buffer_size must be at least 1, got {buffer_size}; set e.g. buffer_size: 500.")
        if minibatch_size is not None and int(minibatch_size) < 1:
            raise ConfigError(f"replay minibatch_size must be at least 1, got {minibatch_size}; set it or leave it out for train.batch_size.")
        if policy not in POLICIES:
            raise ConfigError(f"replay policy {policy!r} does not exist; use one of {', '.join(POLICIES)}.")
        self.buffer_size = int(buffer_size)
        self.capacity = int(buffer_size)
        self.minibatch_size = None if minibatch_size is None else int(minibatch_size)
        self.policy = policy
        self.generator = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")
        # the buffer, by slot
        self.images: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.index: list[int] = []  # the sample's "index" extra
        self.origin: list[int] = []  # the experience it came from
        self.logits: torch.Tensor | None = None  # (capacity, classes) on the device, DER only
        self.seen = 0  # samples offered to the buffer
        self.class_seen: dict[int, int] = {}
        self.data_seen = 0  # training samples of the experiences started so far
        self.task_ids: dict[int, int | None] = {}
        self.domains: dict[int, str | None] = {}
        self._map: dict[int, int] | None = None
        self._stored: set[tuple[int, int]] = set()  # (experience, index) of the stored samples
        self._counts: dict[int, int] = {}  # stored samples per class
        self._current = 0  # rows of the current batch that came from the stream
        self._raw: torch.Tensor | None = None  # the head's logits before any mask (DER)
        self._picks: list[torch.Tensor] = []  # this step's buffer minibatches, as slots

    # -- events ---------------------------------------------------------------------------

    @hookimpl
    def init(self, state: State) -> None:
        seed = int(state.config.seed) if state.config is not None else 0
        self.generator = torch.Generator().manual_seed(seed)
        self.device = state.device

    @hookimpl
    def experience_start(self, state: State) -> None:
        exp = state.experience
        self._map = _positions(exp.train)
        self.task_ids[exp.index] = exp.task_id
        self.domains[exp.index] = exp.domain
        self.data_seen += len(exp.train)
        if exp.index == state.num_experiences - 1 and self.capacity > self.data_seen:
            log.warning(
                "replay buffer_size %d is larger than the stream's %d training samples; the buffer holds all of them, so its size is set to %d.",
                self.buffer_size, self.data_seen, self.data_seen,
            )
            self.capacity = self.data_seen

    # tryfirst: every other strategy's batch_start (augmentation, statistics) and the forward
    # must see the batch with the replayed samples in it.
    @hookimpl(tryfirst=True)
    def batch_start(self, state: State) -> None:
        self._raw = None
        self._picks = []
        self._current = 0 if state.inputs is None else int(state.inputs.shape[0])
        if state.phase != "train" or state.targets is None or not self.labels:
            return
        m = self._minibatch(state)
        self._picks = [self._draw(m) for _ in range(self.draws)]
        self._append(state, torch.cat(self._picks), self._picks)

    @hookimpl
    def batch_end(self, state: State) -> None:
        if state.phase != "train" or state.experience is None or self._current == 0:
            return
        self._store(state)

    # -- replay ---------------------------------------------------------------------------

    draws = 1  # buffer minibatches drawn per step

    def _minibatch(self, state: State) -> int:
        if self.minibatch_size is not None:
            return self.minibatch_size
        return int(state.config.train.batch_size) if state.config is not None else self._current

    def _draw(self, m: int) -> torch.Tensor:
        """Slots of ``min(m, stored)`` samples, uniform without replacement."""
        n = len(self.labels)
        return torch.randperm(n, generator=self.generator)[: min(m, n)]

    def _stack(self, slots: list[int]) -> torch.Tensor:
        try:
            return torch.stack([self.images[i] for i in slots])
        except RuntimeError as exc:
            raise PluginError(f"replay cannot batch its stored images, whose sizes differ ({exc}); give every experience images of one size.") from exc

    def _append(self, state: State, rows: torch.Tensor, picks: list[torch.Tensor]) -> None:
        """Append the buffer samples at ``rows`` to the current batch (inputs, targets, extras)."""
        assert state.inputs is not None and state.targets is not None
        slots = rows.tolist()
        images = self._stack(slots).to(state.device, non_blocking=True)
        inputs = state.backbone.preprocess(images)
        labels = torch.tensor([self.labels[i] for i in slots], dtype=torch.long)
        b, m = self._current, len(slots)
        state.inputs = torch.cat([state.inputs, inputs.to(state.inputs.dtype)])
        state.targets = torch.cat([state.targets, labels.to(state.targets.device, state.targets.dtype)])
        state.query = None
        extras = dict(state.batch)
        for key, value in state.batch.items():
            if key == "index":
                extras[key] = torch.cat([torch.as_tensor(value), torch.tensor([self.index[i] for i in slots], dtype=torch.long)])
            elif key == "task_id" and torch.is_tensor(value):
                extras[key] = torch.cat([value, torch.tensor([_or(self.task_ids.get(self.origin[i]), -1) for i in slots], dtype=value.dtype)])
            elif key == "domain" and isinstance(value, list):
                extras[key] = value + [self.domains.get(self.origin[i]) for i in slots]
            elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == b:
                extras[key] = torch.cat([value, torch.full((m, *value.shape[1:]), -1, dtype=value.dtype)])
            elif isinstance(value, list) and len(value) == b:
                extras[key] = value + [None] * m
        extras["replayed"] = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(m, dtype=torch.bool)])
        extras["replay_classes"] = self._mask_classes(labels, picks).to(state.device, non_blocking=True)
        state.batch = extras

    def _mask_classes(self, labels: torch.Tensor, picks: list[torch.Tensor]) -> torch.Tensor:
        """Labels the train-time class mask must allow: every replayed sample's."""
        return labels

    def _store(self, state: State) -> None:
        """Offer the current batch's samples (as loaded, unaugmented) to the buffer."""
        index = state.batch.get("index")
        if index is None:
            raise PluginError("replay needs each training batch's sample indices ('index' in the batch extras); give the stream's datasets items of (image, target, index).")
        index = torch.as_tensor(index)[: self._current].tolist()
        dataset = state.experience.train
        decisions: list[tuple[int, int, int, torch.Tensor]] = []  # (row, slot, label, image)
        for row, idx in enumerate(index):
            position = self._map.get(int(idx)) if self._map is not None else int(idx)
            if position is None:
                raise PluginError(f"replay cannot find sample {idx} of the batch in the experience's training data; the stream's batches must come from its own datasets.")
            key = (state.experience.index, int(idx))
            if key in self._stored:
                continue  # offered again in a later epoch: it is in the buffer already
            # the image is loaded only for samples the buffer takes (decoding every offered one
            # would cost a second read of each training image, most of them turned away)
            label = _label(dataset, position)
            image = None
            if label is None:
                image, label = _item(dataset, position, int(idx))
            self.seen += 1
            self.class_seen[label] = self.class_seen.get(label, 0) + 1
            if self.policy == "reservoir":
                slot = reservoir_slot(self.labels, self.seen - 1, self.capacity, self.generator)
            else:
                slot = class_balanced_slot(self.labels, label, self.class_seen[label], self.capacity, self.generator, self._counts)
            if slot < 0:
                continue
            if image is None:
                image, _ = _item(dataset, position, int(idx))
            entry = (image.clone(), label, int(idx), state.experience.index)
            self._stored.add(key)
            self._counts[label] = self._counts.get(label, 0) + 1
            if slot == len(self.labels):
                self.images.append(entry[0])
                self.labels.append(label)
                self.index.append(entry[2])
                self.origin.append(entry[3])
            else:
                self._stored.discard((self.origin[slot], self.index[slot]))
                self._counts[self.labels[slot]] -= 1
                self.images[slot], self.labels[slot], self.index[slot], self.origin[slot] = entry
            decisions.append((row, slot, label, image))
        if self.stores_logits and decisions:
            self._store_logits(state, decisions)

    def _store_logits(self, state: State, decisions: list[tuple[int, int, int, torch.Tensor]]) -> None:
        raw = self._raw
        if raw is None:
            raise PluginError("der found no logits of the current batch to store; another strategy's forward must not bypass the forward hook.")
        if self.logits is None or self.logits.shape[1] != raw.shape[1]:
            self.logits = torch.zeros(0, raw.shape[1], device=raw.device)
        needed = max(d[1] for d in decisions) + 1
        if self.logits.shape[0] < needed:  # grown by doubling, never beyond the buffer's size
            size = min(max(needed, 2 * self.logits.shape[0]), max(self.capacity, needed))
            self.logits = torch.cat([self.logits, self.logits.new_zeros(size - self.logits.shape[0], self.logits.shape[1])])
        rows = torch.tensor([d[0] for d in decisions], dtype=torch.long)
        slots = torch.tensor([d[1] for d in decisions], dtype=torch.long)
        # later rows win when a batch writes one slot twice, as the sequential reference does
        self.logits[slots.to(raw.device)] = raw.detach()[rows.to(raw.device)].float()

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        images = torch.stack(self.images) if self.images else None
        return {
            "images": images,
            "labels": torch.tensor(self.labels, dtype=torch.long),
            "index": torch.tensor(self.index, dtype=torch.long),
            "origin": torch.tensor(self.origin, dtype=torch.long),
            "logits": None if self.logits is None else self.logits[: len(self.labels)].detach().clone(),
            "seen": self.seen,
            "class_seen": [[c, n] for c, n in sorted(self.class_seen.items())],
            "data_seen": self.data_seen,
            "capacity": self.capacity,
            "task_ids": [[k, -1 if v is None else v] for k, v in sorted(self.task_ids.items())],
            "domains": [[k, "" if v is None else v] for k, v in sorted(self.domains.items())],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        images = state["images"]
        self.images = [] if images is None else [im.clone() for im in images]
        self.labels = [int(v) for v in state["labels"].tolist()]
        self.index = [int(v) for v in state["index"].tolist()]
        self.origin = [int(v) for v in state["origin"].tolist()]
        self._stored = set(zip(self.origin, self.index))
        self._counts = {}
        for c in self.labels:
            self._counts[c] = self._counts.get(c, 0) + 1
        self.seen = int(state["seen"])
        self.class_seen = {int(c): int(n) for c, n in state["class_seen"]}
        self.data_seen = int(state["data_seen"])
        self.capacity = int(state["capacity"])
        self.task_ids = {int(k): None if int(v) < 0 else int(v) for k, v in state["task_ids"]}
        self.domains = {int(k): v or None for k, v in state["domains"]}
        self.generator.set_state(state["generator"])
        logits = state["logits"]
        if logits is None:
            self.logits = None
        else:
            self.logits = logits.to(self.device).clone()


def _or(value: int | None, default: int) -> int:
    return default if value is None else int(value)


class DER(Replay):
    """DER++: replay plus distillation of the logits stored with each buffer sample.

    Args:
        alpha: weight of the logit MSE on the first buffer minibatch (0.2).
        beta: weight of the cross-entropy on the second buffer minibatch (0.5).
        buffer_size, minibatch_size, policy: as ``replay``.

    The step sees one batch of ``B + 2m`` rows: the current samples, then minibatch 1, then
    minibatch 2. ``der`` reads the head's logits before any class mask (a ``forward``
    wrapper) for the MSE and for storing, as the reference's unmasked outputs; at
    ``before_loss`` (``trylast``, after the strategies' class masks) it takes its two terms,
    ``der_mse`` and ``der_ce`` (on the masked logits, which allow minibatch 2's classes), then
    leaves only the current rows in ``state.logits`` and ``state.targets``, so the classifier
    strategy's ``ce`` is the reference's cross-entropy on the current batch alone.
    """

    stores_logits = True
    draws = 2

    def __init__(self, alpha: float = 0.2, beta: float = 0.5, buffer_size: int = 500, minibatch_size: int | None = None, policy: str = "class_balanced") -> None:
        super().__init__(buffer_size=buffer_size, minibatch_size=minibatch_size, policy=policy)
        self.alpha, self.beta = float(alpha), float(beta)
        self._terms: dict[str, torch.Tensor] | None = None

    def _mask_classes(self, labels: torch.Tensor, picks: list[torch.Tensor]) -> torch.Tensor:
        # only minibatch 2 has cross-entropy targets; minibatch 1 is scored on raw logits
        return labels[picks[0].numel():]

    @hookimpl(wrapper=True)
    def forward(self, state: State):  # type: ignore[no-untyped-def]
        logits = yield
        if state.phase == "train":
            self._raw = logits
        return logits

    # trylast: after the strategies' class masks, which must allow minibatch 2's classes
    @hookimpl(trylast=True)
    def before_loss(self, state: State) -> None:
        self._terms = None
        if state.phase != "train" or not self._picks or state.logits is None or state.targets is None:
            return
        assert self._raw is not None and self.logits is not None
        b, m1 = self._current, self._picks[0].numel()
        stored = self.logits[self._picks[0].to(self.logits.device)]
        raw1 = self._raw[b : b + m1]
        self._terms = der_terms(raw1, stored, state.logits[b + m1 :], state.targets[b + m1 :], self.alpha, self.beta)
        state.logits = state.logits[:b]
        state.targets = state.targets[:b]

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train" or not self._terms:
            return None
        return self._terms


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("replay", Replay)
    register("der", DER)
