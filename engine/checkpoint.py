"""Atomic checkpoints and random-number-generator snapshots."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError, condense, naming

FORMAT_VERSION = 2  # 2: config record, metrics offset, mid-experience position
CHECKPOINT_NAME = "checkpoint.pt"


#: What every checkpoint holds; a checkpoint without one of them is refused when loaded.
REQUIRED_KEYS = ("format_version", "backbone", "strategy_names", "next_experience", "num_experiences", "step", "seen_classes", "head", "strategies", "optimizer", "rng", "metrics", "config")

# Types torch's ``weights_only`` unpickler rebuilds (checked against torch 2.4 to 2.9).
_SAFE_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device, torch.Tensor)
_SAFE_CONTAINERS = (dict, list, tuple, set)


def unloadable(obj: Any, where: str = "") -> tuple[str, str] | None:
    """The first ``(dotted key, type name)`` in ``obj`` that ``torch.load(weights_only=True)``
    cannot rebuild, or ``None`` when all of it loads.

    A walk over the containers (cheap: tensors are leaves), so that a checkpoint that could
    never be resumed is refused when it is written, with the key to fix.
    """
    stack: list[tuple[Any, str]] = [(obj, where)]
    extra = tuple(t for t in torch.serialization.get_safe_globals() if isinstance(t, type))
    while stack:
        value, key = stack.pop()
        kind = type(value)
        if isinstance(value, dict) and kind in (dict, OrderedDict):
            stack.extend((v, f"{key}.{k}" if key else str(k)) for k, v in value.items())
            stack.extend((k, f"{key}.<key>" if key else "<key>") for k in value)
        elif kind in (list, tuple, set):
            stack.extend((v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(value))
        elif isinstance(value, torch.Tensor) or kind in _SAFE_LEAVES or (extra and kind in extra):
            continue
        else:
            return key or "<root>", f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__name__
    return None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (main thread, POSIX), so that an atomic
    write in progress finishes before the interrupt is handled."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then rename it over ``path``.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    truncated file. SIGINT and SIGTERM wait until the rename is done. A payload that
    ``weights_only`` loading could not read back is refused before anything is written.
    """
    path = Path(path)
    bad = unloadable(obj)
    if bad is not None:
        key, kind = bad
        owner = key.split(".")[1] if key.startswith("strategies.") and key.count(".") >= 1 else None
        who = f"Strategy '{owner}' put" if owner else "The checkpoint holds"
        raise CheckpointError(
            f"{who} a {kind} at '{key}' in its state, which checkpoints cannot hold (they load with weights_only=True); "
            "return tensors, numbers, strings, lists and dicts from state_dict()."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_deferred(), naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``.

    Args:
        path: the ``checkpoint.pt`` file.
        required: keys the payload must hold (a resume passes :data:`REQUIRED_KEYS`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at '{path}'; resume from a run directory that finished at least one experience.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({exc.strerror or condense(str(exc))}); check the file's permissions.") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({_cause(exc)}); it was not written by driftprompt or is damaged.") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint '{path}' has an unknown format; resume it with the driftprompt version that wrote it.")
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(repr(k) for k in missing)}; it is damaged or from another driftprompt version, so start the run again.")
    return payload


def _cause(exc: BaseException) -> str:
    """The informative part of PyTorch's multi-line loading errors, in a few words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, flags=re.S)
    if found:
        cause = " ".join(found.group(1).split())
        cause = re.split(r"\. (?=Please|Check)", cause)[0]
        return condense(cause, 160)
    return f"{type(exc).__name__}: {condense(text, 160)}"


def rng_state() -> dict[str, Any]:
    """Snapshot of every global random generator, in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
