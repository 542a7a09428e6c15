"""Visual-prompt test-time adaptation of a deployed ViT classifier, with EATA's confidence filter.

The deployed model is the engine's frozen backbone (a timm ``ViTBackbone``, or a
``CLIPBackbone``'s image tower) and its trained linear head (``state.head``); neither changes.
This strategy adds ``prompt_length`` learnable tokens (10) at layer 0, right after the class
token (``state.prompts.add_tokens``, the VPT-Shallow position of Jia et al., ECCV 2022), and
adapts them online on the unlabelled test stream by entropy minimisation.

Confidence filter (EATA, Niu et al., "Efficient Test-Time Model Adaptation without
Forgetting", ICML 2022, Eq. 6 and the official ``e_margin = 0.4 * ln(1000)``): a sample takes
part in the loss only when the entropy of its prediction is below ``E0 = margin * ln C``
(``margin`` 0.4; ``C`` the number of classes the prediction may take). The loss is the mean
entropy of the kept samples; ``reweight: true`` multiplies each by EATA's
``1 / exp(H - E0)``. With a sample-wise stream (batch size 1) the filter is a per-sample gate:
an unconfident sample does not move the prompt at all. EATA's redundancy filter and Fisher
regulariser are not part of this strategy.

When every sample of a step is filtered the strategy still returns a loss, ``0 * prompt.sum()``
(the engine raises when strategies that declared parameters return no loss term), and drops
the prompt's gradient just before the optimizer step, so the step leaves the prompt untouched
(AdamW's weight decay included: the optimizer skips a parameter whose gradient is ``None``).

Initialisation: ``init: normal`` (default) draws N(0, ``init_std``^2) tokens, ``init_std``
0.02 (the scale of timm's class and register tokens); ``init: zero`` starts from zeros. Zero
tokens are not an identity: they still join attention, and a zero vector sits at LayerNorm's
singular point (zero variance), where its gradient is scaled by ``1 / sqrt(eps)``; the small
normal draw avoids that. In both cases the prompted model differs slightly from the source
model before any step.

Protocol: ``episodic: true`` (default) restores the initial prompt (and a fresh optimizer)
before every sample. ``episodic: false`` lets the prompt persist across the stream
(continual), with an optional reset every ``reset_every`` samples and the collapse guard of
:class:`~driftprompt.plugins.tpt.OnlineMonitor` (window 64, fraction 0.1; ``collapse_window:
0`` turns it off). A reset restores the initial prompt and drops ``state.optimizer``, so the
optimizer's moments restart with it (EATA's and SAR's reset of model and optimizer states).

The prompts are applied only to test-time passes (phases "adapt" and "predict"): training and
evaluation rounds of a continual run see the plain source model. The step count, optimizer and
learning rate are the run's ``test_time`` settings (AdamW, lr 5e-3 by default); the ``lr``
option overrides the rate for the prompt group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl

from .tpt import OnlineMonitor, entropy

NAME = "vpt_tta"
INITS = ("normal", "zero")


def entropy_threshold(num_classes: int, margin: float = 0.4) -> float:
    """EATA's confidence threshold ``E0 = margin * ln C`` (nats)."""
    return margin * math.log(num_classes)


