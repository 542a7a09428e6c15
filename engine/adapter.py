"""An online adapter for deployed classifiers: predict, adapt as it goes, never fail a batch.

:class:`OnlineAdapter` wraps a frozen backbone plus a head (a timm ViT and its trained linear
classifier), or a CLIP backbone plus class names, and one or more test-time strategies
(``tpt``, ``dynaprompt``, any plugin of the test-time loop). ``predict(images)`` runs the
engine's own :class:`~driftprompt.engine.loop.TestTimeLoop` on every valid image, one at a
time, and returns one result per image: probabilities, or an error message for an image that
could not be used (wrong shape, wrong dtype, NaN or infinite values, pixel values so large that
the logits or probabilities are not finite, or a failure inside the model). One bad image never
raises for the batch, and never changes what the strategies carry to the next image: their
states are restored when an image fails.

Images may have any size, and sizes may differ within one call. Each image reaches the
strategies twice: preprocessed by the backbone (for a CLIP backbone, CLIP's own preprocessing:
shorter side to the model's resolution, bicubic, centre crop), and at full resolution in the
batch extras, ``state.batch["raw"]`` (a list with the one (3, H, W) image), so that strategies
that make views (TPT, DynaPrompt, TDA) cut them from the raw image as the official code does.

A lock serialises adaptation, so several threads (request handlers, a queue worker pool) may
share one adapter; predictions are made in arrival order of the lock.
"""

from __future__ import annotations

import threading
import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .config import OptimizerConfig
from .loop import EngineDefaults, TestTimeLoop
from .plugins import Hooks
from .state import State


@dataclass
class Prediction:
    """The outcome for one image.

    Attributes:
        probs: class probabilities (C,) on the CPU, or ``None`` when the image failed.
        error: why the image was rejected or failed, or ``None``.
    """

    probs: torch.Tensor | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> int | None:
        """The arg-max class, or ``None`` for a failed image."""
        return None if self.probs is None else int(self.probs.argmax())


def check_image(image: Any) -> str | None:
    """Why ``image`` cannot be classified, or ``None`` when it is a usable (3, H, W) image."""
    if not isinstance(image, torch.Tensor):
        return f"expected a torch.Tensor image, got {type(image).__name__}"
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        return f"expected an RGB image shaped (3, H, W), got {tuple(image.shape)}"
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        return f"expected uint8 (0-255) or float (0-1) pixels, got {image.dtype}"
    if image.dtype.is_floating_point and not bool(torch.isfinite(image).all()):
        return "the image holds NaN or infinite values"
    if image.dtype.is_floating_point and not bool(torch.isfinite(image.float()).all()):
        return "the image holds values too large for float32 pixels; pass pixels in 0-1 (float) or 0-255 (uint8)"
    return None


def _items(images: Any) -> list[Any] | None:
    """The images of a (B, 3, H, W) tensor, a (3, H, W) tensor or a sequence; ``None`` if neither."""
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.dim() == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    return None


