"""Test-time Prompt Tuning (Shu et al., NeurIPS 2022) on a frozen CLIP.

For every test image TPT builds 64 views (the image itself plus 63 random-resized-crop and
horizontal-flip views for ImageNet-style sets, or AugMix views for fine-grained sets), keeps the
10% of views whose predictions have the lowest entropy ("confidence selection"), and takes one
AdamW step (lr 5e-3) on CoOp-style text context vectors (4 vectors initialised from "a photo
of a") to minimise the entropy of the selected views' *averaged* probability. The prediction is
made on the original view with the tuned prompt; the prompt and the optimizer are then reset
(episodic). Defaults are those of the official code (azshue/TPT): ``-b 64 --selection_p 0.1
--lr 5e-3 --tta_steps 1 --n_ctx 4 --ctx_init a_photo_of_a``.

What differs from the official code, for speed and never for the maths:

* the image tower is frozen and only text prompts are tuned, so the views' image features are
  computed once per sample without gradients and reused by every step and by the prediction
  (the official code re-encodes the 64 views at every step);
* text is encoded only up to the longest prompt's end-of-text token (exact, see
  ``engine/clip.py``);
* views are made on the device in one batch from the already preprocessed image
  (``roi_align`` crops with bilinear sampling), rather than by PIL on the CPU from the raw
  image; bf16 autocast on CUDA.

This module also holds what the other CLIP test-time strategies share: the CLIP backbone
lookup, view generation, the official ``avg_entropy`` and confidence selection, and
:class:`OnlineMonitor` (probabilities for the calibration error, per-sample latency, peak
memory, and the collapse guard).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.clip import CLIPBackbone, clip_logits
from driftprompt.engine.loop import mask_logits
from driftprompt.engine.metrics import expected_calibration_error
from driftprompt.engine.runtime import autocast

log = logging.getLogger(__name__)

NAME = "tpt"


# --- the objective ----------------------------------------------------------------------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last axis."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the view-averaged probability, ``H(mean_v softmax(logits_v))``.

    Computed as the official TPT ``avg_entropy``: log-probabilities, then
    ``logsumexp`` over views minus ``log V`` (the log of the mean probability), clamped at
    the dtype's minimum so that ``p log p`` stays finite.

    Args:
        logits: (V, C) logits of V views, or (V, P, C) for P prompts.

    Returns:
        A scalar for (V, C); (P,) for (V, P, C).
    """
    logp = logits.float().log_softmax(dim=-1)
    avg = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(dim=-1)


def select_confident(logits: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``int(V * fraction)`` views with the lowest prediction entropy (at least one).

    For (V, P, C) logits, a view's entropy is the mean over the P prompts (as DynaPrompt's
    official code). Returns the kept logits and their view indices.
    """
    ent = entropy(logits)
    if ent.dim() > 1:
        ent = ent.mean(dim=-1)
    k = max(1, int(logits.shape[0] * fraction))
    idx = torch.argsort(ent, descending=False)[:k]
    return logits[idx], idx


# --- views ------------------------------------------------------------------------------------


def random_resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` crop boxes (x1, y1, x2, y2) drawn like torchvision's ``RandomResizedCrop``.

    Ten attempts per box: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``; the first attempt that fits is used, otherwise a centre crop of the
    whole image clamped to ``ratio`` (torchvision's fallback).
    """
    attempts = 10
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((n,), -1))
    boxes = torch.empty(n, 4)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    u = torch.rand(n, 2, generator=generator)
    for i in range(n):
        a = int(first[i])
        if a < 0:
            cw, ch = float(fw), float(fh)
            x0, y0 = (width - cw) / 2, (height - ch) / 2
        else:
            cw, ch = float(w[i, a]), float(h[i, a])
            x0 = math.floor(float(u[i, 0]) * (width - cw + 1))
            y0 = math.floor(float(u[i, 1]) * (height - ch + 1))
        boxes[i] = torch.tensor([x0, y0, x0 + cw, y0 + ch])
    return boxes