def filtered_entropy(logits: torch.Tensor, threshold: float, reweight: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Mean entropy of the samples whose entropy is below ``threshold`` (EATA's filter).

    Args:
        logits: (B, C) logits.
        threshold: ``E0`` in nats; a sample is kept when ``H < E0`` (strictly).
        reweight: weight each kept entropy by ``1 / exp(H - E0)`` (EATA's Eq. 7, detached).

    Returns:
        ``(loss, entropies (B,), kept mask (B,))``; ``loss`` is ``None`` when no sample is kept.
    """
    ent = entropy(logits)
    keep = ent < threshold
    if not bool(keep.any()):
        return None, ent, keep
    kept = ent[keep]
    if reweight:
        kept = kept * torch.exp(-(kept.detach() - threshold))
    return kept.mean(), ent, keep


class VPTTTA:
    """Online prompt-token adaptation of a frozen ViT + head by confident-sample entropy.

    Args:
        prompt_length: layer-0 prompt tokens (10).
        init: "normal" (N(0, init_std^2), default) or "zero".
        init_std: standard deviation of the normal initialisation (0.02).
        margin: EATA's ``E0 = margin * ln C`` threshold factor (0.4).
        reweight: EATA's ``1 / exp(H - E0)`` sample weights on the kept entropies (off).
        episodic: restore the initial prompt before every sample (True); False adapts
            continually.
        reset_every: continual mode: also reset every N samples (0: never).
        collapse_window: continual mode: window of the collapse guard (64; 0 turns it off).
        collapse_fraction: collapse when ``H(mean p) < fraction * ln(min(C, window))`` (0.1).
        lr: learning rate of the prompt group (``None``: ``test_time.optimizer.lr``).
        seed: seed of the initial draw.
    """

    name = NAME

    def __init__(
        self,
        prompt_length: int = 10,
        init: str = "normal",
        init_std: float = 0.02,
        margin: float = 0.4,
        reweight: bool = False,
        episodic: bool = True,
        reset_every: int = 0,
        collapse_window: int = 64,
        collapse_fraction: float = 0.1,
        lr: float | None = None,
        seed: int = 0,
    ) -> None:
        if prompt_length < 1:
            raise ConfigError(f"vpt_tta prompt_length must be at least 1, got {prompt_length}.")
        if init not in INITS:
            raise ConfigError(f"vpt_tta init must be one of {', '.join(INITS)}, got '{init}'.")
        if init_std < 0 or margin <= 0 or reset_every < 0:
            raise ConfigError("vpt_tta needs init_std >= 0, margin > 0 and reset_every >= 0.")
        self.prompt_length = int(prompt_length)
        self.init_mode = init
        self.init_std = float(init_std)
        self.margin = float(margin)
        self.reweight = bool(reweight)
        self.episodic = bool(episodic)
        self.reset_every = int(reset_every)
        self.lr = lr
        self.seed = int(seed)
        self.monitor = OnlineMonitor(window=0 if episodic else collapse_window, fraction=collapse_fraction)
        self.prompt: nn.Parameter | None = None
        self.init_prompt: torch.Tensor | None = None
        self.samples = 0
        self.kept = 0
        self.scored = 0
        self.resets = 0
        self.all_filtered = False

    # --- state ---------------------------------------------------------------------------------

    @staticmethod
    def token_width(backbone: nn.Module) -> int:
        """Width of the image tower's tokens: ``vision_width`` of a CLIP, ``embed_dim`` of a timm ViT."""
        return int(getattr(backbone, "vision_width", None) or backbone.embed_dim)

    def _ensure(self, state: State) -> nn.Parameter:
        if self.prompt is None:
            width = self.token_width(state.backbone)
            if self.init_mode == "zero":
                init = torch.zeros(self.prompt_length, width)
            else:
                g = torch.Generator().manual_seed(self.seed)
                init = torch.randn(self.prompt_length, width, generator=g) * self.init_std
            self.init_prompt = init.to(state.device)
            self.prompt = nn.Parameter(self.init_prompt.clone())
        elif self.prompt.device != state.device:
            assert self.init_prompt is not None
            self.init_prompt = self.init_prompt.to(state.device)
            self.prompt = nn.Parameter(self.prompt.detach().to(state.device))
        return self.prompt

    def reset(self, state: State | None = None) -> None:
        """Restore the initial prompt exactly; with ``state``, also drop the optimizer."""
        if self.prompt is not None and self.init_prompt is not None:
            with torch.no_grad():
                self.prompt.copy_(self.init_prompt)
            self.prompt.grad = None
        if state is not None:
            state.optimizer = None

    def num_classes(self, state: State, logits: torch.Tensor) -> int:
        """Classes the prediction may take: the seen classes of a continual run, else all."""
        seen = len(set(state.seen_classes))
        return seen if 0 < seen < logits.shape[-1] else logits.shape[-1]

    # --- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def init(self, state: State) -> None:
        self._ensure(state)

    @hookimpl
    def test_sample_start(self, state: State) -> None:
        """Episodic reset, or the periodic reset of a continual stream."""
        self._ensure(state)
        self.monitor.start()
        if self.episodic or (self.reset_every and self.samples and self.samples % self.reset_every == 0):
            self.reset(state)
            if not self.episodic:
                self.resets += 1
        self.all_filtered = False

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "adapt":
            return None
        extra: dict[str, Any] = {} if self.lr is None else {"lr": float(self.lr)}
        return [{"params": [self._ensure(state)], "name": f"{NAME}.prompt", "role": "prompt", "layer": 0, **extra}]

    @hookimpl
    def before_forward(self, state: State) -> None:
        if state.phase in ("adapt", "predict"):
            state.prompts.add_tokens(self._ensure(state))

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        """Entropy of the confident samples; a zero loss on the prompt when none is confident."""
        if state.phase != "adapt" or state.logits is None:
            return None
        prompt = self._ensure(state)
        threshold = entropy_threshold(self.num_classes(state, state.logits), self.margin)
        loss, _, keep = filtered_entropy(state.logits, threshold, self.reweight)
        self.scored += int(keep.numel())
        self.kept += int(keep.sum())
        self.all_filtered = loss is None
        if loss is None:
            loss = 0.0 * prompt.sum()
        return {f"{NAME}_entropy": loss}

    @hookimpl(trylast=True)
    def before_optimizer_step(self, state: State) -> None:
        """No confident sample: no update at all (not even weight decay)."""
        if state.phase == "adapt" and self.all_filtered and self.prompt is not None:
            self.prompt.grad = None

    @hookimpl
    def test_sample_end(self, state: State) -> None:
        if state.logits is not None:
            self.samples += int(state.logits.shape[0])
            if self.monitor.record(state.logits, state.targets) and not self.episodic:
                self.reset(state)
            state.metrics[f"{NAME}/collapse_resets"] = self.monitor.resets  # the loop logs each new reset
        self.all_filtered = False

    @hookimpl
    def test_stream_end(self, state: State) -> None:
        self.monitor.publish(state, NAME)
        state.metrics[NAME].update({"kept_fraction": self.kept / max(self.scored, 1), "scheduled_resets": self.resets})

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompt": None if self.prompt is None else self.prompt.detach().cpu(),
            "init_prompt": None if self.init_prompt is None else self.init_prompt.cpu(),
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("prompt") is None:
            return
        device = self.prompt.device if self.prompt is not None else torch.device("cpu")
        self.init_prompt = state["init_prompt"].to(device)
        self.prompt = nn.Parameter(state["prompt"].to(device))
        self.samples = int(state.get("samples", 0))


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, VPTTTA)