class OnlineAdapter:
    """A deployed classifier that adapts online with test-time strategies.

    Args:
        backbone: a frozen ``ViTBackbone`` or ``CLIPBackbone``.
        strategies: ``(name, plugin)`` pairs, or plugins (named by their ``name`` attribute or
            class), in the order their hooks should run.
        head: the trained classifier on the backbone's features (``None`` for CLIP strategies
            that return their own logits).
        num_classes: classes of the head; taken from ``head.out_features`` or ``class_names``.
        class_names: one name per class (CLIP strategies read them from
            ``state.plugin_state["class_names"]``).
        steps: adaptation steps per image (``test_time.steps``).
        optimizer: the per-image optimizer (default AdamW, lr 5e-3, weight decay 0.01).
        reset_optimizer: fresh optimizer moments for every image.
        device: where the model runs (default: the backbone's device).
        amp_dtype: autocast dtype (``torch.bfloat16`` on CUDA), ``None`` for fp32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        strategies: Sequence[Any],
        head: nn.Module | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        steps: int = 1,
        optimizer: OptimizerConfig | None = None,
        reset_optimizer: bool = True,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        if device is None:
            device = next(iter(backbone.buffers()), next(iter(backbone.parameters()))).device
        device = torch.device(device)
        if num_classes is None:
            num_classes = getattr(head, "out_features", None) or (len(class_names) if class_names else None)
        if not num_classes:
            raise ValueError("OnlineAdapter needs num_classes, a head with out_features, or class_names.")
        named = [s if isinstance(s, tuple) else (getattr(s, "name", type(s).__name__.lower()), s) for s in strategies]
        self.state = State(backbone=backbone.to(device), head=head.to(device) if head is not None else None, device=device, amp_dtype=amp_dtype)
        self.state.num_classes = int(num_classes)
        if class_names:
            self.state.plugin_state["class_names"] = list(class_names)
        self.strategies = named
        self.hooks = Hooks(EngineDefaults(), named)
        self.loop = TestTimeLoop(self.state, self.hooks, named, steps, optimizer or OptimizerConfig(name="adamw", lr=5e-3, weight_decay=0.01), reset_optimizer, None, False)
        self.lock = threading.Lock()
        self.seen = 0

    def predict(self, images: torch.Tensor | Sequence[Any]) -> list[Prediction]:
        """Classify and adapt on every image of ``images`` ((B, 3, H, W) or a list of (3, H, W)).

        Returns one :class:`Prediction` per image, in order; invalid images, images whose
        adaptation raised and images whose logits or probabilities are not finite get an error,
        and the strategies' states are restored to what they were before that image, so the
        other images are unaffected. Anything that is neither a tensor nor a list of images
        (``None``, say) gives a single failed :class:`Prediction` naming what was expected.
        """
        items = _items(images)
        if items is None:
            return [Prediction(error=f"expected a (B, 3, H, W) tensor or a list of (3, H, W) image tensors, got {type(images).__name__}")]
        results: list[Prediction] = []
        for image in items:
            problem = check_image(image)
            if problem is not None:
                results.append(Prediction(error=problem))
                continue
            with self.lock:
                saved = self._snapshot()
                try:
                    image = image.to(self.state.device)
                    extras = {"index": torch.tensor([self.seen]), "raw": [image]}
                    self.loop.run([(image.unsqueeze(0), None, extras)], total=1)
                    logits = self.state.logits
                    assert logits is not None
                    logits = logits.detach().float()[0]
                    probs = logits.softmax(dim=-1)
                    if not (bool(torch.isfinite(logits).all()) and bool(torch.isfinite(probs).all())):
                        raise FloatingPointError("the logits or probabilities are not finite (are the pixel values in 0-1 for float or 0-255 for uint8?)")
                    results.append(Prediction(probs=probs.cpu()))
                except Exception as exc:  # noqa: BLE001 - one image's failure must not fail the batch
                    self.state.optimizer = None
                    self._restore(saved)
                    results.append(Prediction(error=f"{type(exc).__name__}: {exc}"))
                finally:
                    self.seen += 1
        return results

    def _snapshot(self) -> dict[str, Any]:
        """Copies of the strategies' states (restored when an image fails)."""
        return {name: copy.deepcopy(p.state_dict()) for name, p in self.strategies if hasattr(p, "state_dict") and hasattr(p, "load_state_dict")}

    def _restore(self, saved: dict[str, Any]) -> None:
        for name, plugin in self.strategies:
            if name in saved:
                try:
                    plugin.load_state_dict(saved[name])
                except Exception:  # noqa: BLE001 - a strategy that cannot restore keeps its state
                    pass

    def reset(self) -> None:
        """Return every strategy to its initial prompt (strategies that define ``reset()``)."""
        with self.lock:
            for _, plugin in self.strategies:
                if hasattr(plugin, "reset"):
                    plugin.reset()
            self.state.optimizer = None

    def state_dict(self) -> dict[str, Any]:
        """The strategies' states and the head's weights, for a restart of the service."""
        with self.lock:
            return {
                "seen": self.seen,
                "head": self.state.head.state_dict() if self.state.head is not None else None,
                "strategies": {name: p.state_dict() for name, p in self.strategies if hasattr(p, "state_dict")},
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        with self.lock:
            self.seen = int(state.get("seen", 0))
            if self.state.head is not None and state.get("head") is not None:
                self.state.head.load_state_dict(state["head"])
            for name, plugin in self.strategies:
                if name in state.get("strategies", {}) and hasattr(plugin, "load_state_dict"):
                    plugin.load_state_dict(state["strategies"][name])


__all__ = ["OnlineAdapter", "Prediction", "check_image"]
