"""Sequential fine-tuning of a linear head on frozen features: the lower-bound baseline.

Each experience trains the head with cross-entropy on that experience's data only, with no
replay and no regularisation, so old classes are forgotten as new ones arrive. With
``mask_current=True`` the logits of classes outside the current experience are masked during
training (the "train-time class mask" that L2P, Wang et al., CVPR 2022, applies to its head),
which removes the bias toward new classes that plain fine-tuning suffers from.
"""

from __future__ import annotations

from typing import Any

import torch

from driftprompt.engine import State, hookimpl
from driftprompt.engine.loop import cross_entropy, mask_to_current_experience


class Finetune:
    """Train the linear head sequentially with cross-entropy.

    Args:
        mask_current: mask logits outside the current experience's classes while training.
    """

    def __init__(self, mask_current: bool = False) -> None:
        self.mask_current = bool(mask_current)

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        # Supervised only: nothing to adapt on unlabelled test samples.
        if state.phase != "train" or state.head is None:
            return None
        return [{"params": list(state.head.parameters()), "name": "head", "role": "head"}]

    @hookimpl
    def before_loss(self, state: State) -> None:
        if self.mask_current:
            mask_to_current_experience(state)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor]:
        return {"ce": cross_entropy(state)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("finetune", Finetune)
