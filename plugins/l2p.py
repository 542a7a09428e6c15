"""Learning to Prompt for Continual Learning (Wang et al., CVPR 2022).

L2P keeps a pool of M prompts, each of length L, with one learnable key per prompt. For every
image, the frozen ViT's [CLS] feature (the query) is matched against the keys by cosine
similarity; the N best-matching prompts are concatenated and inserted as tokens at layer 0 of
the same frozen ViT. The classifier reads the mean of the output tokens at the prompt
positions. Training minimises cross-entropy (with logits outside the current experience
masked) plus a "surrogate" pull constraint that moves the selected keys toward their queries,
weighted by lambda = 0.1. The optional diversified selection of the paper (Section 3.3)
penalises prompts that earlier experiences used often, so new experiences are steered toward
unused prompts.

Defaults reproduce the reference PyTorch port, JH-LEE-KR/l2p-pytorch (cited as file:line):

* M=10, L=5, N=5: configs/cifar100_l2p.py:79-81; lambda=0.1: configs/cifar100_l2p.py:92.
* prompts and keys drawn from U(-1, 1): prompt.py:23-25 and 32-34 (main.py:67 passes
  ``prompt_key_init='uniform'`` as the prompt initialiser too). Keys of width 768 drawn that
  way are nearly orthogonal (mean pairwise cosine about 0), where U(0, 1) gave 0.75.
* the frozen class-token position embedding is added to every prompt token: the port
  concatenates the prompts before the position embedding is added (vision_transformer.py:470-478)
  and lengthens that embedding by N*L positions (vision_transformer.py:386-388), which the
  pretrained checkpoint fills with copies of the class token's (``resize_pos_embed``,
  vision_transformer.py:662-671, called on loading at :620-628 and :696-703); the embedding is
  frozen (configs/cifar100_l2p.py:97). ``prompt_pos_embed="none"`` gives the paper's
  formulation (no position embedding), ``"learned"`` a learnable zero-initialised one.
* the prompt-mean head: configs/cifar100_l2p.py:96, vision_transformer.py:496-498; the head's
  weights trunc-normal (std 0.02), bias zero: vision_transformer.py:412-421 and 519-524.
* the train-time class mask: configs/cifar100_l2p.py:74, engine.py:59-64.
* Adam, learning rate 0.03 x batch / 256 with the per-device batch (``unscale_lr=True``),
  constant schedule, a fresh optimizer per task: configs/cifar100_l2p.py:15, 21, 24-25, 36,
  main.py:117-121, engine.py:227-229. Batch 16, 5 epochs and gradient clipping 1.0
  (configs/cifar100_l2p.py:4-5, 18) are set in the run's config.
* the loss: the port subtracts lambda * sum of the selected keys' cosines / B
  (engine.py:66-68, prompt.py:98-102); :func:`pull_loss` adds lambda * sum (1 - cos) / B,
  which is that plus the constant lambda * N, so gradients are identical.

Deliberate differences, each with an option that restores the port's behaviour:

* selection is per sample; the port's batch-wise majority vote (configs/cifar100_l2p.py:88,
  prompt.py:71-82) is ``batchwise_selection=True``. It leaks task identity when test batches
  come from one experience, so it warns. On tied counts it picks the lowest prompt id, where
  the port leaves the order to ``torch.topk``.
* the query comes from a no-grad pass of the *same* frozen backbone rather than a second copy
  of the model (main.py:48-55, engine.py:49-52); both hold the same weights and the query pass
  carries no prompts, so the query is the same number.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import HEAD_INITS, PromptStrategy

log = logging.getLogger(__name__)

HEADS = ("prompt", "cls")
PROMPT_POS_EMBEDS = ("cls", "none", "learned")


# --- pure functions ---------------------------------------------------------------------


def key_similarity(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every query (B, D) and every key (M, D): (B, M)."""
    return F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def select_prompts(keys: torch.Tensor, query: torch.Tensor, top_k: int, frequency: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, top_k) of the prompts whose keys best match each query.

    Without ``frequency`` this is the top-k cosine similarity. With ``frequency`` (the
    normalised selection counts h of earlier experiences, shape (M,)) it is the paper's
    diversified selection: the k smallest values of the cosine distance (1 - cos) times h,
    so that prompts earlier experiences used rarely are preferred.
    """
    sim = key_similarity(keys, query)
    if frequency is None:
        return sim.topk(top_k, dim=1).indices
    score = (1.0 - sim) * frequency.to(sim.dtype).unsqueeze(0)
    return score.topk(top_k, dim=1, largest=False).indices


def selection_counts(idx: torch.Tensor, pool_size: int, dtype: torch.dtype) -> torch.Tensor:
    """How often each of ``pool_size`` prompts appears in ``idx``.

    ``torch.bincount`` would give the same counts, but it reads the largest index back to the
    host on CUDA; ``index_add_`` into a tensor of known size stays on the device.
    """
    flat = idx.flatten()
    return torch.zeros(pool_size, dtype=dtype, device=idx.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


def batchwise_majority(idx: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Replace per-sample selections by the batch's ``top_k`` most frequent prompts (ties: lowest id)."""
    counts = selection_counts(idx, pool_size, torch.float32)
    # subtracting id / (pool + 1) < 1 breaks ties toward the lowest id without reordering counts
    tie_break = torch.arange(pool_size, device=idx.device, dtype=counts.dtype) / (pool_size + 1)
    top = (counts - tie_break).topk(idx.shape[1]).indices
    return top.unsqueeze(0).expand(idx.shape[0], -1)


