"""What prompt strategies hand to the backbone for one forward pass.

Three ways to condition a frozen ViT, all of which may be combined and contributed by several
strategies at once:

* **prompt tuning, shallow** (``tokens``): learnable tokens inserted after the class token at
  layer 0 (L2P, Wang et al., CVPR 2022; VPT-Shallow, Jia et al., ECCV 2022);
* **prompt tuning, deep** (``deep``): fresh tokens at the input of chosen blocks, replacing the
  previous block's outputs at those positions (VPT-Deep);
* **prefix tuning** (``prefix``): extra keys and values prepended inside the attention of chosen
  blocks (Li & Liang, ACL 2021; DualPrompt, Wang et al., ECCV 2022; CODA-Prompt, Smith et al.,
  CVPR 2023). Prefixes are added after the key/value projections, per head, as in the
  reference implementations of DualPrompt and CODA-Prompt.

Every tensor is either shared by the batch, shaped (L, D), or per sample, shaped (B, L, D).
Keys and values are separate tensors, so batch and key/value axes can never be mixed up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POOLS = ("cls", "prompt_mean")


def _check(t: torch.Tensor, what: str) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{what} must have shape (L, D) or (B, L, D), got {tuple(t.shape)}")


def _batched(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(batch_size, -1, -1) if t.dim() == 2 else t


@dataclass
class Prompts:
    """Prompts contributed by strategies in ``before_forward``; consumed by the backbone.

    Attributes:
        tokens: layer-0 prompt tokens, concatenated in order of arrival.
        deep: block index -> tokens fed to that block in the deep-prompt slot. All entries
            must have the same length; the slot sits right after the layer-0 tokens.
        prefix: block index -> list of (key, value) prefixes, concatenated in order.
        pool: how the backbone turns tokens into the head's feature: ``"cls"`` (the
            final-norm class token) or ``"prompt_mean"`` (mean of the output tokens at the
            layer-0 prompt positions, L2P's prompt head).
    """

    tokens: list[torch.Tensor] = field(default_factory=list)
    deep: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    pool: str = "cls"

    def add_tokens(self, tokens: torch.Tensor) -> None:
        """Queue prompt tokens for insertion at layer 0."""
        _check(tokens, "prompt tokens")
        self.tokens.append(tokens)

    def add_deep(self, layer: int, tokens: torch.Tensor) -> None:
        """Feed ``tokens`` to block ``layer`` in the deep-prompt slot (VPT-Deep)."""
        _check(tokens, f"deep prompt tokens for layer {layer}")
        if layer in self.deep:
            raise ValueError(f"two strategies set deep prompts for layer {layer}; deep prompts of one layer come from one strategy")
        self.deep[layer] = tokens

    def add_prefix(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Prepend ``key``/``value`` prefixes to the attention of block ``layer``."""
        _check(key, f"prefix key for layer {layer}")
        _check(value, f"prefix value for layer {layer}")
        if key.shape[-2:] != value.shape[-2:]:
            raise ValueError(f"prefix key {tuple(key.shape)} and value {tuple(value.shape)} of layer {layer} differ in length or width")
        self.prefix.setdefault(layer, []).append((key, value))

    @property
    def empty(self) -> bool:
        """True when nothing would change the plain frozen forward pass."""
        return not self.tokens and not self.deep and not self.prefix and self.pool == "cls"

    @property
    def num_tokens(self) -> int:
        """Number of layer-0 prompt tokens."""
        return sum(t.shape[-2] for t in self.tokens)

    def stacked(self, batch_size: int) -> torch.Tensor | None:
        """All layer-0 tokens as one (B, L, D) tensor, or ``None``."""
        if not self.tokens:
            return None
        return torch.cat([_batched(t, batch_size) for t in self.tokens], dim=1)

    def prefix_at(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (B, Lp, D) key and value prefixes of block ``layer``, or ``None``."""
        parts = self.prefix.get(layer)
        if not parts:
            return None
        keys = torch.cat([_batched(k, batch_size) for k, _ in parts], dim=1)
        values = torch.cat([_batched(v, batch_size) for _, v in parts], dim=1)
        return keys, values

    def deep_at(self, layer: int, batch_size: int) -> torch.Tensor | None:
        t = self.deep.get(layer)
        return None if t is None else _batched(t, batch_size)
