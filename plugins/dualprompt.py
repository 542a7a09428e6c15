"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al., ECCV 2022).

Two kinds of prompts condition a frozen ViT through prefix tuning (extra keys and values in
the attention of chosen blocks):

* the G(eneral)-prompt, shared by every experience, at blocks 0-1, length 5;
* E(xpert)-prompts, a pool of 10 with one key each, at blocks 2-4, length 5. While training
  experience t every sample uses E-prompt t (the "prompt mask"), so each experience trains its
  own expert; at test time the expert is chosen by cosine matching of the frozen [CLS] query
  against the keys (top-1). A pull constraint (weight 1.0) moves each expert's key toward the
  queries of its experience.

The classifier reads the class token. Training uses the train-time class mask. Defaults follow
the paper and the reference PyTorch port (uniform initialisation in [-1, 1], Adam with learning
rate 0.03 x batch / 256, batch 24, 5 epochs, constant schedule, gradient clipping 1.0 in the
configs). Prefix length L means L key tokens and L value tokens, as in that port. Unlike the
port, selection at test time is per sample (no batch-wise majority vote).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import PromptStrategy
from .l2p import pull_loss, select_prompts


class DualPrompt(PromptStrategy):
    """G-prompt plus key-matched E-prompts, both as attention prefixes.

    Args:
        g_length: G-prompt prefix length (5).
        g_layers: blocks that receive the G-prompt ((0, 1)).
        e_pool_size: number of E-prompts (10); at least the number of experiences.
        e_length: E-prompt prefix length (5).
        e_layers: blocks that receive the E-prompt ((2, 3, 4)).
        pull_coeff: weight of the key pull constraint (1.0).
        prompt_mask: train E-prompt t on experience t (True); False selects by key matching
            during training too.
        train_mask: mask logits outside the current experience while training (True).
        lr: base learning rate, scaled by batch / 256 (0.03); ``None`` uses the run's setting.
    """

    def __init__(
        self,
        g_length: int = 5,
        g_layers: Sequence[int] = (0, 1),
        e_pool_size: int = 10,
        e_length: int = 5,
        e_layers: Sequence[int] = (2, 3, 4),
        pull_coeff: float = 1.0,
        prompt_mask: bool = True,
        train_mask: bool = True,
        lr: float | None = 0.03,
    ) -> None:
        if e_pool_size < 1 or e_length < 1 or (g_layers and g_length < 1):
            raise ConfigError(f"dualprompt needs e_pool_size, e_length and g_length of at least 1, got {e_pool_size}, {e_length}, {g_length}.")
        if not e_layers:
            raise ConfigError("dualprompt needs at least one block in e_layers; the E-prompt is the method's core.")
        overlap = sorted(set(g_layers) & set(e_layers))
        if overlap:
            raise ConfigError(f"dualprompt g_layers and e_layers overlap at {overlap}; give each block to one kind of prompt.")
        super().__init__()
        self.g_length, self.g_layers = g_length, [int(i) for i in g_layers]
        self.e_pool_size, self.e_length, self.e_layers = e_pool_size, e_length, [int(i) for i in e_layers]
        self.pull_coeff, self.prompt_mask, self.train_mask, self.lr = pull_coeff, prompt_mask, train_mask, lr
        self._idx: torch.Tensor | None = None

    @hookimpl
    def init(self, state: State) -> None:
        state.backbone.check_layers(self.g_layers, "dualprompt g_layers")
        state.backbone.check_layers(self.e_layers, "dualprompt e_layers")
        if state.num_experiences > self.e_pool_size and self.prompt_mask:
            raise ConfigError(f"dualprompt has {self.e_pool_size} E-prompts for {state.num_experiences} experiences; set e_pool_size to at least {state.num_experiences}.")
        dim, dev = state.backbone.embed_dim, state.device

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=dev).uniform_(-1.0, 1.0))

        if self.g_layers:
            # (layer, key/value, length, dim): key and value are separate slices of axis 1
            self.params["g"] = uniform(len(self.g_layers), 2, self.g_length, dim)
        self.params["e"] = uniform(len(self.e_layers), 2, self.e_pool_size, self.e_length, dim)
        self.params["e_keys"] = uniform(self.e_pool_size, dim)

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        extra = self.scaled_lr(self.lr, state)
        groups = [
            {"params": [self.params["e"]], "name": "dualprompt.e", "role": "prefix", "layer": list(self.e_layers), **extra},
            {"params": [self.params["e_keys"]], "name": "dualprompt.e_keys", "role": "key", **extra},
            {"params": list(state.head.parameters()), "name": "head", "role": "head", **extra},
        ]
        if "g" in self.params:
            groups.insert(0, {"params": [self.params["g"]], "name": "dualprompt.g", "role": "prefix", "layer": list(self.g_layers), **extra})
        return groups

    def expert_index(self, state: State) -> torch.Tensor:
        """E-prompt per sample: the experience's own while training with the prompt mask, else top-1 by key."""
        query = state.compute_query()
        if state.phase == "train" and self.prompt_mask:
            return torch.full((query.shape[0], 1), state.experience.index, dtype=torch.long, device=query.device)
        return select_prompts(self.params["e_keys"], query, 1)

    @hookimpl
    def before_forward(self, state: State) -> None:
        idx = self.expert_index(state)
        self._idx = idx
        if "g" in self.params:
            for j, layer in enumerate(self.g_layers):
                state.prompts.add_prefix(layer, self.params["g"][j, 0], self.params["g"][j, 1])
        e = self.params["e"]
        for j, layer in enumerate(self.e_layers):
            # e[j, 0] is (pool, L, D); indexing with (B,) gives each sample its own (L, D) prefix
            state.prompts.add_prefix(layer, e[j, 0][idx[:, 0]], e[j, 1][idx[:, 0]])

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        assert self._idx is not None
        return {"ce": cross_entropy(state), "pull": self.pull_coeff * pull_loss(self.params["e_keys"], state.compute_query(), self._idx)}


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("dualprompt", DualPrompt)
