"""Plumbing shared by the prompt strategies: their parameters, the class mask, checkpoints.

A strategy that subclasses :class:`PromptStrategy` keeps its learnable tensors in
``self.params`` (an ``nn.ParameterDict``) and gets, for free, the train-time class mask of
L2P/DualPrompt (when ``self.train_mask`` is true), the reference ports' head initialisation
(:meth:`PromptStrategy.init_head`) and ``state_dict``/``load_state_dict`` that save and
restore those tensors plus whatever ``extra_state`` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import mask_to_current_experience

HEAD_INITS = ("trunc_normal", "torch")


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
    def init_head(state: State, mode: str, owner: str) -> None:
        """Initialise ``state.head`` as the L2P/DualPrompt ports' timm ViT does, or leave it.

        ``"trunc_normal"``: weights from a normal of std 0.02 truncated at +-2 (absolute bounds,
        as timm's ``trunc_normal_``) and zero bias, the ``init_weights_vit_timm`` rule the ports
        apply to their head (JH-LEE-KR/l2p-pytorch vision_transformer.py:519-524,
        JH-LEE-KR/dualprompt-pytorch vision_transformer.py:611-616). The draw uses its own
        generator seeded by the run's seed, so it is reproducible and leaves the global random
        stream untouched. ``"torch"`` keeps ``nn.Linear``'s default. A head loaded from
        ``test_time.head_checkpoint`` is never overwritten.
        """
        if mode not in HEAD_INITS:
            raise ConfigError(f"{owner} head_init {mode!r} does not exist; use one of {', '.join(HEAD_INITS)}.")
        head = state.head
        if mode == "torch" or not isinstance(head, nn.Linear):
            return
        if state.config is not None and state.config.test_time.head_checkpoint:
            return
        generator = torch.Generator().manual_seed(state.config.seed if state.config is not None else 0)
        weight = torch.empty(head.weight.shape, dtype=torch.float32)
        nn.init.trunc_normal_(weight, std=0.02, a=-2.0, b=2.0, generator=generator)
        with torch.no_grad():
            head.weight.copy_(weight)
            if head.bias is not None:
                head.bias.zero_()

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