def crop_flip_views(image: torch.Tensor, n: int, generator: torch.Generator, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``n`` random-resized-crop + horizontal-flip views of one image (3, H, W), in one batch.

    Crops are resampled with ``roi_align`` (bilinear, averaging several samples per output
    pixel when shrinking), on the image's device. The image may be normalised: cropping,
    bilinear resampling and flipping commute with a per-channel affine normalisation.
    """
    from torchvision.ops import roi_align

    _, H, W = image.shape
    out = size or (H, W)
    boxes = random_resized_crop_boxes(n, H, W, generator)
    flips = torch.rand(n, generator=generator) < 0.5
    rois = torch.cat([torch.zeros(n, 1), boxes], dim=1).to(image.device, torch.float32)
    views = roi_align(image.float().unsqueeze(0), rois, output_size=out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = flips.to(image.device)
    return torch.where(flips.view(n, 1, 1, 1), views.flip(-1), views)


def _augmix_ops(generator: torch.Generator) -> list[Any]:
    """AugMix's operations at severity 1 (Hendrycks et al., ICLR 2020), as TPT uses them.

    The list excludes the colour, contrast, brightness and sharpness operations (they overlap
    ImageNet-C corruptions), as in AugMix's and TPT's ``augmentations.augmentations``. Level
    ``l ~ U(0.1, 1)``; integer magnitudes are ``int(l * max / 10)``, float ones ``l * max / 10``.
    """
    import torchvision.transforms.v2.functional as F2

    def level() -> float:
        return float(torch.empty(1).uniform_(0.1, 1.0, generator=generator))

    def sign() -> float:
        return 1.0 if float(torch.rand(1, generator=generator)) < 0.5 else -1.0

    def posterize(x: torch.Tensor) -> torch.Tensor:
        return F2.posterize(x, 4 - int(level() * 4 / 10))

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return F2.rotate(x, sign() * int(level() * 30 / 10))

    def solarize(x: torch.Tensor) -> torch.Tensor:
        return F2.solarize(x, 256 - int(level() * 256 / 10))

    def shear_x(x: torch.Tensor) -> torch.Tensor:
        return F2.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(sign() * level() * 0.3 / 10)), 0.0])

    def shear_y(x: torch.Tensor) -> torch.Tensor:
        return F2.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(sign() * level() * 0.3 / 10))])

    def translate_x(x: torch.Tensor) -> torch.Tensor:
        return F2.affine(x, angle=0.0, translate=[int(sign() * int(level() * x.shape[-1] / 3 / 10)), 0], scale=1.0, shear=[0.0, 0.0])

    def translate_y(x: torch.Tensor) -> torch.Tensor:
        return F2.affine(x, angle=0.0, translate=[0, int(sign() * int(level() * x.shape[-2] / 3 / 10))], scale=1.0, shear=[0.0, 0.0])

    return [F2.autocontrast, F2.equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y]


def augmix_views(image: torch.Tensor, n: int, generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``n`` AugMix views of one normalised image (3, H, W), as TPT's fine-grained setting.

    Each view: a random-resized crop and flip ``x``; three chains of 1-3 random operations on
    ``x``, mixed with Dirichlet(1, 1, 1) weights; ``m * x + (1 - m) * mix`` with
    ``m ~ Beta(1, 1)``. Operations run on uint8 pixels; mixing happens after normalisation
    (equivalent, the normalisation being affine).
    """
    base = crop_flip_views(image, n, generator)
    pixels = ((base * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1) * 255).round().to(torch.uint8)
    ops = _augmix_ops(generator)
    dirichlet = torch.distributions.Dirichlet(torch.ones(3))
    out = torch.empty_like(base)
    for i in range(n):
        w = dirichlet.sample().to(image.device)  # global RNG: Dirichlet takes no generator
        m = float(torch.rand(1, generator=generator))
        mix = torch.zeros_like(base[i])
        for j in range(3):
            x = pixels[i]
            for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                x = ops[int(torch.randint(len(ops), (1,), generator=generator))](x)
            mix += w[j] * ((x.float() / 255.0 - mean.view(3, 1, 1)) / std.view(3, 1, 1))
        out[i] = m * base[i] + (1 - m) * mix
    return out


def make_views(images: torch.Tensor, n_views: int, generator: torch.Generator, augmix: bool = False, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, n_views, 3, H, W): each original first, then augmented views."""
    out = []
    for image in images:
        if n_views <= 1:
            out.append(image.unsqueeze(0))
            continue
        if augmix:
            assert mean is not None and std is not None
            aug = augmix_views(image, n_views - 1, generator, mean.flatten().to(image.device), std.flatten().to(image.device))
        else:
            aug = crop_flip_views(image, n_views - 1, generator)
        out.append(torch.cat([image.unsqueeze(0).float(), aug], dim=0))
    return torch.stack(out)


# --- CLIP inputs shared by the CLIP strategies ------------------------------------------------


def resolve_clip(state: State, options: dict[str, Any] | None, cache: dict[str, Any]) -> CLIPBackbone:
    """The run's CLIP: ``state.backbone`` when it is one, else one built from ``options``.

    ``options`` are :class:`CLIPBackbone` keyword arguments (``name``, ``pretrained``,
    ``checkpoint``, ``model_config``, ``random_init``); the model is built once per strategy.
    """
    if isinstance(state.backbone, CLIPBackbone):
        return state.backbone
    if "clip" not in cache:
        if not options:
            raise ConfigError(
                "This strategy needs a CLIP model: run it on a CLIP backbone, or give its 'clip' option "
                "(e.g. {name: ViT-B-16, pretrained: openai}, or {model_config: cfg.json, checkpoint: weights.bin})."
            )
        cache["clip"] = CLIPBackbone(**options)
    clip = cache["clip"]
    return clip.to(state.device)


def clip_inputs(state: State, clip: CLIPBackbone) -> torch.Tensor:
    """``state.inputs`` as CLIP input: as is on a CLIP backbone, else re-normalised and resized.

    The loop preprocessed the batch with the run's backbone (mean/std and resolution of a timm
    ViT); those are undone and CLIP's applied.
    """
    assert state.inputs is not None
    if state.backbone is clip:
        return state.inputs
    backbone = state.backbone
    pixels = state.inputs.float() * backbone.std + backbone.mean
    return clip.preprocess(pixels.clamp(0, 1))


def class_names_for(state: State, names: Sequence[str] | None) -> list[str]:
    """The configured names, else ``state.plugin_state["class_names"]``, else ``class <i>``."""
    if names:
        if state.num_classes and len(names) != state.num_classes:
            raise ConfigError(f"class_names lists {len(names)} names but the stream has {state.num_classes} classes; give one name per class.")
        return list(names)
    shared = state.plugin_state.get("class_names")
    if shared:
        return list(shared)
    log.warning("No class names given: using 'class <i>'; a zero-shot CLIP classifier needs the real names (option class_names).")
    return [f"class {i}" for i in range(state.num_classes)]


def allowed_mask(state: State, num_classes: int) -> torch.Tensor | None:
    """The loop's class mask (classes seen by a continual run), or ``None`` when all are allowed."""
    seen = sorted(set(state.seen_classes))
    if not seen or len(seen) >= num_classes:
        return None
    mask = torch.zeros(num_classes, dtype=torch.bool, device=state.device)
    mask[torch.as_tensor(seen, device=state.device)] = True
    return mask


