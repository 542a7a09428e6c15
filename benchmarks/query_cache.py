"""Evaluation time of a 10-experience class-incremental L2P run with and without the query cache.

After experience i the continual loop evaluates experiences 0..i, and L2P needs the frozen
query of every test image before its prompted pass. Without the cache the query pass of an
earlier experience's images is repeated after every later experience; with it
(``query_cache.enabled``, the default) it is found again. Both sides are complete runs of
the same config in the same process, built with the same seed, in the order on, off, off, on
(so that warm-up and drift in machine speed hit both alike); each side's figure is its fastest
run's total evaluation time over the 10 experiences: the process's CPU seconds on the CPU
(``--clock``; other work on a shared machine skews wall-clock time, which is reported too),
wall-clock seconds on CUDA. Both sides run with ``deterministic: true``: without it L2P's
training on two CPU threads differs in the last bits from one run to the next, with or
without the cache. ``identical`` checks the accuracy
matrices, every evaluation logit and every final parameter (head and prompts) bit for bit.

    python benchmarks/query_cache.py --quick                 # CPU: a 4-block ViT-Ti at 64 px
    python benchmarks/query_cache.py --device cuda           # ViT-B/16 at 224 px, bf16 autocast

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.config import validate
from driftprompt.engine.plugins import Registered, discover
from driftprompt.engine.run import build


class EvalLogits:
    """Keeps every evaluation batch's logits, to compare both sides bit for bit, and the
    process's CPU time spent between ``eval_start`` and ``eval_end``."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.cpu_seconds = 0.0
        self._started = 0.0

    @hookimpl
    def eval_start(self, state: Any) -> None:
        self._started = time.process_time()

    @hookimpl
    def eval_batch_end(self, state: Any) -> None:
        self.logits.append(state.logits.detach().cpu().clone())

    @hookimpl
    def eval_end(self, state: Any) -> None:
        self.cpu_seconds += time.process_time() - self._started


def one_run(cfg: dict[str, Any], cached: bool) -> dict[str, Any]:
    recorder = EvalLogits()
    registry = discover()
    registry.strategies["eval_logits"] = Registered("eval_logits", lambda: recorder, "benchmark")
    config = validate({**cfg, "strategies": cfg["strategies"] + ["eval_logits"], "query_cache": {"enabled": cached}})
    started = time.perf_counter()
    with build(config, run_dir=None, registry=registry) as run:
        summary = run.fit()
        params = {f"head.{k}": v.detach().cpu().clone() for k, v in run.state.head.state_dict().items()}
        for name, plugin in run.strategies:
            if hasattr(plugin, "state_dict") and name != "eval_logits":
                params.update({f"{name}.{k}": v.detach().cpu().clone() for k, v in plugin.state_dict().items() if torch.is_tensor(v)})
        stats = run.state.query_cache.stats()
    return {
        "eval_seconds": sum(t["eval_seconds"] for t in summary["timings"]),
        "eval_cpu_seconds": recorder.cpu_seconds,
        "train_seconds": sum(t["train_seconds"] for t in summary["timings"]),
        "wall_seconds": time.perf_counter() - started,
        "accuracy": summary["accuracy"],
        "params": params,
        "logits": recorder.logits,
        "stats": stats,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["accuracy"] == b["accuracy"]
        and a["params"].keys() == b["params"].keys()
        and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        and len(a["logits"]) == len(b["logits"])
        and all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small ViT on the CPU, under a minute")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images per class (100 classes, 10 per experience)")
    parser.add_argument("--strategy", default="l2p")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto", help="what eval_speedup compares: wall-clock seconds, or the process's CPU seconds (auto: CPU seconds on the CPU, where other work on a shared machine skews wall-clock time; wall-clock on CUDA)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    quick = args.quick or device.type == "cpu"
    clock = args.clock if args.clock != "auto" else "cpu" if device.type == "cpu" else "wall"
    key = "eval_cpu_seconds" if clock == "cpu" else "eval_seconds"
    if quick:
        backbone = {"name": "vit_tiny_patch16_224", "weights": "random", "kwargs": {"depth": 4, "img_size": 64}}
        image_size, test_per_class, batch = 64, args.test_per_class or 1, 32
    else:
        backbone = {"name": "vit_base_patch16_224", "weights": "random", "kwargs": {}}
        image_size, test_per_class, batch = 224, args.test_per_class or 50, 128
    cfg: dict[str, Any] = {
        "name": "bench",
        "device": str(device),
        # L2P's training is not reproducible run to run with 2 CPU threads otherwise (two runs
        # without the cache differ in the head's last bits); the check is about the cache
        "deterministic": True,
        "backbone": backbone,
        "stream": {"name": "synthetic", "options": {"num_classes": 100, "n_experiences": 10, "train_per_class": 1, "test_per_class": test_per_class, "image_size": image_size, "seed": 0}},
        "train": {"epochs": 1, "batch_size": 10, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
        "eval": {"batch_size": batch},
        "log": {"tensorboard": False, "progress": False, "jsonl": False},
        "strategies": [args.strategy],
    }
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for cached in (True, False, False, True):  # ABBA: warm-up and drift fall on both sides
        runs[cached].append(one_run(cfg, cached))
    on = min(runs[True], key=lambda r: r[key])
    off = min(runs[False], key=lambda r: r[key])
    identical = all(same(a, b) for a in runs[True] for b in runs[False])
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "strategy": args.strategy,
        "backbone": backbone["name"],
        "backbone_kwargs": backbone["kwargs"],
        "experiences": 10,
        "test_images_per_experience": 10 * test_per_class,
        "eval_batch_size": batch,
        "clock": clock,
        "cached_eval_seconds": on[key],
        "uncached_eval_seconds": off[key],
        "cached_eval_wall_seconds_all": [r["eval_seconds"] for r in runs[True]],
        "uncached_eval_wall_seconds_all": [r["eval_seconds"] for r in runs[False]],
        "cached_eval_cpu_seconds_all": [r["eval_cpu_seconds"] for r in runs[True]],
        "uncached_eval_cpu_seconds_all": [r["eval_cpu_seconds"] for r in runs[False]],
        "eval_wall_speedup": min(r["eval_seconds"] for r in runs[False]) / min(r["eval_seconds"] for r in runs[True]),
        "cache_hits": on["stats"]["hits"],
        "cache_misses": on["stats"]["misses"],
        "cache_mb": on["stats"]["bytes"] / 2**20,
        "eval_speedup": off[key] / on[key],
        "identical": identical,
    }
    print(f"{'':10}{'eval s (' + clock + ')':>16}{'hits':>8}{'misses':>8}")
    print(f"{'cached':10}{on[key]:16.2f}{on['stats']['hits']:8d}{on['stats']['misses']:8d}")
    print(f"{'uncached':10}{off[key]:16.2f}{off['stats']['hits']:8d}{off['stats']['misses']:8d}")
    print(f"eval speedup {results['eval_speedup']:.2f}x, identical: {identical}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
