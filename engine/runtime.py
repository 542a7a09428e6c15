"""Device, precision and seeding."""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is a config error.

    Under torchrun (``local_rank`` given) a CUDA device is the process's own GPU.
    """
    if local_rank is not None and torch.cuda.is_available() and name in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    if name == "auto":
        # an explicit index, so that device comparisons (cuda vs cuda:0) behave
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Config key 'device': '{name}' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Config key 'device' asks for CUDA but no GPU is visible; use device=cpu or device=auto.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for 'auto' and 'bf16'; fp32 (``None``) on the CPU."""
    if precision == "fp32" or device.type != "cuda":
        if precision == "bf16" and device.type != "cuda":
            raise ConfigError("precision=bf16 needs a CUDA device; use precision=auto or precision=fp32 on the CPU.")
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast context for the forward and loss stages (a no-op in fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels.

    Deterministic mode sets ``torch.use_deterministic_algorithms(True)`` and the cuBLAS
    workspace variable it needs; it is slower on GPUs and raises on ops without a
    deterministic implementation.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def apply_runtime(runtime: Any) -> None:
    """Apply a :class:`~driftprompt.engine.config.RuntimeConfig`: ``threads`` sets
    ``torch.set_num_threads``; ``None`` leaves torch's default (one thread per core, or
    ``OMP_NUM_THREADS`` when that is set).

    On a machine that other processes share, the default oversubscribes the cores: test-time
    adaptation, many small steps, ran 18 times slower with the default than with one thread
    under contention. Set ``runtime.threads`` (or ``OMP_NUM_THREADS``) to the cores this run
    may use.
    """
    threads = getattr(runtime, "threads", None)
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


def data_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for data order that depends only on the run seed and ``keys``.

    Shuffling for experience ``i``, epoch ``e`` uses ``data_generator(seed, i, e)``, so a
    resumed run sees the same batches as an uninterrupted one.
    """
    mixed = np.random.SeedSequence([seed % 2**32, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
