"""Q-Tuning on a frozen ViT: a bounded queue of prompts (Guo et al., Findings of NAACL 2024).

Q-Tuning ("Queue-based Prompt Tuning for Lifelong Few-shot Language Learning", arXiv
2404.14607) was written for T5 and BERT. This strategy carries each of its parts onto a frozen
Vision Transformer, with every prompt inserted as tokens after the class token at layer 0:

* **Prompt encoder.** Experience t trains a new prompt P_t of length l (5), reparameterised by a
  residual MLP: the tokens used are enc(P_t) = P_t + MLP(P_t), the MLP being
  Linear(D, h) -> ReLU -> Linear(h, D) applied per token. The last layer starts at zero, so
  enc(P_t) = P_t at initialisation. The MLP belongs to its experience: when the experience
  ends only the encoded tokens are kept, and the next experience gets a fresh MLP.
* **Queue (Q-prompt).** The tokens of earlier experiences form a frozen queue F of at most
  C - l tokens; while training experience t the Q-prompt is Q = [F; enc(P_t)], at most C
  tokens (capacity C = 4 l = 20 by default: four experiences before the first eviction).
* **Adaptive knowledge aggregation.** Q (Lq x D) is reweighted element-wise by a learnable
  rank-one matrix W = u v^T (u over the Lq tokens, v over the D channels), trained per
  experience. u and v start at ones, so W o Q = Q exactly at initialisation and a new
  experience starts from the function the previous one ended with. When the experience
  ends, W o Q (detached) becomes the new frozen queue: what the model was evaluated with is
  exactly what is kept.
* **De-Q eviction.** When appending l new tokens would take the queue past C, the frozen part
  F (Lf x D) is first compressed along the token axis to its first k = C - l principal
  components: with the thin SVD F = U S V^T, the compressed queue is U_k^T F = S_k V_k^T,
  k tokens that are orthonormal mixtures of the old ones. Any linear read-out of the old
  tokens, F ~ U_k (U_k^T F), then loses exactly the discarded eigenvalue mass
  sum_{j>k} s_j^2 of F F^T (Eckart-Young). The PCA is about the origin, not the token mean:
  a direction every old prompt shares is the strongest piece of knowledge and must survive,
  and centring would need an extra mean token the budget does not have. Signs are fixed so
  that every component is a positively weighted mixture of the old tokens.
* **Globally shared prefix.** Lp (5) tokens trained through every experience, placed before
  the Q-prompt. Tokens rather than attention prefixes: the paper prepends its shared prefix
  to the input embeddings, like the Q-prompt, and the memory-retention term needs the output
  of "the model with the prefix alone", which is one ordinary prompted pass.
* **Memory retention (MR).** The loss gains -eta * I(x; z), where x is the final-norm [CLS]
  feature of the backbone given the shared prefix alone (a pass with autograd, so the
  gradient reaches the prefix) and z is the final-norm [CLS] feature given the frozen queue
  as it stood when the experience began, before its eviction (a pass without autograd; at
  experience 0 the queue is empty and z is the plain frozen feature). I is estimated with
  the Donsker-Varadhan bound of MINE (Belghazi et al., ICML 2018),
  I >= E_joint[T(x, z)] - log E_marginal[exp T(x, z')], with a statistics network T (an MLP on
  [x; z]) and z' the batch's z rolled by one (each x paired with another image's z). The
  gradient of the log-term uses MINE's moving-average denominator (rate 0.01). The paper
  motivates MR with eviction; here it runs in every experience by default (before the first
  eviction it keeps the prefix informative about the previous queue), which also keeps the
  cost of a step the same in every experience; ``mr_after_eviction_only`` restricts it to
  experiences whose start compressed the queue.

The head reads the class token; training uses cross-entropy with the logits outside the
current experience masked (the train-time class mask of L2P and DualPrompt) plus the MR term.
The Q-prompt never exceeds C tokens, so training and inference cost stay constant however many
experiences arrive. Unlike the paper (task-incremental, task identity at test time), every
test image here sees the one current queue: the scenario is class-incremental.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import BackboneError, ConfigError, Prompts, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import PromptStrategy

NAME = "qprompt"


# --- pure functions ---------------------------------------------------------------------


def aggregate(queue: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Adaptive knowledge aggregation: (u v^T) o Q for a queue (Lq, D), u (Lq,) and v (D,)."""
    return queue * (u.unsqueeze(1) * v.unsqueeze(0)).to(queue.dtype)


