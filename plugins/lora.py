"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022), on a frozen ViT.

A frozen linear map W (d_out x d_in) is adapted by a trainable low-rank update,
h = W x + (alpha / r) B A x, with A (r x d_in) and B (d_out x r). A starts random
(Kaiming-uniform, as the reference implementation) and B at zero, so training starts from the
pre-trained function exactly. Following the paper, the adapted maps are the attention
projections; in timm the query, key and value maps are one fused ``qkv`` Linear, so each
chosen part (``q``, ``k``, ``v``; the paper's default is q and v) gets its own A and B, added
to its third of the fused output; ``proj`` (the attention output map) can be adapted too.

The adapters are installed once, at ``init``, by replacing ``attn.qkv`` / ``attn.proj`` of the
chosen blocks of the run's one backbone instance with a wrapper that keeps the frozen timm
Linear as ``.base`` (its weights stay frozen; only A and B require gradients, so the engine's
``state.backbone_trainable`` keeps autograd on in the default forward). Trained sequentially
with the growing head and the train-time class mask, "in place of prompts" as in the
comparison of PEFT techniques for continual learning (L2P-style training of a single shared
set of adapters).

The frozen query. ``state.compute_query()`` runs the same backbone instance, so it would pass
through the adapters and drift as they train, which breaks strategies that match it against
stored keys (L2P, DualPrompt, CODA-Prompt, PGP's key memory). By default (``frozen_query:
true``) the adapters are switched off everywhere except inside the ``forward`` query hook
(a hook wrapper turns them on around the forward pass and off again), so every
``compute_query()`` made from ``before_forward``, ``loss_terms`` or elsewhere sees the
pre-trained model, while the prediction uses the adapted one. With ``frozen_query: false`` the
adapters are always on, and the query is the adapted model's.

Groups: one per adapted map, ``role: adapter``, ``layer: i`` and ``site: qkv`` or ``proj``
(the module whose input the adapter reads); the A matrices (which read that input) and the B
matrices (``part: up``, which read the rank-r code) are separate groups, so gradient
projection can protect the A's with the site's input representation.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy, mask_to_current_experience

PARTS = ("q", "k", "v", "proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank updates on slices of its output.

    Args:
        base: the frozen Linear (kept as ``.base``, never changed).
        slices: output slices to adapt, as (name, start, stop); each gets A (r x d_in) and
            B (stop - start x r).
        rank: r.
        alpha: the update is scaled by alpha / r.
    """

    def __init__(self, base: nn.Linear, slices: Sequence[tuple[str, int, int]], rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = int(rank), float(alpha) / float(rank)
        self.slices = [(name, int(a), int(b)) for name, a, b in slices]
        self.enabled = True
        dev, d_in = base.weight.device, base.in_features
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name, a, b in self.slices:
            weight = torch.empty(self.rank, d_in, device=dev)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.lora_a[name] = nn.Parameter(weight)
            self.lora_b[name] = nn.Parameter(torch.zeros(b - a, self.rank, device=dev))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The full (d_out x d_in) update (alpha / r) B A, zero outside the adapted slices."""
        delta = torch.zeros_like(self.base.weight, dtype=torch.float32)
        for name, a, b in self.slices:
            delta[a:b] = self.scaling * (self.lora_b[name].float() @ self.lora_a[name].float())
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        pieces = []
        for name, _, _ in self.slices:
            a, b = self.lora_a[name], self.lora_b[name]
            pieces.append(F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scaling)
        if len(self.slices) == 1 and self.slices[0][1] == 0 and self.slices[0][2] == out.shape[-1]:
            return out + pieces[0].to(out.dtype)
        update = torch.zeros_like(out)
        for (name, a, b), piece in zip(self.slices, pieces):
            update[..., a:b] = piece.to(out.dtype)
        return out + update


def install(block: nn.Module, parts: Sequence[str], rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap ``block.attn.qkv`` (for q/k/v) and ``block.attn.proj`` (for proj) with adapters, in place."""
    attn = block.attn
    out: dict[str, LoRALinear] = {}
    qkv_parts = [p for p in ("q", "k", "v") if p in parts]
    if qkv_parts:
        base = attn.qkv
        if isinstance(base, LoRALinear):
            raise ConfigError("this block's qkv already carries adapters; list lora once per run.")
        dim = base.out_features // 3
        slices = [(p, i * dim, (i + 1) * dim) for i, p in enumerate(("q", "k", "v")) if p in qkv_parts]
        attn.qkv = out["qkv"] = LoRALinear(base, slices, rank, alpha)
    if "proj" in parts:
        base = attn.proj
        if isinstance(base, LoRALinear):
            raise ConfigError("this block's proj already carries adapters; list lora once per run.")
        attn.proj = out["proj"] = LoRALinear(base, [("proj", 0, base.out_features)], rank, alpha)
    return out


class LoRA:
    """LoRA adapters on the attention projections of chosen blocks, trained with the head.

    Args:
        rank: r (4).
        alpha: scaling numerator; the update is (alpha / r) B A (4, so the scale is 1).
        parts: adapted maps among q, k, v, proj (("q", "v"), the paper's choice).
        layers: adapted blocks (``None``: every block).
        frozen_query: keep ``compute_query()`` on the pre-trained model (True; see above).
        train_mask: mask logits outside the current experience while training (True).
        classifier: train the head with cross-entropy (True); ``False`` leaves head and loss to
            another strategy listed with lora (a prompt method trained with adapters beside it).
        lr: learning rate of adapters and head (``None``: the run's optimizer setting).
    """

    def __init__(
        self,
        rank: int = 4,
        alpha: float = 4.0,
        parts: Sequence[str] = ("q", "v"),
        layers: Sequence[int] | None = None,
        frozen_query: bool = True,
        train_mask: bool = True,
        classifier: bool = True,
        lr: float | None = None,
    ) -> None:
        if int(rank) < 1:
            raise ConfigError(f"lora rank must be at least 1, got {rank}.")
        if float(alpha) <= 0:
            raise ConfigError(f"lora alpha must be positive, got {alpha}.")
        bad = sorted(set(parts) - set(PARTS))
        if bad or not parts:
            raise ConfigError(f"lora parts {list(parts)} must be a non-empty choice among {', '.join(PARTS)}.")
        if layers is not None and not layers:
            raise ConfigError("lora layers is empty; name at least one block, or leave it unset for every block.")
        self.rank, self.alpha, self.parts = int(rank), float(alpha), tuple(parts)
        self.layers = None if layers is None else [int(i) for i in layers]
        self.frozen_query, self.train_mask, self.classifier, self.lr = bool(frozen_query), bool(train_mask), bool(classifier), lr
        self.adapters: dict[tuple[int, str], LoRALinear] = {}

    @hookimpl
    def init(self, state: State) -> None:
        backbone = state.backbone
        if self.layers is None:
            self.layers = list(range(backbone.depth))
        backbone.check_layers(self.layers, "lora layers")
        for layer in self.layers:
            for site, module in install(backbone.model.blocks[layer], self.parts, self.rank, self.alpha).items():
                self.adapters[(layer, site)] = module
        self.set_enabled(not self.frozen_query)

    def modules(self) -> Iterator[tuple[tuple[int, str], LoRALinear]]:
        return iter(sorted(self.adapters.items()))

    def set_enabled(self, on: bool) -> None:
        for module in self.adapters.values():
            module.enabled = on

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        extra: dict[str, Any] = {} if self.lr is None else {"lr": float(self.lr)}
        groups: list[dict[str, Any]] = []
        for (layer, site), module in self.modules():
            groups.append({"params": list(module.lora_a.values()), "name": f"lora.{layer}.{site}.a", "role": "adapter", "layer": layer, "site": site, **extra})
            groups.append({"params": list(module.lora_b.values()), "name": f"lora.{layer}.{site}.b", "role": "adapter", "layer": layer, "site": site, "part": "up", **extra})
        if self.classifier:
            groups.append({"params": list(state.head.parameters()), "name": "head", "role": "head", **extra})
        return groups

    @hookimpl(wrapper=True)
    def forward(self, state: State) -> Any:
        """Adapters on for the prediction only (``frozen_query``), off again for everything else."""
        if not self.frozen_query:
            return (yield)
        self.set_enabled(True)
        try:
            return (yield)
        finally:
            self.set_enabled(False)

    @hookimpl
    def before_loss(self, state: State) -> None:
        if self.classifier and self.train_mask:
            mask_to_current_experience(state)

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train" or not self.classifier:
            return None
        return {"ce": cross_entropy(state)}

    def state_dict(self) -> dict[str, Any]:
        return {
            f"{layer}.{site}": {"a": {k: v.detach() for k, v in m.lora_a.items()}, "b": {k: v.detach() for k, v in m.lora_b.items()}}
            for (layer, site), m in self.modules()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {f"{layer}.{site}": m for (layer, site), m in self.modules()}
        if set(mine) != set(state):
            raise ConfigError(f"lora checkpoint adapts {sorted(state)}, this run {sorted(mine)}; resume with the run's own config.")
        with torch.no_grad():
            for key, saved in state.items():
                for name, value in saved["a"].items():
                    mine[key].lora_a[name].copy_(value)
                for name, value in saved["b"].items():
                    mine[key].lora_b[name].copy_(value)


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("lora", LoRA)
