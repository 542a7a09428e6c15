"""Plumbing shared by the prompt strategies: their parameters, the class mask, checkpoints.

A strategy that subclasses :class:`PromptStrategy` keeps its learnable tensors in
``self.params`` (an ``nn.ParameterDict``) and gets, for free, the train-time class mask of
L2P/DualPrompt (when ``self.train_mask`` is true) and ``state_dict``/``load_state_dict`` that
save and restore those tensors plus whatever ``extra_state`` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from driftprompt.engine import State, hookimpl
from driftprompt.engine.loop import mask_to_current_experience


class PromptStrategy:
    """Base class: ``params``, the class mask in ``before_loss``, and checkpointing."""

    train_mask: bool = True

    def __init__(self) -> None:
        self.params = nn.ParameterDict()

    @hookimpl
    def before_loss(self, state: State) -> None:
        if self.train_mask:
            mask_to_current_experience(state)

    @staticmethod
    def scaled_lr(base: float | None, state: State) -> dict[str, Any]:
        """``{"lr": base * batch / 256}`` for a parameter group (the papers' scaling rule), or ``{}``."""
        if base is None or state.config is None:
            return {}
        return {"lr": base * state.config.train.batch_size / 256.0}

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (counters, pointers); override as needed."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        del state

    def state_dict(self) -> dict[str, Any]:
        return {"params": {k: v.detach() for k, v in self.params.items()}, "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
        self.load_extra_state(state["extra"])