def pca_evict(queue: torch.Tensor, components: int) -> torch.Tensor:
    """De-Q: compress a queue (Lq, D) to its first ``components`` principal components.

    PCA along the token axis, about the origin: with the thin SVD Q = U S V^T the result is
    U_k^T Q = S_k V_k^T, k tokens that are orthonormal mixtures of the old ones, ordered by
    decreasing energy. Each column of U_k is given the sign that makes its entries sum to a
    non-negative number. A queue that already has at most ``components`` tokens is returned
    unchanged.
    """
    if components < 0:
        raise ValueError(f"cannot keep {components} principal components")
    if queue.shape[0] <= components:
        return queue
    work = queue if queue.dtype in (torch.float32, torch.float64) else queue.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    if components > s.shape[0]:
        raise ValueError(f"a queue of {queue.shape[0]} tokens of width {queue.shape[1]} has only {s.shape[0]} principal components, not {components}")
    sign = torch.where(u[:, :components].sum(dim=0) < 0, -1.0, 1.0)
    return ((s[:components] * sign).unsqueeze(1) * vh[:components]).to(queue.dtype)


def roll_pairs(z: torch.Tensor) -> torch.Tensor:
    """Samples of the product of marginals: z rolled by one along the batch (no image keeps its own)."""
    return torch.roll(z, shifts=1, dims=0)


