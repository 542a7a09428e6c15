"""Running one config on several processes with ``torchrun``.

The engine does data parallelism itself rather than through ``DistributedDataParallel``:
strategies own their parameters in many small places (prompt pools, keys, heads, adapters), so
there is no single module whose ``forward`` DDP could wrap. The semantics are DDP's: every
process starts from the same seed and therefore the same parameters; each takes its share of
every global batch; gradients are averaged with one bucketed all-reduce right after
``backward``, weighted by the share sizes, so the step equals the single-process step on the
whole batch. Evaluation counts are summed across processes. Only rank 0 writes logs and
checkpoints.

Collectives time out after ``distributed.timeout_s`` seconds, and a lost peer turns into one
clear sentence instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError, DriftpromptError

RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(DriftpromptError):
    """A collective failed: another process died or stopped answering."""


@dataclass
class DistContext:
    """Rank, world size and the few collectives the engine and strategies need.

    With ``world_size == 1`` every method is a no-op, so code calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:  # type: ignore[attr-defined]
            raise DistributedError(
                f"Process {self.rank} lost contact with the other processes during {what} ({str(exc).splitlines()[0][:160]}); "
                "the job stops here: check the other processes' logs, then continue from the last checkpoint with --resume."
            ) from exc

    def all_reduce_(self, tensor: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """Sum ``tensor`` over processes, in place."""
        if self.enabled:
            self._run(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0, what: str = "a broadcast") -> torch.Tensor:
        if self.enabled:
            self._run(what, dist.broadcast, tensor, src=src)
        return tensor

    def all_gather_object(self, obj: Any, what: str = "a gather") -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._run(what, dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        self._run("a broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def reduce_delta_(self, tensor: torch.Tensor, base: torch.Tensor, what: str = "a statistics reduction") -> torch.Tensor:
        """Make ``tensor`` = ``base`` + the sum over processes of (``tensor`` - ``base``).

        For running statistics (class sums, selection counts) that every process extended with
        its own share of the data since ``base`` was taken.
        """
        if self.enabled:
            delta = tensor - base
            self.all_reduce_(delta, what)
            tensor.copy_(base + delta)
        return tensor

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a batch (shares differ in size by at most one)."""
        if not self.enabled:
            return tensor
        return torch.tensor_split(tensor, self.world_size)[self.rank]

    def average_gradients(self, params: Sequence[torch.Tensor], local: int, total: int) -> None:
        """Weighted average of gradients: sum over processes of grad * local / total.

        Each process's loss is a mean over its ``local`` samples; weighting by the share of the
        ``total`` batch makes the result equal to the gradient of the mean over the whole batch.
        One flat buffer, one all-reduce.
        """
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]) * (local / max(total, 1))
        self.all_reduce_(flat, "the gradient all-reduce")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n


def init_from_env(timeout_s: float, device_type: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with 1) this is a single-process run. With it, every other
    rendezvous variable must be set, or one sentence names the missing one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    missing = [v for v in RENDEZVOUS_VARIABLES if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is {world} but the rendezvous variable {missing[0]} is not set; start the job with torchrun, which sets them all.")
    ctx = DistContext(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ctx