def take_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` (rows of ``table`` picked by an index tensor of any shape), with a
    reproducible gradient.

    The gradient of advanced indexing accumulates with ``index_put_``, whose CPU kernel adds
    repeated indices in a thread-dependent order: two identical L2P runs on two threads then
    differ in the last bits of their prompts. ``index_select`` accumulates with ``index_add_``
    in a fixed order; the forward values are the same.
    """
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *table.shape[1:])


def pull_loss(keys: torch.Tensor, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Surrogate loss pulling the selected keys toward the query.

    Sum over the selected prompts of the cosine distance 1 - cos(q, k_s), averaged over the
    batch. The query carries no gradient (it comes from the frozen model), so only keys move.
    """
    q = F.normalize(query.float().detach(), dim=-1).unsqueeze(1)  # B, 1, D
    k = take_rows(F.normalize(keys.float(), dim=-1), idx)  # B, N, D
    return (1.0 - (q * k).sum(dim=-1)).sum(dim=1).mean()


def class_position_embedding(backbone: Any) -> torch.Tensor:
    """The frozen position embedding of the class token, (D,), detached.

    L2P's port gives every prompt token this embedding (see the module docstring). Raises a
    ``ConfigError`` for a backbone without one (no class token, or ``no_embed_class``).
    """
    model = getattr(backbone, "model", None)
    pos = getattr(model, "pos_embed", None)
    if pos is None or getattr(model, "no_embed_class", False) or getattr(backbone, "num_prefix_tokens", 0) < 1:
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ConfigError(f"l2p prompt_pos_embed='cls' needs a backbone whose class token has a position embedding, and '{name}' has none; set prompt_pos_embed to 'none' or 'learned'.")
    return pos.detach()[0, 0].clone()


def gather_prompts(prompts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Concatenate the selected prompts (M, L, D)[idx] into tokens of shape (B, N * L, D)."""
    selected = take_rows(prompts, idx)  # B, N, L, D
    return selected.reshape(idx.shape[0], -1, prompts.shape[-1])


# --- the strategy -----------------------------------------------------------------------


class L2P(PromptStrategy):
    """L2P: a pool of key-matched prompts inserted as tokens at layer 0.

    Args:
        pool_size: M, prompts in the pool (10).
        prompt_length: L, tokens per prompt (5).
        top_k: N, prompts selected per image (5).
        pull_coeff: lambda, weight of the key pull constraint (0.1).
        head: ``"prompt"`` (mean of prompt outputs, the paper's) or ``"cls"`` (class token).
        train_mask: mask logits outside the current experience while training (True).
        diversify: the paper's frequency-penalised selection during training (False).
        batchwise_selection: the reference port's batch majority vote (False; leaks task
            identity whenever a test batch comes from one experience).
        prompt_pos_embed: position embedding of the prompt tokens: ``"cls"`` adds the frozen
            class-token position embedding to each, as the port does (default); ``"none"``
            adds nothing (the paper's formulation); ``"learned"`` adds a learnable embedding
            initialised to zero. ``True``/``False`` are read as ``"learned"``/``"none"``.
        head_init: ``"trunc_normal"`` (std 0.02, zero bias, as the port; default) or
            ``"torch"`` (``nn.Linear``'s own initialisation).
        lr: base learning rate of prompts, keys and head, scaled by batch / 256 (0.03);
            ``None`` uses the run's optimizer setting.
    """

    def __init__(
        self,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        pull_coeff: float = 0.1,
        head: str = "prompt",
        train_mask: bool = True,
        diversify: bool = False,
        batchwise_selection: bool = False,
        prompt_pos_embed: str | bool = "cls",
        head_init: str = "trunc_normal",
        lr: float | None = 0.03,
    ) -> None:
        if isinstance(prompt_pos_embed, bool):
            prompt_pos_embed = "learned" if prompt_pos_embed else "none"
        if prompt_pos_embed not in PROMPT_POS_EMBEDS:
            raise ConfigError(f"l2p prompt_pos_embed {prompt_pos_embed!r} does not exist; use one of {', '.join(PROMPT_POS_EMBEDS)}.")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"l2p head_init {head_init!r} does not exist; use one of {', '.join(HEAD_INITS)}.")
        if pool_size < 1 or prompt_length < 1 or top_k < 1:
            raise ConfigError(f"l2p needs pool_size, prompt_length and top_k of at least 1, got {pool_size}, {prompt_length}, {top_k}.")
        if top_k > pool_size:
            raise ConfigError(f"l2p top_k ({top_k}) is larger than pool_size ({pool_size}); lower top_k or grow the pool.")
        if head not in HEADS:
            raise ConfigError(f"l2p head {head!r} does not exist; use one of {', '.join(HEADS)}.")
        if batchwise_selection:
            log.warning("l2p batchwise_selection=True: a test batch drawn from one experience votes for that experience's prompts, which leaks task identity.")
        super().__init__()
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.pull_coeff, self.head, self.train_mask = pull_coeff, head, train_mask
        self.diversify, self.batchwise_selection = diversify, batchwise_selection
        self.prompt_pos_embed, self.head_init, self.lr = prompt_pos_embed, head_init, lr
        self._cls_pos: torch.Tensor | None = None  # the frozen class-token position embedding
        self.counts: torch.Tensor | None = None  # selections per prompt, all training so far
        self.frequency: torch.Tensor | None = None  # normalised counts up to the previous experience
        self._idx: torch.Tensor | None = None

    @hookimpl
    def init(self, state: State) -> None:
        dim = state.backbone.embed_dim
        # U(-1, 1) prompts and keys: l2p-pytorch prompt.py:23-25 and 32-34
        self.params["prompts"] = nn.Parameter(torch.empty(self.pool_size, self.prompt_length, dim, device=state.device).uniform_(-1.0, 1.0))
        self.params["prompt_keys"] = nn.Parameter(torch.empty(self.pool_size, dim, device=state.device).uniform_(-1.0, 1.0))
        if self.prompt_pos_embed == "learned":
            self.params["pos"] = nn.Parameter(torch.zeros(self.top_k * self.prompt_length, dim, device=state.device))
        elif self.prompt_pos_embed == "cls":
            self._cls_pos = class_position_embedding(state.backbone).to(state.device)
        self.counts = torch.zeros(self.pool_size, device=state.device)
        self.init_head(state, self.head_init, "l2p")

    @hookimpl
    def experience_end(self, state: State) -> None:
        """Under torchrun each process counted its own selections: add them up."""
        assert self.counts is not None
        state.dist.reduce_delta_(self.counts, self._counts_base, "the prompt-count reduction")

    @hookimpl
    def experience_start(self, state: State) -> None:
        assert self.counts is not None
        self._counts_base = self.counts.clone()
        total = self.counts.sum()
        self.frequency = self.counts / total if self.diversify and state.experience.index > 0 else None

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        extra = self.scaled_lr(self.lr, state)
        groups = [
            {"params": [self.params["prompts"]], "name": "l2p.prompts", "role": "prompt", "layer": 0, **extra},
            {"params": [self.params["prompt_keys"]], "name": "l2p.keys", "role": "key", **extra},
            {"params": list(state.head.parameters()), "name": "head", "role": "head", **extra},
        ]
        if "pos" in self.params:
            groups.append({"params": [self.params["pos"]], "name": "l2p.pos", "role": "prompt", "layer": 0, **extra})
        return groups

    @hookimpl
    def before_forward(self, state: State) -> None:
        query = state.compute_query()
        training = state.phase == "train"
        idx = select_prompts(self.params["prompt_keys"], query, self.top_k, self.frequency if training else None)
        if self.batchwise_selection:
            idx = batchwise_majority(idx, self.pool_size)
        if training and self.counts is not None:
            self.counts += selection_counts(idx, self.pool_size, self.counts.dtype)
        self._idx = idx
        tokens = gather_prompts(self.params["prompts"], idx)
        if "pos" in self.params:
            tokens = tokens + self.params["pos"]
        elif self._cls_pos is not None:
            tokens = tokens + self._cls_pos.to(tokens.dtype)
        state.prompts.add_tokens(tokens)
        if self.head == "prompt":
            state.prompts.pool = "prompt_mean"

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        assert self._idx is not None
        return {"ce": cross_entropy(state), "pull": self.pull_coeff * pull_loss(self.params["prompt_keys"], state.compute_query(), self._idx)}

    def extra_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "frequency": self.frequency}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        device = self.params["prompts"].device  # checkpoints load on the CPU
        self.counts = state["counts"].to(device) if state["counts"] is not None else None
        self.frequency = state["frequency"].to(device) if state["frequency"] is not None else None


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("l2p", L2P)
