"""Evaluation time of a 10-experience class-incremental L2P run with and without the query cache.

After experience i the continual loop evaluates experiences 0..i, and L2P needs the frozen
query of every test image before its prompted pass. Without the cache the query pass of an
earlier experience's images is repeated after every later experience; with it
(``query_cache.enabled``, the default) it is found again.

One run trains the 10 experiences once. After each experience its evaluation runs twice in
the same process, once with the run's cache and once with a disabled one, alternating which
goes first, so that warm-up and drift in machine speed (other work on a shared machine) fall
on both sides alike. Each side's figure is its total over the 10 evaluations, in wall-clock
seconds (the process's CPU seconds are reported too). ``identical`` checks that both sides
gave every evaluation logit and every accuracy bit for bit; the training that follows each
evaluation is the same for both, since the cache does not cache training batches by default
(tests/engine/test_query_cache.py compares whole runs with and without it, final parameters
included). The run uses ``deterministic: true``, so that any nondeterministic kernel would
be refused rather than blur the bitwise comparison.

    python benchmarks/query_cache.py --quick                 # CPU: a 3-block ViT-Ti/16 at 224 px
    python benchmarks/query_cache.py --device cuda           # ViT-B/16 at 224 px, bf16 autocast

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.config import validate
from driftprompt.engine.plugins import Registered, discover
from driftprompt.engine.query_cache import QueryCache
from driftprompt.engine.run import build

from common import sync  # benchmarks/ is on sys.path when run as a script


class EvalLogits:
    """Appends every evaluation batch's logits to ``self.into``."""

    def __init__(self) -> None:
        self.into: list[torch.Tensor] = []

    @hookimpl
    def eval_batch_end(self, state: Any) -> None:
        self.into.append(state.logits.detach().cpu().clone())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small ViT on the CPU, under a minute")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images per class (100 classes, 10 per experience)")
    parser.add_argument("--strategy", default="l2p")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    quick = args.quick or device.type == "cpu"
    if quick:
        backbone = {"name": "vit_tiny_patch16_224", "weights": "random", "kwargs": {"depth": 3}}
        image_size, test_per_class, batch = 224, args.test_per_class or 2, 32
    else:
        backbone = {"name": "vit_base_patch16_224", "weights": "random", "kwargs": {}}
        image_size, test_per_class, batch = 224, args.test_per_class or 50, 128
    recorder = EvalLogits()
    registry = discover()
    registry.strategies["eval_logits"] = Registered("eval_logits", lambda: recorder, "benchmark")
    config = validate(
        {
            "name": "bench",
            "device": str(device),
            "deterministic": True,
            "backbone": backbone,
            "stream": {"name": "synthetic", "options": {"num_classes": 100, "n_experiences": 10, "train_per_class": 1, "test_per_class": test_per_class, "image_size": image_size, "seed": 0}},
            "train": {"epochs": 1, "batch_size": 10, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
            "eval": {"batch_size": batch},
            "log": {"tensorboard": False, "progress": False, "jsonl": False},
            "strategies": [args.strategy, "eval_logits"],
        }
    )
    caches = {True: QueryCache(), False: QueryCache(enabled=False)}
    wall = {True: 0.0, False: 0.0}
    cpu = {True: 0.0, False: 0.0}
    logits: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    rows: dict[bool, list[list[float]]] = {True: [], False: []}
    with build(config, run_dir=None, registry=registry) as run:
        loop, state = run.loop, run.state
        evaluate = loop._evaluate

        def both(i: int) -> None:
            for cached in (True, False) if i % 2 == 0 else (False, True):
                state.query_cache = caches[cached]
                recorder.into = logits[cached]
                sync(device)
                w, c = time.perf_counter(), time.process_time()
                evaluate(i)
                sync(device)
                wall[cached] += time.perf_counter() - w
                cpu[cached] += time.process_time() - c
                rows[cached].append([None if math.isnan(v) else float(v) for v in loop.accuracy.values[i]])  # NaN: not evaluated yet
            state.query_cache = caches[True]

        loop._evaluate = both  # type: ignore[method-assign]
        run.fit()
    same_logits = len(logits[True]) == len(logits[False]) and all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))
    identical = rows[True] == rows[False] and same_logits
    stats = caches[True].stats()
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "strategy": args.strategy,
        "backbone": backbone["name"],
        "backbone_kwargs": backbone["kwargs"],
        "experiences": 10,
        "test_images_per_experience": 10 * test_per_class,
        "eval_batch_size": batch,
        "cached_eval_seconds": wall[True],
        "uncached_eval_seconds": wall[False],
        "cached_eval_cpu_seconds": cpu[True],
        "uncached_eval_cpu_seconds": cpu[False],
        "eval_cpu_speedup": cpu[False] / cpu[True],
        "cache_hits": stats["hits"],
        "cache_misses": stats["misses"],
        "cache_mb": stats["bytes"] / 2**20,
        "eval_speedup": wall[False] / wall[True],
        "identical_accuracy": rows[True] == rows[False],
        "identical_logits": same_logits,
        "identical": identical,
    }
    print(f"{'':10}{'eval s':>10}{'cpu s':>10}")
    print(f"{'cached':10}{wall[True]:10.2f}{cpu[True]:10.2f}   hits {stats['hits']}, misses {stats['misses']}")
    print(f"{'uncached':10}{wall[False]:10.2f}{cpu[False]:10.2f}")
    print(f"eval speedup {results['eval_speedup']:.2f}x, identical: {identical}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