# --- online metrics and the collapse guard ----------------------------------------------------


class OnlineMonitor:
    """Per-sample bookkeeping that every test-time strategy of this package shares.

    Records the predicted probabilities (and labels, once revealed) for the expected
    calibration error, seconds per sample, peak CUDA memory, and runs the collapse guard.

    Collapse rule: over the last ``window`` predictions, with ``p_bar`` their mean predicted
    distribution, a collapse is declared when ``H(p_bar) < fraction * ln(min(C, window))``,
    i.e. the running predictions have concentrated on very few classes. (``ln(min(C, window))``
    is the largest entropy ``window`` confident predictions can have.) The strategy then resets
    to its initial prompt, the window is cleared, and ``resets`` counts it. ``window=0``
    disables the guard.
    """

    def __init__(self, window: int = 64, fraction: float = 0.1) -> None:
        if window < 0 or not 0.0 <= fraction < 1.0:
            raise ConfigError("collapse_window must be >= 0 and collapse_fraction in [0, 1).")
        self.window = window
        self.fraction = fraction
        self.recent: deque[torch.Tensor] = deque(maxlen=max(window, 1))
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.resets = 0
        self.samples = 0
        self.started = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        """Mark the start of a sample (latency)."""
        self.started = time.perf_counter()

    def record(self, logits: torch.Tensor, targets: torch.Tensor | None) -> bool:
        """Record one prediction; returns True when the collapse guard fires."""
        probs = logits.detach().float().softmax(dim=-1)
        self.samples += probs.shape[0]
        if self.started:
            self.seconds += time.perf_counter() - self.started
        if targets is not None:
            self.probs.append(probs.cpu())
            self.targets.append(targets.detach().cpu())
        if self.window == 0:
            return False
        for p in probs:
            self.recent.append(p)
        if len(self.recent) < self.window:
            return False
        mean = torch.stack(list(self.recent)).mean(dim=0)
        h = float(-(mean * mean.clamp_min(1e-12).log()).sum())
        if h < self.fraction * math.log(min(mean.shape[-1], self.window)):
            self.recent.clear()
            self.resets += 1
            return True
        return False

    def summary(self, device: torch.device | None = None) -> dict[str, Any]:
        """ECE (percent, 15 bins), collapse resets, seconds per sample, peak CUDA memory (MB)."""
        out: dict[str, Any] = {"collapse_resets": self.resets, "seconds_per_sample": self.seconds / max(self.samples, 1)}
        if self.probs:
            out["ece"] = expected_calibration_error(torch.cat(self.probs), torch.cat(self.targets))
        if device is not None and device.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return out

    def publish(self, state: State, name: str) -> None:
        """Write the summary to ``state.metrics[name]`` and the ECE into ``state.metrics["online"]``."""
        summary = self.summary(state.device)
        state.metrics[name] = summary
        online = state.metrics.get("online")
        if isinstance(online, dict):
            if "ece" in summary:
                online["ece"] = summary["ece"]
            online[f"{name}_collapse_resets"] = summary["collapse_resets"]
            if "peak_memory_mb" in summary:
                online["peak_memory_mb"] = summary["peak_memory_mb"]


