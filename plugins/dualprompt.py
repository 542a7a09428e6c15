"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al., ECCV 2022).

Two kinds of prompts condition a frozen ViT through prefix tuning (extra keys and values in
the attention of chosen blocks):

* the G(eneral)-prompt, shared by every experience, at blocks 0-1, length 5;
* E(xpert)-prompts, a pool of 10 with one key each, at blocks 2-4, length 5. While training
  experience t every sample uses E-prompt t (the "prompt mask"), so each experience trains its
  own expert; at test time the expert is chosen by cosine matching of the frozen [CLS] query
  against the keys (top-1). A pull constraint (weight 1.0) moves each expert's key toward the
  queries of its experience.

The classifier reads the class token. Training uses the train-time class mask. Prefix length L
means L key tokens and L value tokens, as in the port.

Defaults reproduce the reference PyTorch port, JH-LEE-KR/dualprompt-pytorch (file:line):

* G-prompt length 5 at blocks (0, 1), prefix-tuned: configs/cifar100_dualprompt.py:78-81;
  E-prompts at blocks (2, 3, 4), prefix-tuned, pool 10, length 5, top-1:
  configs/cifar100_dualprompt.py:84-92; pull constraint 1.0: configs/cifar100_dualprompt.py:104.
* prompts and keys drawn from U(-1, 1): vision_transformer.py:430-435 (G), prompt.py:38-44
  (E) and 54-60 (keys); main.py:67 passes ``prompt_key_init='uniform'`` as the prompt
  initialiser.
* the prompt mask (E-prompt t trains on experience t): configs/cifar100_dualprompt.py:96,
  vision_transformer.py:530-536, prompt.py:113-114.
* prompt transfer: with the port's shared prompt pool (configs/cifar100_dualprompt.py:98) the
  E-prompt of experience t-1 is copied into slot t when experience t starts, every block and
  both key and value (engine.py:183-206); the key is not copied because the shared-key flag
  is off (configs/cifar100_dualprompt.py:99, engine.py:208-225). Options ``shared_prompt_pool``
  and ``shared_prompt_key``. The port then builds a fresh optimizer (reinit_optimizer,
  configs/cifar100_dualprompt.py:21, engine.py:227-229), as ``train.reset_optimizer: true``
  does here.
* the class-token head: configs/cifar100_dualprompt.py:109, vision_transformer.py:581-585; its
  weights trunc-normal (std 0.02), bias zero: vision_transformer.py:611-616.
* the train-time class mask: configs/cifar100_dualprompt.py:74, engine.py:59-64.
* Adam, learning rate 0.03 x batch / 256 (per-device batch), constant schedule:
  configs/cifar100_dualprompt.py:15, 24-25, 36, main.py:125-129. Batch 24, 5 epochs and
  gradient clipping 1.0 (configs/cifar100_dualprompt.py:4-5, 18) are set in the run's config.
* the loss: the port subtracts the pull term's cosine sum (engine.py:66-68); ours adds
  1 - cos, the same gradient (see ``l2p.pull_loss``).

Deliberate differences, each with an option that restores the port's behaviour:

* selection at test time is per sample; the port's batch-wise majority vote
  (configs/cifar100_dualprompt.py:100, prompt.py:100-111) is ``batchwise_selection=True``
  (it leaks task identity when a test batch comes from one experience, so it warns).
* the port reshapes the selected E-prompts (layer, key/value, batch, ...) straight into
  (layer, batch, key/value, ...) without a transpose (prompt.py:118-122), so when a batch
  shares one expert the first half of the batch gets the key prompt as both key and value and
  the second half the value prompt. Here each sample gets its expert's key and value;
  ``reference_reshape=True`` reproduces the port's layout.
* the query comes from the same frozen backbone rather than a second copy (main.py:48-55); the
  weights are the same, so is the query.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import HEAD_INITS, PromptStrategy
from .l2p import batchwise_majority, pull_loss, select_prompts, take_rows

log = logging.getLogger(__name__)


def reference_layout(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The port's E-prompt layout: (key/value, B, L, D) read as (B, key/value, L, D).

    dualprompt-pytorch prompt.py:118-122 reshapes ``prompt[:, :, idx]`` without moving the
    key/value axis past the batch axis; sample b then takes rows 2b and 2b + 1 of the stacked
    (key prompts of the batch, value prompts of the batch).
    """
    both = torch.stack([key, value]).reshape(key.shape[0], 2, *key.shape[1:])
    return both[:, 0], both[:, 1]


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
        shared_prompt_pool: copy E-prompt t-1 into slot t when experience t starts (True, the
            port's prompt transfer).
        shared_prompt_key: copy key t-1 into slot t as well (False, as the port).
        batchwise_selection: the port's batch majority vote over the selected experts
            (False; leaks task identity whenever a test batch comes from one experience).
        reference_reshape: feed E-prompts in the port's reshaped layout (False; see above).
        head_init: ``"trunc_normal"`` (std 0.02, zero bias, as the port; default) or
            ``"torch"`` (``nn.Linear``'s own initialisation).
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
        shared_prompt_pool: bool = True,
        shared_prompt_key: bool = False,
        batchwise_selection: bool = False,
        reference_reshape: bool = False,
        head_init: str = "trunc_normal",
        lr: float | None = 0.03,
    ) -> None:
        if head_init not in HEAD_INITS:
            raise ConfigError(f"dualprompt head_init {head_init!r} does not exist; use one of {', '.join(HEAD_INITS)}.")
        if batchwise_selection:
            log.warning("dualprompt batchwise_selection=True: a test batch drawn from one experience votes for that experience's expert, which leaks task identity.")
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
        self.shared_prompt_pool, self.shared_prompt_key = shared_prompt_pool, shared_prompt_key
        self.batchwise_selection, self.reference_reshape, self.head_init = batchwise_selection, reference_reshape, head_init
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
        self.init_head(state, self.head_init, "dualprompt")

    @hookimpl
    def experience_start(self, state: State) -> None:
        """Prompt transfer: E-prompt (and, if shared, key) t-1 is copied into slot t.

        dualprompt-pytorch engine.py:183-225 (top-1, so slot t is E-prompt t); skipped, as
        there, when slot t is outside the pool. Runs before the optimizer is (re)built.
        """
        t = state.experience.index
        if t == 0 or t >= self.e_pool_size:
            return
        with torch.no_grad():
            if self.shared_prompt_pool:
                self.params["e"][:, :, t] = self.params["e"][:, :, t - 1]
            if self.shared_prompt_key:
                self.params["e_keys"][t] = self.params["e_keys"][t - 1]

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
        idx = select_prompts(self.params["e_keys"], query, 1)
        return batchwise_majority(idx, self.e_pool_size) if self.batchwise_selection else idx

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
            key, value = take_rows(e[j, 0], idx[:, 0]), take_rows(e[j, 1], idx[:, 0])
            if self.reference_reshape:
                key, value = reference_layout(key, value)
            state.prompts.add_prefix(layer, key, value)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        assert self._idx is not None
        return {"ce": cross_entropy(state), "pull": self.pull_coeff * pull_loss(self.params["e_keys"], state.compute_query(), self._idx)}


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("dualprompt", DualPrompt)
