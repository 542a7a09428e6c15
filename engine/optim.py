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
