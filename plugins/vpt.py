"""Visual Prompt Tuning, deep variant (Jia et al., ECCV 2022), trained sequentially.

VPT-Deep feeds L learnable prompt tokens to every chosen transformer block: at block i the
tokens occupy the positions right after the class token, replacing whatever the previous
block produced there (``state.prompts.add_deep``). The backbone stays frozen; prompts and the
linear head are trained with cross-entropy. Trained one experience after another with the
growing head, with no pool, no keys and no regulariser, this is the "VPT-Seq" baseline of
Lu et al. (NeurIPS 2024, "Visual Prompt Tuning in Null Space for Continual Learning"), the
method that NSP (the ``nsp`` strategy) protects.

Defaults: prompts at every block, length 4 (the NSP reference setting), initialised uniformly
in [-v, v] with v = sqrt(6 / (3 * patch^2 + D)) (VPT's Xavier-uniform rule over the patch
embedding's fan-in), class-token head, the train-time class mask (the NSP code trains one
head per experience on that experience's classes, which the mask reproduces), and an optional
logit temperature for the cross-entropy (the NSP code divides logits by 28 on CIFAR-100).

Each block's prompts are their own parameter and their own group (``role: prompt``,
``layer: i``), so projection strategies can treat every layer separately.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import mask_to_current_experience


def xavier_bound(patch_size: int, dim: int) -> float:
    """VPT's initialisation bound: Xavier-uniform over a fan of 3 * patch^2 inputs and D outputs."""
    return math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))


def tempered_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of logits / temperature, in fp32."""
    return F.cross_entropy(logits.float() / temperature, targets)


class VPT:
    """VPT-Deep: fresh prompt tokens at every chosen block, trained with the head.

    Args:
        prompt_length: L, prompt tokens per block (4).
        layers: blocks that receive prompts (``None``: every block).
        train_mask: mask logits outside the current experience while training (True).
        temperature: divide logits by this in the cross-entropy (1.0; 28 in the NSP configs).
        lr: learning rate of prompts and head (``None``: the run's optimizer setting).
    """

    def __init__(self, prompt_length: int = 4, layers: Sequence[int] | None = None, train_mask: bool = True, temperature: float = 1.0, lr: float | None = None) -> None:
        if prompt_length < 1:
            raise ConfigError(f"vpt prompt_length must be at least 1, got {prompt_length}.")
        if layers is not None and not layers:
            raise ConfigError("vpt layers is empty; name at least one block, or leave it unset for every block.")
        if temperature <= 0:
            raise ConfigError(f"vpt temperature must be positive, got {temperature}.")
        self.prompt_length = int(prompt_length)
        self.layers = None if layers is None else [int(i) for i in layers]
        self.train_mask, self.temperature, self.lr = bool(train_mask), float(temperature), lr
        self.params = nn.ParameterList()

    @hookimpl
    def init(self, state: State) -> None:
        backbone = state.backbone
        if self.layers is None:
            self.layers = list(range(backbone.depth))
        backbone.check_layers(self.layers, "vpt layers")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"vpt layers {self.layers} repeat a block; list each block once.")
        patch = backbone.model.patch_embed.patch_size
        bound = xavier_bound(int(patch[0] if isinstance(patch, (tuple, list)) else patch), backbone.embed_dim)
        for _ in self.layers:
            self.params.append(nn.Parameter(torch.empty(self.prompt_length, backbone.embed_dim, device=state.device).uniform_(-bound, bound)))

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        extra: dict[str, Any] = {} if self.lr is None else {"lr": float(self.lr)}
        groups = [{"params": [p], "name": f"vpt.prompt{layer}", "role": "prompt", "layer": layer, **extra} for layer, p in zip(self.layers or [], self.params)]
        groups.append({"params": list(state.head.parameters()), "name": "head", "role": "head", **extra})
        return groups

    @hookimpl
    def before_forward(self, state: State) -> None:
        for layer, p in zip(self.layers or [], self.params):
            state.prompts.add_deep(layer, p)

    @hookimpl
    def before_loss(self, state: State) -> None:
        if self.train_mask:
            mask_to_current_experience(state)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        assert state.logits is not None and state.targets is not None
        return {"ce": tempered_cross_entropy(state.logits, state.targets, self.temperature)}

    def state_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers or []), "prompts": [p.detach() for p in self.params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layers"]) != list(self.layers or []):
            raise ConfigError(f"vpt checkpoint has prompts at blocks {state['layers']}, this run at {self.layers}; resume with the run's own config.")
        with torch.no_grad():
            for p, saved in zip(self.params, state["prompts"]):
                p.copy_(saved)


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("vpt", VPT)