def donsker_varadhan(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """The DV lower bound on mutual information: mean(T_joint) - log mean(exp T_marginal)."""
    n = t_marginal.shape[0]
    return t_joint.float().mean() - (torch.logsumexp(t_marginal.float(), dim=0) - math.log(n))


def mine_estimate(t_joint: torch.Tensor, t_marginal: torch.Tensor, log_ema: torch.Tensor | None, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MINE: the DV estimate, carrying the bias-corrected gradient, and the updated moving average.

    The value returned is the DV bound of the batch. Its gradient is MINE's corrected one,
    grad mean(T_joint) - grad mean(exp T_marginal) / ema, where ema is the moving average of
    mean(exp T_marginal) over batches (kept in log space; the first batch starts it).

    Args:
        t_joint: T(x_i, z_i), shape (B,).
        t_marginal: T(x_i, z'_i) for mismatched pairs, shape (B,).
        log_ema: log of the moving average so far, or ``None`` before the first batch.
        rate: weight of the new batch in the moving average (MINE's alpha).

    Returns:
        (estimate, new_log_ema); ``new_log_ema`` carries no gradient.
    """
    t_marginal = t_marginal.float()
    log_mean_exp = torch.logsumexp(t_marginal, dim=0) - math.log(t_marginal.shape[0])
    current = log_mean_exp.detach()
    if log_ema is None:
        new_log_ema = current
    else:
        new_log_ema = torch.logaddexp(log_ema.detach() + math.log1p(-rate), current + math.log(rate)) if rate < 1 else current
    joint = t_joint.float().mean()
    corrected = joint - torch.exp(log_mean_exp - new_log_ema)  # gradient: grad E[e^T] / ema
    value = (joint - log_mean_exp).detach()
    return value + (corrected - corrected.detach()), new_log_ema


# --- modules ----------------------------------------------------------------------------


class ResidualPromptEncoder(nn.Module):
    """enc(P) = P + MLP(P), the MLP applied per token; identity at initialisation.

    Args:
        dim: token width D.
        hidden: width h of the MLP's hidden layer.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt + self.up(F.relu(self.down(prompt)))


class StatisticsNetwork(nn.Module):
    """MINE's statistics network T(x, z) = MLP([x; z]) -> one score per pair.

    Args:
        dim: width of x and of z.
        hidden: width of the two hidden layers.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.float(), z.float()], dim=-1)).squeeze(-1)


# --- the strategy -----------------------------------------------------------------------


class QPrompt(PromptStrategy):
    """Q-Tuning for ViT: a capped queue of per-experience prompts, a shared prefix and MR.

    Args:
        prompt_length: l, tokens of each experience's new prompt (5).
        capacity: C, most tokens the Q-prompt (queue plus new prompt) may hold (20 = 4 l).
        prefix_length: Lp, tokens of the globally shared prefix (5).
        encoder_hidden: hidden width of the residual prompt encoder; ``None`` uses D / 2.
        mr_coeff: eta, weight of the memory-retention term -eta * I(x; z) (0.1); 0 turns it off.
        mine_hidden: hidden width of the statistics network T (64).
        mine_ema: rate of MINE's moving average of the partition term (0.01).
        mr_after_eviction_only: apply MR only in experiences whose start compressed the
            queue (False: in every experience).
        train_mask: mask logits outside the current experience while training (True).
        lr: base learning rate of every group this strategy declares (head included), scaled
            by batch / 256 as in ``l2p``; ``None`` (default) uses the run's optimizer setting.
    """

    def __init__(
        self,
        prompt_length: int = 5,
        capacity: int = 20,
        prefix_length: int = 5,
        encoder_hidden: int | None = None,
        mr_coeff: float = 0.1,
        mine_hidden: int = 64,
        mine_ema: float = 0.01,
        mr_after_eviction_only: bool = False,
        train_mask: bool = True,
        lr: float | None = None,
    ) -> None:
        prompt_length, capacity, prefix_length = int(prompt_length), int(capacity), int(prefix_length)
        if prompt_length < 1 or prefix_length < 1 or capacity < 1:
            raise ConfigError(f"qprompt needs prompt_length, prefix_length and capacity of at least 1, got {prompt_length}, {prefix_length}, {capacity}.")
        if capacity < prompt_length:
            raise ConfigError(f"qprompt capacity ({capacity}) is smaller than prompt_length ({prompt_length}); the queue must hold at least one new prompt, so raise capacity.")
        if encoder_hidden is not None and int(encoder_hidden) < 1:
            raise ConfigError(f"qprompt encoder_hidden must be at least 1 (or null for half the width), got {encoder_hidden}.")
        if float(mr_coeff) < 0 or int(mine_hidden) < 1 or not 0 < float(mine_ema) <= 1:
            raise ConfigError(f"qprompt needs mr_coeff >= 0, mine_hidden >= 1 and 0 < mine_ema <= 1, got {mr_coeff}, {mine_hidden}, {mine_ema}.")
        super().__init__()  # self.params holds the run-long prefix
        self.prompt_length, self.capacity, self.prefix_length = prompt_length, capacity, prefix_length
        self.encoder_hidden = None if encoder_hidden is None else int(encoder_hidden)
        self.mr_coeff, self.mine_hidden, self.mine_ema = float(mr_coeff), int(mine_hidden), float(mine_ema)
        self.mr_after_eviction_only, self.train_mask = bool(mr_after_eviction_only), bool(train_mask)
        self.lr = None if lr is None else float(lr)
        self.current = nn.ParameterDict()  # this experience's prompt and aggregation vectors u, v
        self.encoder: ResidualPromptEncoder | None = None
        self.critic: StatisticsNetwork | None = None
        self.queue: torch.Tensor | None = None  # frozen tokens of earlier experiences, (Lf, D)
        self.reference: torch.Tensor | None = None  # the queue before this experience's eviction
        self.evicted = False  # this experience's start compressed the queue
        self.active = False  # an experience is being trained: its prompt is in the Q-prompt
        self.log_ema: torch.Tensor | None = None
        self.last_mi: torch.Tensor | None = None
        self.device = torch.device("cpu")
        self.dim = 0

    # --- construction -----------------------------------------------------------------

    @hookimpl
    def init(self, state: State) -> None:
        backbone = state.backbone
        dim = int(backbone.embed_dim)
        if getattr(backbone, "num_prefix_tokens", 1) < 1:
            raise BackboneError(f"qprompt reads the class token, but '{getattr(backbone, 'name', 'the backbone')}' has none; choose a ViT with a class token.")
        if self.capacity - self.prompt_length > dim:
            raise BackboneError(
                f"qprompt keeps capacity - prompt_length = {self.capacity - self.prompt_length} principal components when it evicts, "
                f"but tokens of width {dim} have at most {dim}; set capacity to at most {dim + self.prompt_length}."
            )
        self.dim, self.device = dim, state.device
        self.params["prefix"] = nn.Parameter(torch.empty(self.prefix_length, dim, device=state.device).uniform_(-1, 1))
        self.queue = torch.zeros(0, dim, device=state.device)
        self.reference = self.queue
        if self.mr_coeff > 0:
            self.critic = StatisticsNetwork(dim, self.mine_hidden).to(state.device)

    def _new_experience_parts(self, queue_tokens: int) -> None:
        """A fresh prompt, encoder and aggregation vectors for a Q-prompt of queue_tokens + l tokens."""
        dev = self.device
        self.current["prompt"] = nn.Parameter(torch.empty(self.prompt_length, self.dim, device=dev).uniform_(-1, 1))
        self.current["u"] = nn.Parameter(torch.ones(queue_tokens + self.prompt_length, device=dev))
        self.current["v"] = nn.Parameter(torch.ones(self.dim, device=dev))
        self.encoder = ResidualPromptEncoder(self.dim, self.encoder_hidden or max(self.dim // 2, 1)).to(dev)

    # --- queue ------------------------------------------------------------------------

    def q_prompt(self) -> torch.Tensor:
        """The tokens after the prefix: W o [F; enc(P_t)] while training an experience, else F."""
        assert self.queue is not None
        if not self.active:
            return self.queue
        assert self.encoder is not None
        stacked = torch.cat([self.queue, self.encoder(self.current["prompt"])])
        return aggregate(stacked, self.current["u"], self.current["v"])

    @hookimpl
    def experience_start(self, state: State) -> None:
        assert self.queue is not None
        self.reference = self.queue
        keep = self.capacity - self.prompt_length
        self.evicted = self.queue.shape[0] > keep
        if self.evicted:
            self.queue = pca_evict(self.queue, keep)
        self._new_experience_parts(self.queue.shape[0])
        self.active = True

    @hookimpl
    def experience_end(self, state: State) -> None:
        if not self.active:
            return
        with torch.no_grad():
            self.queue = self.q_prompt().detach().clone()
        self.active = False

    # --- training ---------------------------------------------------------------------

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train" or not self.active:
            return None
        assert self.encoder is not None
        groups: list[dict[str, Any]] = [
            {"params": [self.params["prefix"]], "name": f"{NAME}.prefix", "role": "prompt", "layer": 0},
            {"params": [self.current["prompt"]], "name": f"{NAME}.prompt", "role": "prompt", "layer": 0},
            {"params": list(self.encoder.parameters()), "name": f"{NAME}.encoder", "role": "adapter", "layer": 0},
            {"params": [self.current["u"], self.current["v"]], "name": f"{NAME}.aggregation", "role": "other", "layer": 0},
        ]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "name": f"{NAME}.mine", "role": "other"})
        if state.head is not None:
            groups.append({"params": list(state.head.parameters()), "name": "head", "role": "head"})
        return [{**group, **self.scaled_lr(self.lr, state)} for group in groups]

    @hookimpl
    def before_forward(self, state: State) -> None:
        state.prompts.add_tokens(torch.cat([self.params["prefix"], self.q_prompt().to(self.params["prefix"].dtype)]))

    def memory_retention(self, state: State) -> torch.Tensor:
        """MINE estimate of I(x; z): x with the prefix alone (autograd), z with the reference queue (no autograd)."""
        assert self.critic is not None and self.reference is not None and state.inputs is not None
        backbone = state.backbone
        with_prefix = Prompts()
        with_prefix.add_tokens(self.params["prefix"])
        x = backbone(state.inputs, with_prefix)
        if self.reference.shape[0] == 0:
            z = state.compute_query()
        else:
            with torch.no_grad():
                old = Prompts()
                old.add_tokens(self.reference)
                z = backbone(state.inputs, old)
        z = z.detach()
        t_joint = self.critic(x, z)
        t_marginal = self.critic(x, roll_pairs(z))
        estimate, self.log_ema = mine_estimate(t_joint, t_marginal, self.log_ema, self.mine_ema)
        return estimate

    def _mr_applies(self, state: State) -> bool:
        if self.critic is None or state.inputs is None or state.inputs.shape[0] < 2:
            return False
        return self.evicted or not self.mr_after_eviction_only

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        terms = {"ce": cross_entropy(state)}
        if self._mr_applies(state):
            mi = self.memory_retention(state)
            self.last_mi = mi.detach()
            terms["mr"] = -self.mr_coeff * mi
        return terms

    # --- checkpoints (the prefix is in self.params, saved by PromptStrategy) ------------

    def extra_state(self) -> dict[str, Any]:
        current = None
        if self.active:
            assert self.encoder is not None
            current = {
                **{k: v.detach() for k, v in self.current.items()},
                "encoder": {k: v.detach() for k, v in self.encoder.state_dict().items()},
            }
        return {
            "queue": self.queue,
            "reference": self.reference,
            "evicted": self.evicted,
            "active": self.active,
            "current": current,
            "critic": None if self.critic is None else {k: v.detach() for k, v in self.critic.state_dict().items()},
            "log_ema": self.log_ema,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        dev = self.device
        self.queue = state["queue"].to(dev)
        self.reference = state["reference"].to(dev)
        self.evicted, self.active = bool(state["evicted"]), bool(state["active"])
        self.log_ema = None if state["log_ema"] is None else state["log_ema"].to(dev)
        if self.critic is not None and state["critic"] is not None:
            self.critic.load_state_dict(state["critic"])
        current = state["current"]
        if self.active and current is not None:
            self._new_experience_parts(self.queue.shape[0])
            assert self.encoder is not None
            with torch.no_grad():
                for key in ("prompt", "u", "v"):
                    self.current[key].copy_(current[key])
            self.encoder.load_state_dict(current["encoder"])


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, QPrompt)
