"""What prompt strategies hand to the backbone for one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POOLS = ("cls", "prompt_mean")


@dataclass
class Prompts:
    """Prompts contributed by strategies in ``before_forward``; consumed by the backbone.

    Attributes:
        tokens: tensors of shape (B, L, D) or (L, D), inserted after the class token at
            layer 0 (prompt tuning). Several strategies may append; they are concatenated in
            order of arrival.
        pool: how the backbone turns tokens into the feature the head sees: ``"cls"`` (the
            final-norm class token) or ``"prompt_mean"`` (mean of the output tokens at the
            prompt positions, as in L2P).
    """

    tokens: list[torch.Tensor] = field(default_factory=list)
    pool: str = "cls"

    def add_tokens(self, tokens: torch.Tensor) -> None:
        """Queue prompt tokens for insertion at layer 0."""
        if tokens.dim() not in (2, 3):
            raise ValueError(f"prompt tokens must have shape (L, D) or (B, L, D), got {tuple(tokens.shape)}")
        self.tokens.append(tokens)

    @property
    def empty(self) -> bool:
        """True when nothing would change the plain frozen forward pass."""
        return not self.tokens and self.pool == "cls"

    def stacked(self, batch_size: int) -> torch.Tensor | None:
        """All layer-0 tokens as one (B, L, D) tensor, or ``None``."""
        if not self.tokens:
            return None
        parts = [t.unsqueeze(0).expand(batch_size, -1, -1) if t.dim() == 2 else t for t in self.tokens]
        return torch.cat(parts, dim=1)