# --- the strategy -----------------------------------------------------------------------------


class CLIPTestTimeBase:
    """Plumbing of the CLIP prompt strategies: the model, class tokens, the initial context."""

    name = "clip_tta"

    def __init__(self, class_names: Sequence[str] | None, clip: dict[str, Any] | None, n_ctx: int, ctx_init: str | None, seed: int) -> None:
        self.class_names_option = list(class_names) if class_names else None
        self.clip_options = dict(clip) if clip else None
        self.n_ctx = n_ctx
        self.ctx_init_words = ctx_init
        self.seed = seed
        self.cache: dict[str, Any] = {}
        self.clip: CLIPBackbone | None = None
        self.token_ids: torch.Tensor | None = None
        self.init_ctx: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, state: State) -> CLIPBackbone:
        """Build (once) the CLIP model, class token ids and the initial context."""
        clip = resolve_clip(state, self.clip_options, self.cache)
        if self.clip is clip and self.token_ids is not None:
            return clip
        self.clip = clip
        names = class_names_for(state, self.class_names_option)
        if self.ctx_init_words:
            init = clip.context_init(self.ctx_init_words)
            if init.shape[0] != self.n_ctx:
                raise ConfigError(f"ctx_init '{self.ctx_init_words}' has {init.shape[0]} tokens but n_ctx is {self.n_ctx}; make them agree.")
        else:
            init = torch.randn(self.n_ctx, clip.text_width, generator=self.generator).mul_(0.02).to(state.device)
        self.init_ctx = init.float()
        self.token_ids = clip.class_token_ids(names, self.n_ctx)
        return clip

    @torch.no_grad()
    def image_features(self, state: State, x: torch.Tensor) -> torch.Tensor:
        """Frozen image features (N, E), unit norm, fp32, under the run's autocast."""
        assert self.clip is not None
        with autocast(state.device, state.amp_dtype):
            return F.normalize(self.clip.encode_image(x).float(), dim=-1)


