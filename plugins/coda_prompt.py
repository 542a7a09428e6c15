"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023).

Instead of picking prompts from a pool, CODA-Prompt assembles one prompt per image as a
weighted sum of prompt components. Each block in ``layers`` has M components P_m (length L),
keys K_m and attention vectors A_m (both of the query's width). For a frozen [CLS] query q the
weight of component m is

    alpha_m = cos(q * A_m, K_m)        (* is element-wise: A_m attends to features of q)

and the prompt is p = sum_m alpha_m P_m, split into L/2 key and L/2 value prefixes for that
block's attention. Everything is trained end to end with cross-entropy; there is no key-matching
surrogate loss.

Continual expansion: the pool is divided evenly over the experiences (100 components, 10 per
experience for 10 experiences). Experience t trains only its own slice; earlier components take
part in the sum but are frozen (detached), and later ones are not used yet. A new slice is
initialised orthogonal to every earlier component (Gram-Schmidt, done here with one QR
decomposition), for P, K and A separately. An optional penalty ``ortho_mu`` * ||X X^T - I||^2
keeps components orthogonal during training (0 by default, as in the paper's main runs).

Defaults reproduce the reference code, GT-RIPL/CODA-Prompt (cited as file:line):

* 100 components, length 8, orthogonality weight 0: experiments/cifar-100.sh:29
  (``--prompt_param 100 8 0.0``, read by trainer.py:126 as pool, length, ortho_mu); blocks
  0-4: models/zoo.py:46. The pool is split evenly over the tasks: models/zoo.py:99-101, 144-146.
* alpha = cos(q * A_m, K_m) and p = sum alpha_m P_m: models/zoo.py:163-171; first half of
  the prompt as key prefix, second half as value prefix: models/zoo.py:174-176, applied after
  the key/value projections per head: models/vit.py:68-73.
* earlier components detached and later ones unused while training, all seen ones at test:
  models/zoo.py:148-161. Here the frozen components also stay bit-identical through the
  optimizer step: the reference builds a fresh optimizer every task (learners/default.py:27,
  81-83), where Adam's zero-gradient update is exactly zero; with
  ``train.reset_optimizer: false`` (or weight decay) momentum would move them, so their
  values are restored after every optimizer step.
* a new slice orthonormal to every earlier component, Gram-Schmidt from Gaussian draws:
  models/zoo.py:51-71 and 75-131. The reference's classical Gram-Schmidt projects against the
  earlier (trained, no longer orthogonal) components one at a time; the QR here makes the new
  slice orthogonal to their span exactly.
* the query is the frozen [CLS] feature after the final norm of a no-grad pass of the same
  backbone: models/zoo.py:392-395; the class-token head: models/zoo.py:397-403, an
  ``nn.Linear`` with PyTorch's default initialisation (models/zoo.py:374), as the engine builds.
* only the current task's classes in the loss: learners/prompt.py:29-32.
* Adam (betas 0.9, 0.999, no weight decay) at learning rate 0.001 over prompts and head,
  batch 128, 20 epochs, a fresh optimizer per task: configs/cifar-100_prompt.yaml:4-11,
  learners/prompt.py:47-70. The schedule is the engine's ``train.scheduler: cosine_epoch``
  (utils/schedulers.py:47-57 stepped at learners/default.py:95): epochs 0 and 1 at the base
  rate, then lr * cos(99 pi (e - 1) / (200 (K - 1))). These are set in the run's config.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import PromptStrategy


# --- pure functions ---------------------------------------------------------------------


def component_weights(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """alpha (B, M): cosine similarity between q * A_m and K_m for every component m."""
    attended = query.float().unsqueeze(1) * attention.float().unsqueeze(0)  # B, M, D
    return (F.normalize(attended, dim=-1) * F.normalize(keys.float(), dim=-1).unsqueeze(0)).sum(dim=-1)


def assemble_prompt(weights: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """p (B, L, D) = sum_m alpha_m P_m for components (M, L, D)."""
    return torch.einsum("bm,mld->bld", weights, components.to(weights.dtype))


def orthogonal_extension(existing: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` unit rows orthogonal to each other and to the rows of ``existing`` (flattened).

    Gram-Schmidt on random Gaussian vectors against the existing rows, computed as the QR
    decomposition of [existing; new]^T: the columns of Q after the first ``len(existing)``
    are exactly the Gram-Schmidt residuals of the new vectors, normalised.
    """
    flat = existing.reshape(existing.shape[0], math.prod(existing.shape[1:])).float()
    n, d = flat.shape
    if n + count > d:
        raise ValueError(f"cannot hold {n + count} orthogonal components of width {d}")
    fresh = torch.randn(count, d, generator=generator, device="cpu").to(flat.device)
    q, r = torch.linalg.qr(torch.cat([flat, fresh]).T)
    new = q[:, n : n + count].T * torch.sign(torch.diagonal(r)[n : n + count]).unsqueeze(1)
    return new.reshape(count, *existing.shape[1:])


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of the rows' Gram matrix from the identity."""
    flat = x.reshape(x.shape[0], -1).float()
    return ((flat @ flat.T - torch.eye(flat.shape[0], device=flat.device)) ** 2).mean()


# --- the strategy -----------------------------------------------------------------------


class CODAPrompt(PromptStrategy):
    """Attention-weighted prompt components, expanded per experience, as attention prefixes.

    Args:
        pool_size: M, components per block over the whole stream (100).
        prompt_length: L, prefix length; L/2 key and L/2 value tokens (8).
        layers: blocks that receive prefixes ((0, 1, 2, 3, 4)).
        ortho_mu: weight of the orthogonality penalty (0.0).
        train_mask: mask logits outside the current experience while training (True).
    """

    def __init__(self, pool_size: int = 100, prompt_length: int = 8, layers: Sequence[int] = (0, 1, 2, 3, 4), ortho_mu: float = 0.0, train_mask: bool = True) -> None:
        if prompt_length < 2 or prompt_length % 2:
            raise ConfigError(f"coda_prompt prompt_length must be an even number of at least 2 (half keys, half values), got {prompt_length}.")
        if pool_size < 1 or not layers:
            raise ConfigError("coda_prompt needs a pool_size of at least 1 and at least one block in layers.")
        super().__init__()
        self.pool_size, self.prompt_length, self.layers = pool_size, prompt_length, [int(i) for i in layers]
        self.ortho_mu, self.train_mask = ortho_mu, train_mask
        self.per_experience = 0
        self.active = 0  # components in use: [0, active)
        self.first_trainable = 0  # components [first_trainable, active) are trained now
        self._ortho: torch.Tensor | None = None
        self._frozen: dict[str, torch.Tensor] = {}  # values of components [0, first_trainable)

    @hookimpl
    def init(self, state: State) -> None:
        state.backbone.check_layers(self.layers, "coda_prompt layers")
        dim = state.backbone.embed_dim
        if state.num_experiences > self.pool_size:
            raise ConfigError(f"coda_prompt has {self.pool_size} components for {state.num_experiences} experiences; set pool_size to at least {state.num_experiences}.")
        self.per_experience = self.pool_size // max(state.num_experiences, 1)
        if self.pool_size > dim:
            raise ConfigError(f"coda_prompt cannot keep {self.pool_size} orthogonal keys of width {dim}; set pool_size to at most {dim}.")
        for j in range(len(self.layers)):
            self.params[f"p{j}"] = nn.Parameter(torch.zeros(self.pool_size, self.prompt_length, dim, device=state.device))
            self.params[f"k{j}"] = nn.Parameter(torch.zeros(self.pool_size, dim, device=state.device))
            self.params[f"a{j}"] = nn.Parameter(torch.zeros(self.pool_size, dim, device=state.device))

    @hookimpl
    def experience_start(self, state: State) -> None:
        t = state.experience.index
        start, stop = t * self.per_experience, (t + 1) * self.per_experience
        with torch.no_grad():
            for param in self.params.values():
                param[start:stop] = orthogonal_extension(param[:start], stop - start)
        self.first_trainable, self.active = start, stop
        self._frozen = {name: param[:start].detach().clone() for name, param in self.params.items()}

    @hookimpl
    def after_optimizer_step(self, state: State) -> None:
        """Put back components outside [first_trainable, active) that the step may have moved.

        They carry no gradient (detached or unused), but Adam's momentum from earlier
        experiences (``train.reset_optimizer: false``) or weight decay still moves them.
        """
        if state.phase != "train" or not self._frozen:
            return
        with torch.no_grad():
            for name, param in self.params.items():
                frozen = self._frozen.get(name)
                if frozen is not None and frozen.shape[0]:
                    param[: frozen.shape[0]] = frozen
                param[self.active :] = 0.0

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        groups: list[dict[str, Any]] = []
        for j, layer in enumerate(self.layers):
            groups.append({"params": [self.params[f"p{j}"]], "name": f"coda.p{j}", "role": "prefix", "layer": layer})
            groups.append({"params": [self.params[f"k{j}"], self.params[f"a{j}"]], "name": f"coda.ka{j}", "role": "key", "layer": layer})
        groups.append({"params": list(state.head.parameters()), "name": "head", "role": "head"})
        return groups

    def _slice(self, name: str, training: bool) -> torch.Tensor:
        """Components in use; in training, those of earlier experiences are detached."""
        full = self.params[name]
        if not training or self.first_trainable == 0:
            return full[: self.active]
        return torch.cat([full[: self.first_trainable].detach(), full[self.first_trainable : self.active]])

    @hookimpl
    def before_forward(self, state: State) -> None:
        query = state.compute_query()
        training = state.phase == "train"
        half = self.prompt_length // 2
        ortho = []
        for j, layer in enumerate(self.layers):
            p, k, a = (self._slice(f"{n}{j}", training) for n in "pka")
            prompt = assemble_prompt(component_weights(query, k, a), p)
            state.prompts.add_prefix(layer, prompt[:, :half], prompt[:, half:])
            if training and self.ortho_mu > 0:
                ortho += [ortho_penalty(k), ortho_penalty(a), ortho_penalty(p)]
        self._ortho = torch.stack(ortho).sum() if ortho else None

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        terms = {"ce": cross_entropy(state)}
        if self._ortho is not None:
            terms["ortho"] = self.ortho_mu * self._ortho
        return terms

    def extra_state(self) -> dict[str, Any]:
        return {"active": self.active, "first_trainable": self.first_trainable}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.active, self.first_trainable = state["active"], state["first_trainable"]


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("coda_prompt", CODAPrompt)
