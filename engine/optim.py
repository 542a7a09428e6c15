"""Optimizers built from the parameter groups that strategies declare."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger(__name__)


def build_optimizer(groups: list[dict[str, Any]], options: Any) -> torch.optim.Optimizer:
    """Build the configured optimizer over described parameter groups.

    Group keys other than ``params`` (``name``, ``role``, ``layer``, and per-group ``lr`` or
    ``weight_decay``) stay in ``optimizer.param_groups``, where projection strategies read them.
    """
    common = {"lr": options.lr, "weight_decay": options.weight_decay}
    if options.name == "sgd":
        return torch.optim.SGD(groups, momentum=options.momentum, **common)
    cls = torch.optim.Adam if options.name == "adam" else torch.optim.AdamW
    params = [p for g in groups for p in g["params"]]
    # Fused Adam/AdamW (one kernel for every parameter) where every parameter is a floating
    # CUDA tensor; the CPU keeps the unfused loop, whose fp32 results the tests pin down.
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return cls(groups, betas=tuple(options.betas), **common, **({"fused": True} if fused else {}))


def merge_param_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Add the parameters of ``groups`` that ``optimizer`` does not hold yet (kept across experiences)."""
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for group in groups:
        fresh = [p for p in group["params"] if id(p) not in known]
        if fresh:
            optimizer.add_param_group({**group, "params": fresh})


def optimizer_state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer moments keyed by (group name, position in group), for checkpoints.

    Unlike ``optimizer.state_dict()``, this survives parameter groups being added between
    the experience that saved it and the one that restores it.
    """
    out: dict[str, Any] = {}
    for g, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{g}")
        for i, p in enumerate(group["params"]):
            if p in optimizer.state:
                out[f"{name}/{i}"] = dict(optimizer.state[p])
        out[f"{name}/hyper"] = {k: v for k, v in group.items() if k != "params"}
    return out


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state_by_name` saved onto groups with the same names."""
    for g, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{g}")
        hyper = saved.get(f"{name}/hyper")
        if hyper is not None:
            group.update({k: v for k, v in hyper.items() if k in ("lr", "initial_lr")})
        for i, p in enumerate(group["params"]):
            state = saved.get(f"{name}/{i}")
            if state is not None:
                # Adam keeps "step" on the host unless the group is fused (or capturable), where it
                # must live beside the parameter
                on_device = bool(group.get("fused") or group.get("capturable"))
                optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and (k != "step" or on_device) else v for k, v in state.items()}


def effective_lrs(optimizer: torch.optim.Optimizer, configured_lr: float) -> list[dict[str, Any]]:
    """The learning rate each parameter group trains at, and who set it.

    A group whose ``lr`` differs from ``train.optimizer.lr`` was given its own rate by the
    strategy that declared it (``group["strategy"]``), such as l2p's batch-scaled 0.03.
    """
    out = []
    for g, group in enumerate(optimizer.param_groups):
        lr = float(group["lr"])
        own = not math.isclose(lr, float(configured_lr), rel_tol=1e-9, abs_tol=0.0)
        strategy = group.get("strategy")
        out.append(
            {
                "name": str(group.get("name", f"group{g}")),
                "role": str(group.get("role", "other")),
                "lr": lr,
                "set_by": f"strategy {strategy}" if own and strategy and strategy != "?" else "a strategy" if own else "train.optimizer.lr",
                "params": sum(p.numel() for p in group["params"]),
            }
        )
    return out


def log_effective_lrs(optimizer: torch.optim.Optimizer | None, configured_lr: float, logger: Any, step: int, experience: int) -> list[dict[str, Any]]:
    """One INFO line per parameter group (name, role, lr, who set it) and an ``optimizer``
    record in ``metrics.jsonl``; called at the start of every experience."""
    if optimizer is None:
        return []
    groups = effective_lrs(optimizer, configured_lr)
    for group in groups:
        log.info("experience %d: parameter group '%s' (role %s, %d parameters) trains at lr %.6g, set by %s", experience, group["name"], group["role"], group["params"], group["lr"], group["set_by"])
    if logger is not None:
        logger.log("optimizer", step, experience=experience, configured_lr=float(configured_lr), groups=groups)
    return groups
