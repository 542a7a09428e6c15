"""Optimizers built from the parameter groups that strategies declare."""

from __future__ import annotations

from typing import Any

import torch


def build_optimizer(groups: list[dict[str, Any]], options: Any) -> torch.optim.Optimizer:
    """Build the configured optimizer over described parameter groups.

    Group keys other than ``params`` (``name``, ``role``, ``layer``, and per-group ``lr`` or
    ``weight_decay``) stay in ``optimizer.param_groups``, where projection strategies read them.
    """
    common = {"lr": options.lr, "weight_decay": options.weight_decay}
    if options.name == "sgd":
        return torch.optim.SGD(groups, momentum=options.momentum, **common)
    cls = torch.optim.Adam if options.name == "adam" else torch.optim.AdamW
    return cls(groups, betas=tuple(options.betas), **common)


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
                optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and k != "step" else v for k, v in state.items()}