class TPT(CLIPTestTimeBase):
    """Test-time prompt tuning of CLIP text context by confident-view entropy (Shu et al., 2022).

    Args:
        class_names: one name per class; default: ``state.plugin_state["class_names"]``.
        clip: CLIP options when the run's backbone is not a CLIP (``CLIPBackbone`` kwargs).
        n_ctx: context vectors (4).
        ctx_init: words whose token embeddings initialise the context ("a photo of a");
            ``None`` draws N(0, 0.02) vectors.
        views: views per test image including the original (64).
        selection: fraction of lowest-entropy views kept (0.1: 6 of 64).
        augmix: AugMix views (TPT's setting for fine-grained sets) instead of crop + flip.
        lr: AdamW learning rate of the context (5e-3); the step count is ``test_time.steps``.
        episodic: restore the initial context before every sample (TPT's protocol).
        seed: seed of the view generator.
    """

    name = NAME

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        clip: dict[str, Any] | None = None,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        views: int = 64,
        selection: float = 0.1,
        augmix: bool = False,
        lr: float = 5e-3,
        episodic: bool = True,
        seed: int = 0,
    ) -> None:
        if views < 1 or not 0.0 < selection <= 1.0:
            raise ConfigError("tpt needs views >= 1 and selection in (0, 1].")
        super().__init__(class_names, clip, n_ctx, ctx_init, seed)
        self.views = views
        self.selection = selection
        self.augmix = augmix
        self.lr = lr
        self.episodic = episodic
        self.ctx: torch.Tensor | None = None
        self.view_features: torch.Tensor | None = None  # B, V, E
        self.selected: torch.Tensor | None = None  # B, k view indices, fixed at the first step
        self.loss: torch.Tensor | None = None
        self.monitor = OnlineMonitor(window=0)

    # --- state ---------------------------------------------------------------------------------

    def _ensure(self, state: State) -> CLIPBackbone:
        clip = self.setup(state)
        assert self.init_ctx is not None
        if self.ctx is None or self.ctx.device != self.init_ctx.device:
            start = self.init_ctx if self.ctx is None else self.ctx.detach().to(self.init_ctx.device)
            self.ctx = start.clone().requires_grad_(True)
        return clip

    def reset(self) -> None:
        """Restore the initial context exactly."""
        if self.ctx is not None and self.init_ctx is not None:
            with torch.no_grad():
                self.ctx.copy_(self.init_ctx)

    def text_features(self, grad: bool) -> torch.Tensor:
        """(C, E) unit-norm text features of the current context."""
        assert self.clip is not None and self.ctx is not None and self.token_ids is not None
        with torch.set_grad_enabled(grad):
            return self.clip.encode_text_with_context(self.ctx, self.token_ids)

    def view_logits(self, text: torch.Tensor, state: State) -> torch.Tensor:
        """(B, V, C) logits of every view under ``text`` features, masked to allowed classes."""
        assert self.view_features is not None and self.clip is not None
        logits = clip_logits(self.view_features, text, self.clip.logit_scale)
        allowed = allowed_mask(state, logits.shape[-1])
        return logits if allowed is None else mask_logits(logits, allowed)

    # --- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def test_stream_start(self, state: State) -> None:
        self._ensure(state)

    @hookimpl
    def test_sample_start(self, state: State) -> None:
        """Episodic reset, then the views and their frozen features, once per sample."""
        clip = self._ensure(state)
        self.monitor.start()
        if self.episodic:
            self.reset()
        x = clip_inputs(state, clip)
        views = make_views(x, self.views, self.generator, self.augmix, clip.mean, clip.std)
        B, V = views.shape[:2]
        self.view_features = self.image_features(state, views.flatten(0, 1)).view(B, V, -1)
        self.selected = None

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "adapt" or self.ctx is None:
            return None
        return [{"params": [self.ctx], "name": f"{NAME}.ctx", "role": "prompt", "lr": self.lr}]

    @hookimpl
    def forward(self, state: State) -> torch.Tensor | None:
        """CLIP logits of the original view(s), (B, C); in "adapt" also the selected-view loss."""
        if state.phase == "train":
            return None
        clip = self._ensure(state)
        if state.phase in ("adapt", "predict") and self.view_features is not None:
            text = self.text_features(grad=state.phase == "adapt")
            logits = self.view_logits(text, state)
            if state.phase == "adapt":
                self.loss = self.selected_loss(logits)
            state.features = self.view_features[:, 0]
            return logits[:, 0]
        # evaluation rounds of a continual run: zero-shot with the current context
        feats = self.image_features(state, clip_inputs(state, clip))
        state.features = feats
        return clip_logits(feats, self.text_features(grad=False), clip.logit_scale)

    def selected_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over images of ``avg_entropy`` of their confident views (selected at step 1)."""
        if self.selected is None:
            self.selected = torch.stack([select_confident(row.detach(), self.selection)[1] for row in logits])
        terms = [avg_entropy(row[idx]) for row, idx in zip(logits, self.selected)]
        return torch.stack(terms).mean()

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "adapt" or self.loss is None:
            return None
        return {f"{NAME}_entropy": self.loss}

    @hookimpl
    def test_sample_end(self, state: State) -> None:
        if state.logits is not None:
            self.monitor.record(state.logits, state.targets)
        self.loss = None

    @hookimpl
    def test_stream_end(self, state: State) -> None:
        self.monitor.publish(state, NAME)

    def state_dict(self) -> dict[str, Any]:
        return {"ctx": None if self.ctx is None else self.ctx.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ctx") is not None:
            self.ctx = state["ctx"].clone().requires_grad_(True)


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, TPT)
