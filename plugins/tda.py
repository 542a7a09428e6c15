"""TDA: training-free dynamic cache adapter for CLIP (Karmanov et al., CVPR 2024).

"Efficient Test-Time Adaptation of Vision-Language Models". Nothing is trained: two small
caches of test image features, filled online from CLIP's own zero-shot predictions (labels are
never read), turn into logits that are added to (positive) and subtracted from (negative) the
zero-shot logits. Definitions follow the official code (kdiAAA/TDA, ``tda_runner.py`` and
``utils.py``), defaults its ImageNet config (``configs/imagenet.yaml``); ``preset`` selects
another official config (:data:`PRESETS`: ImageNet, -A, -V2, -R, -Sketch):

* **zero-shot side**: per image, unit image feature ``f``, logits ``s * f W^T`` with ``W`` the
  unit text classifier (``CLIPBackbone.zero_shot_weights``, by default the 7 Tip-Adapter
  templates that the official ImageNet set uses), ``s`` the model's logit scale (the official
  code hard-codes 100, OpenAI CLIP's scale); entropy ``H`` (nats), prediction ``y`` (arg-max),
  probabilities ``p``. With ``views > 1`` (the official code's 64 AugMix views for ImageNet-A,
  -V, -R, -S), the 10% of views with the lowest entropy are kept; ``f`` is the mean of their
  unit features (not re-normalised), the logits their mean, ``H`` the entropy of their mean
  probability (TPT's ``avg_entropy``), ``p`` the mean probability. ImageNet itself uses the
  single image (``views: 1``, the default).
* **positive cache**: per predicted class, at most ``pos_capacity`` (3) entries ``(f, H)``,
  sorted by ``H``. A new entry is appended while the class has room; when it is full, the new
  entry replaces the highest-entropy one if its entropy is lower.
* **negative cache**: the same rule with capacity ``neg_capacity`` (2), for samples whose
  *normalised* entropy ``H / log2(C)`` lies strictly inside ``neg_entropy`` (0.2, 0.5). (The
  official ``get_entropy`` divides the entropy in nats by ``log2 C``; kept as is.) Each entry
  also stores ``p``.
* **cache logits**: ``alpha * exp(-beta * (1 - f K^T)) V`` with ``K`` the cached features and
  ``V`` their values: one-hot of the cached class for the positive cache (alpha 2.0, beta 5.0);
  for the negative cache the mask ``lower < p < upper`` of the stored probabilities
  (``neg_mask`` (0.03, 1.0), alpha 0.117, beta 1.0).
* **prediction**: ``zero-shot logits + positive cache logits - negative cache logits``.

Order: the official loop inserts the current sample into the caches *before* predicting it, so
its own feature takes part (affinity 1 with itself). Here the forward pass computes the updated
caches and predicts with them (``include_current: true``, the official order), and
``test_sample_end`` commits them. ``include_current: false`` predicts with the caches of the
previous samples only. A batch of several images is processed as a stream, row by row.

The defaults were checked against the official ImageNet config and runner; the exact wording of
the paper's equations was not checked against its text. Evaluation rounds of a continual run
use the current caches without updating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.engine.loop import mask_logits

from .tpt import OnlineMonitor, allowed_mask, avg_entropy, class_names_for, clip_inputs, entropy, make_views, raw_images, resolve_clip

NAME = "tda"

# The 7 hand-crafted ImageNet templates selected by Tip-Adapter (Zhang et al., ECCV 2022), which
# TDA's official code uses for ImageNet and its variants.
TIP_ADAPTER_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


_NEGATIVE = {"neg_capacity": 2, "neg_alpha": 0.117, "neg_beta": 1.0, "neg_entropy": (0.2, 0.5), "neg_mask": (0.03, 1.0)}
_OOD_VIEWS = {"views": 64, "augmix": True, "selection": 0.1}

# The official per-dataset hyper-parameters (kdiAAA/TDA configs/<name>.yaml, lines 4-21 of each:
# positive shot_capacity/alpha/beta, negative shot_capacity/alpha/beta/entropy_threshold/
# mask_threshold) and views: ImageNet reads the single CLIP-preprocessed image; -A, -V, -R and
# -Sketch read 63 AugMix views plus the image, keeping the 10% lowest-entropy views
# (utils.py:94-105 ``get_ood_preprocess``, utils.py:127-135, utils.py:76-85).
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"pos_capacity": 3, "pos_alpha": 2.0, "pos_beta": 5.0, **_NEGATIVE, "views": 1, "augmix": False, "selection": 0.1},
    "imagenet_a": {"pos_capacity": 3, "pos_alpha": 2.0, "pos_beta": 5.0, **_NEGATIVE, **_OOD_VIEWS},
    "imagenet_v2": {"pos_capacity": 3, "pos_alpha": 1.0, "pos_beta": 8.0, **_NEGATIVE, **_OOD_VIEWS},
    "imagenet_r": {"pos_capacity": 3, "pos_alpha": 1.0, "pos_beta": 8.0, **_NEGATIVE, **_OOD_VIEWS},
    "imagenet_sketch": {"pos_capacity": 3, "pos_alpha": 2.363, "pos_beta": 7.45, **_NEGATIVE, **_OOD_VIEWS},
}
PRESET_FILES = {"imagenet": "imagenet.yaml", "imagenet_a": "imagenet_a.yaml", "imagenet_v2": "imagenet_v.yaml", "imagenet_r": "imagenet_r.yaml", "imagenet_sketch": "imagenet_s.yaml"}


def tda_preset(name: str) -> dict[str, Any]:
    """The options of an official TDA config by name (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown tda preset '{name}'; use one of {', '.join(PRESETS)}.")
    return dict(PRESETS[name])


@dataclass
class Entry:
    """One cached sample: its feature (E,), entropy (nats) and, for the negative cache, probabilities (C,)."""

    feature: torch.Tensor
    entropy: float
    probs: torch.Tensor | None = None


Cache = dict[int, list[Entry]]


def update_cache(cache: Cache, pred: int, entry: Entry, capacity: int) -> Cache:
    """The official ``update_cache`` rule, returning a new cache (the input is not modified).

    The class's list stays sorted by entropy. While it holds fewer than ``capacity`` entries the
    new one is appended; when full, it replaces the last (highest-entropy) entry if its entropy
    is lower, and is dropped otherwise.
    """
    out = {k: list(v) for k, v in cache.items()}
    items = out.get(pred)
    if items is None:
        out[pred] = [entry]
        return out
    if len(items) < capacity:
        items.append(entry)
    elif entry.entropy < items[-1].entropy:
        items[-1] = entry
    out[pred] = sorted(items, key=lambda e: e.entropy)
    return out


def cache_tensors(cache: Cache, num_classes: int, mask: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (N, E) and values (N, C) of a cache, classes in ascending order.

    Values are one-hot rows of the cached class, or with ``mask = (lower, upper)`` the
    negative cache's ``lower < p < upper`` indicator of the stored probabilities.
    """
    keys, values = [], []
    for cls in sorted(cache):
        for e in cache[cls]:
            keys.append(e.feature)
            if mask is None:
                values.append(F.one_hot(torch.tensor(cls, device=e.feature.device), num_classes).float())
            else:
                assert e.probs is not None
                values.append(((e.probs > mask[0]) & (e.probs < mask[1])).float())
    return torch.stack(keys).float(), torch.stack(values)


def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * exp(-beta * (1 - F K^T)) V``: (B, E) features -> (B, C) logits."""
    affinity = features.float() @ keys.T
    return alpha * torch.exp(-beta * (1.0 - affinity)) @ values


@dataclass
class SampleStats:
    """What TDA derives from one image's zero-shot prediction."""

    feature: torch.Tensor  # E
    logits: torch.Tensor  # C
    entropy: float  # nats
    probs: torch.Tensor  # C
    pred: int


class TDA:
    """Positive and negative feature caches on top of CLIP's zero-shot classifier (no training).

    Args:
        class_names: one name per class; default: ``state.plugin_state["class_names"]``.
        clip: CLIP options when the run's backbone is not a CLIP (``CLIPBackbone`` kwargs).
        templates: "tip_adapter" (the 7 templates, default), "single", "imagenet80" or a list.
        preset: the official config whose values fill every cache and view option not given:
            ``imagenet`` (default), ``imagenet_a``, ``imagenet_v2``, ``imagenet_r`` or
            ``imagenet_sketch`` (see :data:`PRESETS`); options given explicitly win.
        views: views per image (1; 64 with ``augmix: true`` is the official OOD setting).
        augmix: AugMix views instead of crop + flip (with ``views > 1``).
        selection: fraction of lowest-entropy views kept (0.1).
        positive, negative: enable each cache (both on).
        pos_capacity, pos_alpha, pos_beta: 3, 2.0, 5.0.
        neg_capacity, neg_alpha, neg_beta: 2, 0.117, 1.0.
        neg_entropy: normalised-entropy band (lower, upper) for the negative cache (0.2, 0.5).
        neg_mask: probability band (lower, upper) of the negative values (0.03, 1.0).
        include_current: predict with the caches that already hold the current sample (the
            official order, True) or with the previous samples' caches only.
        logit_scale: zero-shot logit scale (``None``: the model's, 100 for OpenAI CLIP).
        seed: seed of the view generator.
    """

    name = NAME

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        clip: dict[str, Any] | None = None,
        templates: str | Sequence[str] = "tip_adapter",
        preset: str = "imagenet",
        views: int | None = None,
        augmix: bool | None = None,
        selection: float | None = None,
        positive: bool = True,
        negative: bool = True,
        pos_capacity: int | None = None,
        pos_alpha: float | None = None,
        pos_beta: float | None = None,
        neg_capacity: int | None = None,
        neg_alpha: float | None = None,
        neg_beta: float | None = None,
        neg_entropy: Sequence[float] | None = None,
        neg_mask: Sequence[float] | None = None,
        include_current: bool = True,
        logit_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        given = {"views": views, "augmix": augmix, "selection": selection, "pos_capacity": pos_capacity, "pos_alpha": pos_alpha, "pos_beta": pos_beta,
                 "neg_capacity": neg_capacity, "neg_alpha": neg_alpha, "neg_beta": neg_beta, "neg_entropy": neg_entropy, "neg_mask": neg_mask}
        opts = {**tda_preset(preset), **{k: v for k, v in given.items() if v is not None}}
        self.preset = preset
        views, augmix, selection = opts["views"], opts["augmix"], opts["selection"]
        pos_capacity, pos_alpha, pos_beta = opts["pos_capacity"], opts["pos_alpha"], opts["pos_beta"]
        neg_capacity, neg_alpha, neg_beta = opts["neg_capacity"], opts["neg_alpha"], opts["neg_beta"]
        neg_entropy, neg_mask = opts["neg_entropy"], opts["neg_mask"]
        if views < 1 or not 0.0 < selection <= 1.0 or pos_capacity < 1 or neg_capacity < 1:
            raise ConfigError("tda needs views >= 1, selection in (0, 1] and cache capacities >= 1.")
        if len(neg_entropy) != 2 or len(neg_mask) != 2:
            raise ConfigError("tda neg_entropy and neg_mask are (lower, upper) pairs.")
        self.class_names_option = list(class_names) if class_names else None
        self.clip_options = dict(clip) if clip else None
        self.templates: str | list[str] = templates if isinstance(templates, str) else list(templates)
        self.views, self.augmix, self.selection = int(views), bool(augmix), float(selection)
        self.positive, self.negative = bool(positive), bool(negative)
        self.pos_capacity, self.pos_alpha, self.pos_beta = int(pos_capacity), float(pos_alpha), float(pos_beta)
        self.neg_capacity, self.neg_alpha, self.neg_beta = int(neg_capacity), float(neg_alpha), float(neg_beta)
        self.neg_entropy = (float(neg_entropy[0]), float(neg_entropy[1]))
        self.neg_mask = (float(neg_mask[0]), float(neg_mask[1]))
        self.include_current = bool(include_current)
        self.logit_scale_option = logit_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: dict[str, Any] = {}
        self.clip: CLIPBackbone | None = None
        self.weights: torch.Tensor | None = None  # C, E unit text classifier
        self.pos: Cache = {}
        self.neg: Cache = {}
        self.pending: tuple[Cache, Cache] | None = None
        self.monitor = OnlineMonitor(window=0)

    # --- setup ---------------------------------------------------------------------------------

    def setup(self, state: State) -> CLIPBackbone:
        """Build (once) the CLIP model and its zero-shot classifier."""
        clip = resolve_clip(state, self.clip_options, self.cache)
        if self.clip is clip and self.weights is not None:
            return clip
        self.clip = clip
        names = class_names_for(state, self.class_names_option)
        templates = TIP_ADAPTER_TEMPLATES if self.templates == "tip_adapter" else self.templates
        self.weights = clip.zero_shot_weights(names, templates).float()
        return clip

    def scale(self) -> float:
        assert self.clip is not None
        return float(self.logit_scale_option) if self.logit_scale_option is not None else float(self.clip.logit_scale)

    def reset(self) -> None:
        """Empty both caches."""
        self.pos, self.neg, self.pending = {}, {}, None

    # --- the maths -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample_stats(self, state: State, x: torch.Tensor | None = None) -> list[SampleStats]:
        """Zero-shot feature, logits, entropy, probabilities and prediction of each image.

        ``x``: the images as CLIP takes them, made from ``state`` when not given and only when
        used (with several views, the views are cut from the raw images instead).
        """
        clip = self.setup(state)
        assert self.weights is not None
        if self.views > 1:
            views = make_views(raw_images(state), self.views, self.generator, clip, self.augmix)
        else:
            views = (clip_inputs(state, clip) if x is None else x).unsqueeze(1)
        B, V = views.shape[:2]
        feats = F.normalize(clip.encode_image(views.flatten(0, 1)).float(), dim=-1).view(B, V, -1)
        logits = self.scale() * feats @ self.weights.T  # B, V, C
        allowed = allowed_mask(state, logits.shape[-1])
        if allowed is not None:
            logits = mask_logits(logits, allowed)
        out = []
        for b in range(B):
            if V > 1:
                k = max(1, int(V * self.selection))
                idx = torch.argsort(entropy(logits[b]))[:k]
                chosen = logits[b, idx]
                mean_logits = chosen.mean(dim=0)
                out.append(SampleStats(feats[b, idx].mean(dim=0), mean_logits, float(avg_entropy(chosen)), chosen.softmax(dim=-1).mean(dim=0), int(mean_logits.argmax())))
            else:
                row = logits[b, 0]
                out.append(SampleStats(feats[b, 0], row, float(entropy(row)), row.softmax(dim=-1), int(row.argmax())))
        return out

    def updated(self, pos: Cache, neg: Cache, s: SampleStats) -> tuple[Cache, Cache]:
        """The caches after inserting one sample (official rules; labels are never involved)."""
        if self.positive:
            pos = update_cache(pos, s.pred, Entry(s.feature, s.entropy), self.pos_capacity)
        if self.negative:
            normalised = s.entropy / math.log2(s.logits.shape[-1])
            if self.neg_entropy[0] < normalised < self.neg_entropy[1]:
                neg = update_cache(neg, s.pred, Entry(s.feature, s.entropy, s.probs), self.neg_capacity)
        return pos, neg

    def final_logits(self, features: torch.Tensor, zero_shot: torch.Tensor, pos: Cache, neg: Cache) -> torch.Tensor:
        """Zero-shot logits + positive cache logits - negative cache logits, (B, C)."""
        out = zero_shot.float().clone()
        C = out.shape[-1]
        if self.positive and pos:
            out = out + cache_logits(features, *cache_tensors(pos, C), self.pos_alpha, self.pos_beta)
        if self.negative and neg:
            out = out - cache_logits(features, *cache_tensors(neg, C, self.neg_mask), self.neg_alpha, self.neg_beta)
        return out

    # --- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def test_stream_start(self, state: State) -> None:
        self.setup(state)

    @hookimpl
    def test_sample_start(self, state: State) -> None:
        self.setup(state)
        self.monitor.start()
        self.pending = None

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        return None  # training-free

    @hookimpl
    def forward(self, state: State) -> torch.Tensor | None:
        """TDA logits of ``state.inputs``; in "predict" the updated caches wait for ``test_sample_end``."""
        if state.phase == "train":
            return None
        stats = self.sample_stats(state)
        pos, neg = self.pos, self.neg
        rows = []
        for s in stats:
            new_pos, new_neg = self.updated(pos, neg, s)
            use = (new_pos, new_neg) if self.include_current else (pos, neg)
            rows.append(self.final_logits(s.feature.unsqueeze(0), s.logits.unsqueeze(0), *use))
            pos, neg = new_pos, new_neg
        if state.phase == "predict":
            self.pending = (pos, neg)
        state.features = torch.stack([s.feature for s in stats])
        return torch.cat(rows)

    @hookimpl
    def test_sample_end(self, state: State) -> None:
        """Commit the caches computed by the prediction (labels are not read here)."""
        if self.pending is not None:
            self.pos, self.neg = self.pending
            self.pending = None
        if state.logits is not None:
            self.monitor.record(state.logits, state.targets)

    @hookimpl
    def test_stream_end(self, state: State) -> None:
        self.monitor.publish(state, NAME)
        state.metrics[NAME].update({"positive_entries": sum(len(v) for v in self.pos.values()), "negative_entries": sum(len(v) for v in self.neg.values())})

    # --- checkpoints ---------------------------------------------------------------------------

    @staticmethod
    def _dump(cache: Cache) -> dict[int, list[dict[str, Any]]]:
        return {k: [{"feature": e.feature.cpu(), "entropy": e.entropy, "probs": None if e.probs is None else e.probs.cpu()} for e in v] for k, v in cache.items()}

    @staticmethod
    def _load(data: dict[int, list[dict[str, Any]]], device: torch.device) -> Cache:
        return {int(k): [Entry(e["feature"].to(device), float(e["entropy"]), None if e["probs"] is None else e["probs"].to(device)) for e in v] for k, v in data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"positive": self._dump(self.pos), "negative": self._dump(self.neg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.weights.device if self.weights is not None else torch.device("cpu")
        self.pos = self._load(state.get("positive", {}), device)
        self.neg = self._load(state.get("negative", {}), device)


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, TDA)
