"""Accuracy matrices of several strategies on real CIFAR-10 images with a random ViT.

A mechanics check, not a paper reproduction: the backbone is a randomly initialised small ViT
(no pretrained weights), so absolute accuracies are low; what the figures show is that each
strategy trains, evaluates and forgets (or not) as its design says, on real images, through
the same path as ``python launch.py``.

    DRIFTPROMPT_DATA=../shared/data python benchmarks/cifar10_mechanics.py
    DRIFTPROMPT_DATA=../shared/data python benchmarks/cifar10_mechanics.py --quick   # CPU, ~1 min

Prints one Markdown table per strategy, then one JSON line with every matrix and summary.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from driftprompt.engine.config import validate
from driftprompt.engine.loggers import format_accuracy_matrix
from driftprompt.engine.metrics import AccuracyMatrix
from driftprompt.engine.run import build

STRATEGIES = ["finetune", "ncm", "l2p", "dualprompt", "coda_prompt"]


def config(strategies: list[Any], per_class: int, test_per_class: int, epochs: int, device: str) -> dict[str, Any]:
    return {
        "name": "cifar10-mechanics",
        "device": device,
        "seed": 0,
        "backbone": {"name": "vit_tiny_patch16_224", "weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 6}},
        "stream": {"name": "image_tar", "options": {"path": "cifar10-jpeg.tar.gz", "scenario": "class_incremental", "n_experiences": 5, "seed": 0, "per_class": per_class, "test_per_class": test_per_class}},
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
        "eval": {"batch_size": 250},
        "log": {"tensorboard": False, "progress": False},
        "strategies": strategies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES)
    args = parser.parse_args()
    per_class, test_per_class, epochs = (20, 20, 1) if args.quick else (200, 100, 2)
    results = {}
    for name in args.strategies:
        started = time.perf_counter()
        run = build(validate(config([name], per_class, test_per_class, epochs, args.device)), run_dir=None)
        summary = run.fit()
        seconds = time.perf_counter() - started
        values = AccuracyMatrix.from_list(summary["accuracy"]).values
        print(format_accuracy_matrix(values, f"{name} ({seconds:.0f} s)"))
        print(f"final average accuracy {summary['final_average_accuracy']:.1f}, forgetting {summary['forgetting']:.1f}\n")
        results[name] = {"accuracy": summary["accuracy"], "final_average_accuracy": summary["final_average_accuracy"], "forgetting": summary["forgetting"], "seconds": seconds}
    print(json.dumps({"per_class": per_class, "test_per_class": test_per_class, "epochs": epochs, "results": results}))


if __name__ == "__main__":
    main()
