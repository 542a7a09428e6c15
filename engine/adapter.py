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

With ``batch_size > 1`` and strategies that adapt samples independently (each declares
``independent_samples``, as ``tpt`` does with ``episodic``), the valid images of a call are
adapted ``batch_size`` at a time in one step of the loop, each with its own prompt: the
results equal one at a time within fp32 rounding, the work is batched. Sizes may still differ:
each image is cut to the backbone's square on its own (the loop's preprocessing then only
normalises it), and the raw images travel as a list. A batch that raises is run again one
image at a time, so one bad image still fails alone.

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
from .errors import PluginError
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
    if image.dtype.is_floating_point and not bool(torch.isfinite(image.float()).all()):  # one pass for usable images
        if not bool(torch.isfinite(image).all()):
            return "the image holds NaN or infinite values"
        return "the image holds values too large for float32 pixels; pass pixels in 0-1 (float) or 0-255 (uint8)"
    return None


NOT_FINITE = "the logits or probabilities are not finite (are the pixel values in 0-1 for float or 0-255 for uint8?)"


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
        batch_size: images adapted together in one step when every strategy adapts samples
            independently and the optimizer is reset per image (1: one at a time). Memory
            grows with it (``tpt`` encodes batch x classes prompts; its ``chunk_size`` bounds that).
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
        batch_size: int = 1,
    ) -> None:
        if device is None:
            device = next(iter(backbone.buffers()), next(iter(backbone.parameters()))).device
        device = torch.device(device)
        if num_classes is None:
            num_classes = getattr(head, "out_features", None) or (len(class_names) if class_names else None)
        if not num_classes:
            raise ValueError("OnlineAdapter needs num_classes, a head with out_features, or class_names.")
        if int(batch_size) < 1:
            raise ValueError("OnlineAdapter batch_size must be >= 1.")
        self.batch_size = int(batch_size)
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
        results: list[Prediction | None] = [None] * len(items)
        valid = []
        for i, image in enumerate(items):
            problem = check_image(image)
            if problem is None:
                valid.append(i)
            else:
                results[i] = Prediction(error=problem)
        step = self.batch_size if self.batches_samples() else 1
        for start in range(0, len(valid), step):
            chunk = valid[start : start + step]
            if len(chunk) > 1:
                done = self._predict_batch([items[i] for i in chunk])
                if done is not None:
                    for i, p in zip(chunk, done):
                        results[i] = p
                    continue
            for i in chunk:  # one at a time, also when a batch raised
                results[i] = self._predict_one(items[i])
        return [p if p is not None else Prediction(error="not classified") for p in results]

    def batches_samples(self) -> bool:
        """Whether several images adapt in one step: ``batch_size > 1``, every strategy's
        samples independent, and a fresh optimizer per image (else samples would share moments)."""
        return self.batch_size > 1 and self.loop.reset_optimizer and all(getattr(p, "independent_samples", False) for _, p in self.strategies)

    def _predict_one(self, image: torch.Tensor) -> Prediction:
        with self.lock:
            saved = self._snapshot()
            try:
                image = image.to(self.state.device)
                extras = {"index": torch.tensor([self.seen]), "raw": [image]}
                self.loop.run([(image.unsqueeze(0), None, extras)], total=1)
                logits = self.state.logits
                assert logits is not None
                logits = logits.detach().float()[0]
                if not bool(torch.isfinite(logits).all()):  # then the fp32 softmax is finite too
                    raise FloatingPointError(NOT_FINITE)
                probs = logits.softmax(dim=-1)
                return Prediction(probs=probs.cpu())
            except Exception as exc:  # noqa: BLE001 - one image's failure must not fail the batch
                self.state.optimizer = None
                self._restore(saved)
                return Prediction(error=f"{type(exc).__name__}: {exc}")
            finally:
                self.seen += 1

    def _square(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's square cut of one image, as 0-1 pixels (1, 3, S, S): the loop only normalises it."""
        backbone = self.state.backbone
        return (backbone.preprocess(image.unsqueeze(0)) * backbone.std + backbone.mean).clamp_(0, 1)

    def _predict_batch(self, images: list[torch.Tensor]) -> list[Prediction] | None:
        """Adapt ``images`` in one step; ``None`` when the step raised (then nothing is kept)."""
        with self.lock:
            saved = self._snapshot()
            generators = self._generators()
            try:
                raw = [image.to(self.state.device) for image in images]
                squares = torch.cat([self._square(image) for image in raw])
                extras = {"index": torch.arange(self.seen, self.seen + len(raw)), "raw": raw}
                self.loop.run([(squares, None, extras)], total=1)
                logits = self.state.logits
                assert logits is not None and logits.shape[0] == len(raw)
                logits = logits.detach().float()
                probs = logits.softmax(dim=-1)
                ok = torch.isfinite(logits).all(dim=-1).tolist()
            except Exception:  # noqa: BLE001 - the images are retried one at a time, each failing alone
                self.state.optimizer = None
                self._restore(saved)
                for g, s in generators:
                    g.set_state(s)  # the retry draws the same views
                return None
            self.seen += len(raw)
            # samples are independent: a non-finite one leaves the others as they are
            return [Prediction(probs=p.cpu()) if good else Prediction(error=f"FloatingPointError: {NOT_FINITE}") for p, good in zip(probs, ok)]

    def _generators(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        """The strategies' view generators and their states, to rewind them when a batch is retried."""
        return [(p.generator, p.generator.get_state()) for _, p in self.strategies if isinstance(getattr(p, "generator", None), torch.Generator)]

    def _snapshot(self) -> dict[str, Any]:
        """Copies of the strategies' states (restored when an image fails)."""
        return {name: copy.deepcopy(p.state_dict()) for name, p in self.strategies if hasattr(p, "state_dict") and hasattr(p, "load_state_dict")}

    def _restore(self, saved: dict[str, Any]) -> None:
        for name, plugin in self.strategies:
            if name in saved:
                try:
                    plugin.load_state_dict(saved[name])
                except Exception as exc:  # adapting on from a half-changed state would be silent corruption
                    raise PluginError(
                        f"Strategy '{name}' could not restore its state after an image failed ({type(exc).__name__}: {exc}); "
                        "its state is now unknown: call reset() or build a new adapter."
                    ) from exc

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

    @classmethod
    def from_export(cls, path: Any, strategies: Sequence[Any] | None = None, **options: Any) -> OnlineAdapter:
        """Serve a file written by ``driftprompt export`` (``engine.export.export_run``).

        The backbone is rebuilt as the run's config says (by name, from a local file, or from
        the run's seed for ``weights: random``) and refused unless its weights are the trained
        ones; the trained strategies are rebuilt and loaded, and predict as the run's
        evaluation did (same logits, L2P's key matching included). ``strategies`` are
        test-time strategies added on top (``vpt_tta``...).

        Args:
            path: the ``.safetensors`` export.
            strategies: test-time plugins, ``(name, plugin)`` pairs or registered names.
            **options: ``backbone`` (a built backbone to check and use), ``weights`` (another
                source of the same weights), ``registry``, and ``OnlineAdapter``'s own
                (``steps``, ``optimizer``, ``device``, ``amp_dtype``, ``batch_size``...).
        """
        from .export import build_adapter, load_export

        return build_adapter(cls, load_export(path), strategies, **options)

    @classmethod
    def from_run(cls, run_dir: Any, strategies: Sequence[Any] | None = None, **options: Any) -> OnlineAdapter:
        """Serve a finished run's directory directly, as :meth:`from_export` serves its export."""
        from .export import build_adapter, read_run

        return build_adapter(cls, read_run(run_dir, options.get("registry")), strategies, **options)


__all__ = ["OnlineAdapter", "Prediction", "check_image"]
