"""An exact cache of the frozen query feature, shared by every strategy through the engine.

L2P, DualPrompt, CODA-Prompt, Q-tuning, PGP and NCM all read the frozen backbone's [CLS]
feature of a batch through :meth:`State.compute_query`. That feature depends only on the image
(and the frozen weights), yet the continual loop evaluates every earlier experience again after
each new one, so the same test images' queries are computed up to T times. The cache keeps
them, one entry per image.

Keys. An entry is keyed by the sample's own identity, never by its position in a batch:
``(split, experience index, evaluation view, autocast state, input shape, dtype and device)``
plus the sample's index in its dataset (``extras["index"]`` of the batch). Test sets and train
sets of different experiences have independent index spaces, hence the split and experience in
the key.

Exactness. A transformer's output for one image can depend, in its last bits, on the other
images of its batch: matrix products are blocked by the batch's size. Measured on the CPU with
timm ViTs of random weights (rows of a 64-image batch against the same rows inside batches of
1 to 63 images): a ViT-B/16 and a ViT-S at 64 px gave identical bits for every composition,
the 32-wide test model differed by 4.8e-7 in one row of a one-image batch. So a cached row is
used only when the whole batch hits *and* every entry was computed in a batch of exactly the
same samples in the same order (a signature of the batch's keys is stored with each row). An
evaluation sees the same batches every time (fixed order, fixed batch size, the same shard of
each batch per process under torchrun), so its hits return, bit for bit, what recomputing
would. Training batches are shuffled differently every epoch, so they would never hit under
that rule; ``query_cache.train: true`` caches them by sample alone (exact up to that last-bit
rounding, which is why it is off by default).

When the cache stands aside. Only in the ``train`` (with ``query_cache.train``) and ``eval``
phases of the continual loop, never in test-time adaptation; only while ``state.inputs`` is
still the very tensor the loop preprocessed from the loader, unmodified (an augmentation, ours
or a third party's, replaces or edits it; ``augment`` also marks ``batch["augmented"]``); never
while any backbone parameter requires gradients (LoRA and other adapters, whatever their
``frozen_query``) or a forward hook is attached to the backbone (a hook expects to see the pass
run); never for a batch without sample indices or with a repeated index.

Invalidation. Every lookup reads the backbone's weights version: each parameter's and buffer's
storage address and in-place version counter (``load_state_dict``, ``copy_`` under
``no_grad``, an optimizer step all bump it). Any change empties the cache.

Memory. Entries stay on the device they were computed on, in the query's own dtype (fp32, or
the autocast dtype). ``query_cache.max_mb`` (1024 by default) bounds the bytes of the stored
features plus :data:`ENTRY_OVERHEAD_BYTES` (720) per entry for the objects that hold it;
beyond it the least recently used entries are evicted, with one warning per cache. A ViT-B
query is 3 KiB in fp32, 3.7 KiB with the overhead: 1024 MB holds about 280,000 images, the
test sets of CIFAR-100 (10,000), ImageNet-R (6,000 in the usual split) and ImageNet (50,000)
together several times over.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Any, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MAX_MB = 1024.0
#: Bytes per entry besides the feature itself (tensor and storage objects, key and value
#: tuples, the dictionary's slot): measured as the growth of the process's resident memory per
#: entry over 96,000 CPU entries, 720 bytes for features of width 32, 192 and 768 alike.
ENTRY_OVERHEAD_BYTES = 720


def weights_version(module: nn.Module) -> tuple[Any, ...] | None:
    """What changes whenever ``module``'s weights do; ``None`` when it cannot be cached.

    The module's identity and ``(storage address, in-place version)`` of every parameter and
    buffer (a strategy that swaps in another backbone changes it too); ``None`` when a
    parameter requires gradients (the backbone trains, so its query moves from step to step)
    or a forward hook is attached somewhere in it (a cached query would skip the hook).
    """
    parts: list[Any] = [(id(module), type(module).__qualname__)]
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.requires_grad:
            return None
        parts.append((t.data_ptr(), t._version))
    if has_forward_hooks(module.modules()):
        return None
    return tuple(parts)


def has_forward_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward (pre-)hook is attached globally or to one of ``modules``: a pass that
    would run it cannot be replaced by a stored result or a compiled graph."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class QueryCache:
    """Queries of earlier batches, keyed by sample; see the module docstring for the rules.

    Args:
        max_mb: the memory bound in MiB (features plus per-entry overhead); 0 stores nothing.
        train: also cache training batches, by sample alone (exact up to last-bit rounding).
        enabled: ``False`` makes every lookup miss without counting (the cache is off).

    The loop calls :meth:`begin_batch` after it sets ``state.inputs`` from a loader batch;
    :meth:`State.compute_query` calls :meth:`lookup` and, on a miss, :meth:`store`.
    ``stats()`` reports hits, misses, bypassed lookups, evictions and invalidations (counted
    in images).
    """

    def __init__(self, max_mb: float = DEFAULT_MAX_MB, train: bool = False, enabled: bool = True) -> None:
        self.max_bytes = int(float(max_mb) * 2**20)
        self.train = bool(train)
        self.enabled = bool(enabled)
        # key -> (query row, the ids of the batch it was computed in, bytes counted for it)
        self._entries: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, tuple[Any, ...], int]] = OrderedDict()
        self.bytes = 0
        self._version: Any = None
        self._batch: dict[str, Any] | None = None  # the current loader batch: keys and inputs
        self._pending: tuple[list[Any], tuple[Any, ...]] | None = None  # what store() files
        self._warned = False
        self.hits = self.misses = self.bypassed = self.evictions = self.invalidations = 0

    @classmethod
    def from_config(cls, config: Any) -> QueryCache:
        """The cache a run's ``query_cache`` section asks for (the defaults without one)."""
        section = getattr(config, "query_cache", None)
        if section is None:
            return cls()
        return cls(section.max_mb, section.train, section.enabled)

    # --- the loop's side ----------------------------------------------------------------------

    def begin_batch(self, state: Any) -> None:
        """Note the batch the loop has just preprocessed into ``state.inputs``."""
        self._batch = self._pending = None
        if not self.enabled:
            return
        if state.phase == "eval" and state.eval_experience is not None:
            source: tuple[Any, ...] = ("test", state.eval_experience.index)
        elif state.phase == "train" and self.train and state.experience is not None:
            source = ("train", state.experience.index)
        else:
            return  # test-time adaptation and prediction, or training without query_cache.train
        index = state.batch.get("index") if isinstance(state.batch, dict) else None
        if index is None or state.inputs is None:
            return
        ids = index.tolist() if torch.is_tensor(index) else list(index)
        if len(ids) != state.inputs.shape[0] or len(set(ids)) != len(ids):
            return  # indices that do not name each row once
        view = getattr(state.backbone, "view", None)
        self._batch = {
            "source": source + (view if isinstance(view, tuple) else (view,)),
            "ids": ids,
            "signature": tuple(ids),
            "inputs": state.inputs,
            "inputs_version": state.inputs._version,
            "phase": state.phase,
        }

    # --- compute_query's side -----------------------------------------------------------------

    def _context(self, state: Any) -> tuple[Any, ...] | None:
        """The key prefix of the current batch, or ``None`` when the cache must stand aside."""
        b = self._batch
        if b is None or not self.enabled:
            return None
        x = state.inputs
        if x is not b["inputs"] or x._version != b["inputs_version"] or state.phase != b["phase"]:
            return None  # the inputs are no longer the loader's preprocessed images
        if isinstance(state.batch, dict) and state.batch.get("augmented"):
            return None
        if getattr(state, "backbone_trainable", False):
            return None
        version = weights_version(state.backbone)
        if version is None:
            return None
        if version != self._version:
            if self._entries:
                self.invalidations += len(self._entries)
                self.clear()
            self._version = version
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return b["source"] + (amp, x.dtype, str(x.device), tuple(x.shape[1:]))

    def lookup(self, state: Any) -> torch.Tensor | None:
        """The current batch's queries if every row is cached exactly, else ``None``."""
        self._pending = None
        if not self.enabled:
            return None
        ctx = self._context(state)
        if ctx is None:
            if self._batch is not None:
                self.bypassed += len(self._batch["ids"])
            return None
        ids, signature = self._batch["ids"], self._batch["signature"]  # type: ignore[index]
        keys = [(ctx, i) for i in ids]
        rows = [self._entries.get(k) for k in keys]
        if all(r is not None for r in rows) and (self._batch["phase"] == "train" or self._same_batch(rows, signature)):  # type: ignore[index]
            for k in keys:
                self._entries.move_to_end(k)
            self.hits += len(keys)
            return torch.stack([r[0] for r in rows])  # type: ignore[index]
        self.misses += len(keys)
        self._pending = (keys, signature)
        return None

    @staticmethod
    def _same_batch(rows: list[Any], signature: tuple[Any, ...]) -> bool:
        """Every row was computed in a batch of exactly these samples, in this order."""
        first = rows[0][1]
        return first == signature and all(r[1] is first or r[1] == signature for r in rows)

    def store(self, state: Any, query: torch.Tensor) -> None:
        """File the rows of ``query`` that :meth:`lookup` just missed (LRU eviction past the bound)."""
        pending, self._pending = self._pending, None
        if pending is None or query.dim() != 2 or query.shape[0] != len(pending[0]):
            return
        keys, signature = pending
        size = query.shape[1] * query.element_size() + ENTRY_OVERHEAD_BYTES
        for key, row in zip(keys, query.detach().unbind(0)):
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            if size > self.max_bytes:
                continue
            while self.bytes + size > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted[2]
                self.evictions += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "The query cache reached its bound of %.0f MB (query_cache.max_mb): the least recently used queries are evicted "
                        "from now on, so some are computed again; raise query_cache.max_mb to keep them all.",
                        self.max_bytes / 2**20,
                    )
            self._entries[key] = (row.clone(), signature, size)
            self.bytes += size

    # --- housekeeping -------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters in images: hits, misses, bypassed, evictions, invalidations; entries, bytes."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bypassed": self.bypassed,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
            "entries": len(self._entries),
            "bytes": self.bytes,
        }
