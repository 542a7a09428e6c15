"""Test-time Prompt Tuning (Shu et al., NeurIPS 2022) on a frozen CLIP.

For every test image TPT builds 64 views (the image itself, resized on its shorter side and
centre-cropped as CLIP preprocesses it, plus 63 random-resized-crop and horizontal-flip views
of the raw image for ImageNet-style sets, or AugMix views for fine-grained sets), keeps the
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
* views are cut on the device with torchvision from the raw image (``state.batch["raw"]``,
  kept by the ImageNet test-time streams and by ``OnlineAdapter``), rather than by PIL in
  DataLoader workers; AugMix's operations reproduce PIL's (see :func:`pil_affine`); every draw
  comes from one seeded ``torch.Generator``; bf16 autocast on CUDA where the official code
  runs fp16 autocast with a GradScaler.

Batches of independent samples (``per_sample``, with ``episodic``): when the test-time batch
holds B > 1 samples (``test_time.batch_size > 1``, or ``OnlineAdapter(batch_size=...)`` with
several images), every sample gets its own copy of the initial context, one (B, n_ctx, W)
parameter; the B x V views go through the image tower in one pass and the B x C prompts
through the text tower in one pass (``chunk_size`` bounds it); the loss is the *sum* of the
samples' selected-view entropies, so the gradient of each sample's context is that sample's
own. AdamW is element-wise (moments, bias correction by the shared step count, decoupled
weight decay ``p <- p (1 - lr wd)``), so one optimizer over the stacked tensor is B
independent optimizers with the same learning rate, and a batch gives the one-at-a-time
results within fp32 rounding. A sum rather than a mean keeps Adam's ``eps`` where it is for a
single sample. Without ``episodic`` (prompts carried across the stream), or with
``per_sample: false``, a batch shares one prompt and its loss is the mean over its samples,
as before.

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
from driftprompt.engine.clip import CLIPBackbone, clip_logits, clip_logits_per_sample
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
#
# The official code (azshue/TPT data/datautils.py:61-102, the same in kdiAAA/TDA
# datasets/utils.py:352-392 and the DynaPrompt repository's data/datautils.py) cuts every view
# from the *raw* decoded image: view 0 is ``Resize(224, bicubic) + CenterCrop(224)``; each other
# view is ``RandomResizedCrop(224)`` (bilinear) + ``RandomHorizontalFlip`` of the raw image,
# then, for AugMix, three chains of PIL operations mixed with Dirichlet/Beta weights. The
# functions below do the same on tensors, with one seedable ``torch.Generator`` for every draw.


def random_resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` crop boxes (x1, y1, x2, y2) drawn like torchvision's ``RandomResizedCrop``.

    Ten attempts per box: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``; the first attempt that fits is used, otherwise a centre crop of the
    whole image clamped to ``ratio`` (torchvision's fallback). Box corners are whole pixels.
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
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    u = torch.rand(n, 2, generator=generator).tolist()
    # plain Python numbers in the loop: per-element tensor indexing cost more than the crops
    firsts, ws, hs = first.tolist(), w.tolist(), h.tolist()
    rows = []
    for i in range(n):
        a = firsts[i]
        if a < 0:
            cw, ch = float(fw), float(fh)
            x0, y0 = float((width - fw) // 2), float((height - fh) // 2)
        else:
            cw, ch = ws[i][a], hs[i][a]
            x0 = math.floor(u[i][0] * (width - cw + 1))
            y0 = math.floor(u[i][1] * (height - ch + 1))
        rows.append([x0, y0, x0 + cw, y0 + ch])
    return torch.tensor(rows, dtype=torch.float32).reshape(n, 4)


def crop_flip_views(image: torch.Tensor, n: int, generator: torch.Generator, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``n`` random-resized-crop + horizontal-flip views of one image (3, H, W), (n, 3, *size).

    Boxes come from :func:`random_resized_crop_boxes` (drawn on the image's own size), then
    one flip bit per view. Each box is resized with torchvision's ``resized_crop`` (bilinear,
    antialiased: PIL's ``BILINEAR`` resize that TPT's ``RandomResizedCrop`` runs on PIL
    images). The dtype is kept: uint8 in, uint8 out. Pass the raw image, not a 224 x 224 copy.
    """
    import torchvision.transforms.v2.functional as TF

    _, H, W = image.shape
    out = tuple(size) if size is not None else (H, W)
    boxes = random_resized_crop_boxes(n, H, W, generator)
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    views = []
    for (x0, y0, x1, y1), flip in zip(boxes.tolist(), flips):
        v = TF.resized_crop(image, int(y0), int(x0), int(y1 - y0), int(x1 - x0), list(out), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        views.append(v.flip(-1) if flip else v)
    return torch.stack(views)


# AugMix's operations (Hendrycks et al., ICLR 2020) as TPT runs them on PIL images
# (azshue/TPT data/augmix_ops.py:56-114, google-research/augmix augmentations.py): the list
# without the colour, contrast, brightness and sharpness operations, which overlap ImageNet-C
# (augmix_ops.py:141-144). Severity 1: level ``l ~ U(0.1, 1)``, ``int(l * max / 10)`` for
# integer magnitudes, ``l * max / 10`` for float ones; the sign is a fair coin.

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x", "translate_y")


def pil_affine(image: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, coeffs, BILINEAR)`` on a uint8 (3, H, W) tensor.

    PIL maps each output pixel centre ``(x + 0.5, y + 0.5)`` to the input point
    ``(a x + b y + c, d x + e y + f)`` (origin at the top-left corner, not the centre); a
    point outside ``[0, W) x [0, H)`` gives black; otherwise bilinear interpolation between
    the pixel centres around it (edge pixels repeated), truncated to uint8 (Pillow
    ``libImaging/Geometry.c``, ``affine_transform`` and ``bilinear_filter32RGB``).
    """
    a, b, c, d, e, f = (float(v) for v in coeffs)
    _, H, W = image.shape
    dev = image.device
    ys = torch.arange(H, device=dev, dtype=torch.float64).add_(0.5).view(H, 1)
    xs = torch.arange(W, device=dev, dtype=torch.float64).add_(0.5).view(1, W)
    u = a * xs + b * ys + c
    v = d * xs + e * ys + f
    valid = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    u, v = u - 0.5, v - 0.5
    x0, y0 = u.floor(), v.floor()
    dx, dy = u - x0, v - y0
    xa, xb = x0.clamp(0, W - 1).long(), (x0 + 1).clamp(0, W - 1).long()
    ya, yb = y0.clamp(0, H - 1).long(), (y0 + 1).clamp(0, H - 1).long()
    img = image.double()
    top = img[:, ya, xa] + (img[:, ya, xb] - img[:, ya, xa]) * dx
    bottom = img[:, yb, xa] + (img[:, yb, xb] - img[:, yb, xa]) * dx
    out = (top + (bottom - top) * dy).clamp_(0, 255).floor_()
    return torch.where(valid, out, torch.zeros_like(out)).to(torch.uint8)


def pil_rotate_coeffs(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The affine coefficients of PIL's ``Image.rotate(degrees)`` about the image centre."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return (a, b, c, d, e, f)


def augmix_op(image: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """One AugMix operation at severity 1 on a uint8 (3, H, W) image, its draws from ``generator``."""
    import torchvision.transforms.v2.functional as TF

    def level() -> float:
        return float(torch.empty(1, dtype=torch.float64).uniform_(0.1, 1.0, generator=generator))

    def sign() -> float:
        return -1.0 if float(torch.rand(1, generator=generator, dtype=torch.float64)) > 0.5 else 1.0

    _, H, W = image.shape
    if name == "autocontrast":
        return TF.autocontrast(image)
    if name == "equalize":
        return TF.equalize(image)
    if name == "posterize":
        return TF.posterize(image, 4 - int(level() * 4 / 10))
    if name == "solarize":
        return TF.solarize(image, 256 - int(level() * 256 / 10))
    if name == "rotate":
        degrees = int(level() * 30 / 10) * sign()
        return image.clone() if degrees % 360 == 0 else pil_affine(image, pil_rotate_coeffs(degrees, W, H))
    if name in ("shear_x", "shear_y"):
        s = level() * 0.3 / 10 * sign()
        return pil_affine(image, (1, s, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, s, 1, 0))
    if name in ("translate_x", "translate_y"):
        # TPT's translate magnitude is int(l * IMAGE_SIZE / 3 / 10) with IMAGE_SIZE = 224, the view size
        t = int(level() * ((W if name == "translate_x" else H) / 3) / 10) * sign()
        return pil_affine(image, (1, 0, t, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, t))
    raise ValueError(f"unknown AugMix operation {name!r}")


def augmix_mix(view: torch.Tensor, generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """AugMix of one uint8 (3, S, S) crop, normalised (float): TPT's ``augmix`` (datautils.py:68-84).

    ``w ~ Dirichlet(1, 1, 1)`` (normalised Exp(1) draws), ``m ~ Beta(1, 1)`` (uniform); three
    chains of 1-3 operations drawn uniformly from :data:`AUGMIX_OPS`; the result is
    ``m * x + (1 - m) * sum_i w_i * chain_i(x)`` on normalised pixels.
    """
    e = -torch.rand(3, generator=generator, dtype=torch.float64).log()
    w = (e / e.sum()).float().tolist()
    m = float(torch.rand(1, generator=generator))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - mean.view(3, 1, 1)) / std.view(3, 1, 1)

    mix = torch.zeros(view.shape, device=view.device)
    for j in range(3):
        x = view
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            x = augmix_op(x, AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), (1,), generator=generator))], generator)
        mix += w[j] * norm(x)
    return m * norm(view) + (1 - m) * mix


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) as is; float (0-1) pixels scaled, rounded and clamped."""
    if image.dtype == torch.uint8:
        return image
    return (image.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def make_views(raw: Sequence[torch.Tensor], n_views: int, generator: torch.Generator, clip: CLIPBackbone, augmix: bool = False) -> torch.Tensor:
    """(B, n_views, 3, S, S) normalised CLIP views of B raw images of any sizes.

    ``raw`` are the decoded images at full resolution, uint8 (0-255) or float (0-1), (3, H, W)
    each. View 0 is CLIP's preprocessing (``CLIPBackbone.preprocess``: shorter side to S,
    bicubic, centre crop); views 1.. are :func:`crop_flip_views` of the raw image (uint8),
    and with ``augmix`` each is then mixed by :func:`augmix_mix`. Views are made in order
    view by view with ``generator`` (reproducible for a given seed).
    """
    size = clip.image_size
    mean, std = clip.mean.flatten(), clip.std.flatten()
    out = []
    for image in raw:
        image = image.to(mean.device)
        first = clip.preprocess(image.unsqueeze(0))
        if n_views <= 1:
            out.append(first)
            continue
        crops = crop_flip_views(to_uint8(image), n_views - 1, generator, size)
        if augmix:
            aug = torch.stack([augmix_mix(c, generator, mean, std) for c in crops])
        else:
            aug = (crops.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        out.append(torch.cat([first, aug], dim=0))
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


def raw_images(state: State) -> list[torch.Tensor]:
    """The batch's images at full resolution: ``state.batch["raw"]`` when the stream or the
    adapter kept them (the official pipelines cut views from the decoded image), else the
    preprocessed inputs turned back into 0-1 pixels (views then come from that square image).
    """
    raw = state.batch.get("raw") if isinstance(state.batch, dict) else None
    if raw is not None:
        return list(raw)
    assert state.inputs is not None
    backbone = state.backbone
    pixels = state.inputs.float() * backbone.std + backbone.mean
    return list(pixels.clamp(0, 1))


def clip_inputs(state: State, clip: CLIPBackbone) -> torch.Tensor:
    """The batch as CLIP input (B, 3, S, S), normalised.

    From the raw images when the batch carries them (CLIP's preprocessing: shorter side to S,
    bicubic, centre crop); else ``state.inputs`` as is on a CLIP backbone, or re-normalised
    and resized from another backbone's preprocessing (mean/std and resolution of a timm ViT).
    """
    assert state.inputs is not None
    raw = state.batch.get("raw") if isinstance(state.batch, dict) else None
    if raw is not None:
        return torch.cat([clip.preprocess(r.to(clip.mean.device).unsqueeze(0)) for r in raw])
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
        per_sample: with ``episodic``, adapt the samples of a batch independently, each with
            its own context, in one batched step (True); False shares one context over the
            batch (batch-wise TPT). Needs ``test_time.reset_optimizer: true``.
        chunk_size: text sequences (samples x classes) encoded at a time, checkpointed in the
            gradient pass so that memory stays at one chunk's activations; ``None`` encodes
            all at once (fastest, memory grows with the batch).
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
        per_sample: bool = True,
        chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if views < 1 or not 0.0 < selection <= 1.0:
            raise ConfigError("tpt needs views >= 1 and selection in (0, 1].")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError("tpt option chunk_size must be >= 1, or null to encode every prompt at once.")
        super().__init__(class_names, clip, n_ctx, ctx_init, seed)
        self.views = views
        self.selection = selection
        self.augmix = augmix
        self.lr = lr
        self.episodic = episodic
        self.per_sample = bool(per_sample)
        self.chunk_size = chunk_size
        self.ctx: torch.Tensor | None = None
        self.batch_ctx: torch.Tensor | None = None  # B, n_ctx, W: per-sample copies in a batched step
        self.view_features: torch.Tensor | None = None  # B, V, E
        self.selected: torch.Tensor | None = None  # B, k view indices, fixed at the first step
        self.loss: torch.Tensor | None = None
        self.monitor = OnlineMonitor(window=0)

    @property
    def independent_samples(self) -> bool:
        """Whether the samples of a batch are adapted independently (``OnlineAdapter`` batches them)."""
        return self.episodic and self.per_sample

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

    def text_features(self, grad: bool, shared: bool = False) -> torch.Tensor:
        """Unit-norm text features: (C, E) of the context, or (B, C, E) of the per-sample contexts.

        ``shared`` ignores the per-sample contexts of a batched step (evaluation rounds).
        """
        assert self.clip is not None and self.ctx is not None and self.token_ids is not None
        ctx = self.ctx if shared or self.batch_ctx is None else self.batch_ctx
        with torch.set_grad_enabled(grad):
            recompute = grad and self.chunk_size is not None
            return self.clip.encode_text_with_context(ctx, self.token_ids, chunk_size=self.chunk_size, recompute=recompute)

    def view_logits(self, text: torch.Tensor, state: State) -> torch.Tensor:
        """(B, V, C) logits of every view under ``text`` features, masked to allowed classes.

        ``text`` is (C, E), shared by the batch, or (B, C, E), one classifier per sample.
        """
        assert self.view_features is not None and self.clip is not None
        if text.dim() == 3:
            logits = clip_logits_per_sample(self.view_features, text, self.clip.logit_scale)
        else:
            logits = clip_logits(self.view_features, text, self.clip.logit_scale)
        allowed = allowed_mask(state, logits.shape[-1])
        return logits if allowed is None else mask_logits(logits, allowed)

    # --- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def test_stream_start(self, state: State) -> None:
        tt = getattr(state.config, "test_time", None)
        if tt is not None and self.independent_samples and tt.batch_size > 1 and not tt.reset_optimizer:
            # refused before any sample, not at the second batch (trainable_parameters keeps the
            # same check for callers that drive the loop without a config)
            raise ConfigError("tpt adapts the samples of a batch independently only with a fresh optimizer per sample; set test_time.reset_optimizer: true, or the tpt option per_sample: false.")
        self._ensure(state)

    @hookimpl
    def test_sample_start(self, state: State) -> None:
        """Episodic reset, then the views and their frozen features, once per sample."""
        clip = self._ensure(state)
        self.monitor.start()
        if self.episodic:
            self.reset()
        views = make_views(raw_images(state), self.views, self.generator, clip, self.augmix)
        B, V = views.shape[:2]
        self.view_features = self.image_features(state, views.flatten(0, 1)).view(B, V, -1)
        self.selected = None
        self.batch_ctx = None
        if B > 1 and self.independent_samples:
            assert self.ctx is not None
            self.batch_ctx = self.ctx.detach().unsqueeze(0).repeat(B, 1, 1).requires_grad_(True)

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "adapt" or self.ctx is None:
            return None
        if self.batch_ctx is not None:
            if state.optimizer is not None:
                # the optimizer was kept from the previous sample: its moments would tie the samples together
                raise ConfigError("tpt adapts the samples of a batch independently only with a fresh optimizer per sample; set test_time.reset_optimizer: true, or the tpt option per_sample: false.")
            return [{"params": [self.batch_ctx], "name": f"{NAME}.ctx", "role": "prompt", "lr": self.lr}]
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
        return clip_logits(feats, self.text_features(grad=False, shared=True), clip.logit_scale)

    def selected_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """``avg_entropy`` of each image's confident views (selected at step 1), reduced over images.

        The mean with a shared context; the sum with per-sample contexts, so that each
        sample's gradient is exactly its own loss's.
        """
        if self.selected is None:  # select_confident of every image at once: (B, k) view indices
            k = max(1, int(logits.shape[1] * self.selection))
            self.selected = torch.argsort(entropy(logits.detach()), dim=1)[:, :k]
        picked = logits.gather(1, self.selected[..., None].expand(-1, -1, logits.shape[-1]))  # B, k, C
        terms = avg_entropy(picked.transpose(0, 1))  # (k, B, C) -> (B,): each image's own views
        return terms.sum() if self.batch_ctx is not None else terms.mean()

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
