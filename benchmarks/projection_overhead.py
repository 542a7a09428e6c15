"""Cost of gradient projection per training step, and a CIFAR-10 mechanics check of it.

Step time: each pair runs the same strategy with and without a projection strategy
(``l2p`` / ``l2p+pgp``, ``vpt`` / ``vpt+nsp``, ``lora`` / ``lora+pgp``) through the loop's own
``ContinualLoop.train_step``, as ``l2p_throughput.py`` does. Both runs first train the end of
experience 0 (the batches whose representations the projection strategy reads), end it, and
enter experience 1, so the projected runs hold real bases and project every step. Reported:
median step time of each (single steps alternated, so drift in machine speed hits both alike),
the overhead of the projected step, the overhead of a step in the collection window (the last
``samples`` images of each epoch, where the norm1 hooks read the token stream), and the time
spent in the projection hooks alone (a low-noise measure of what projection adds per step).

    python benchmarks/projection_overhead.py --quick            # CPU, a few minutes
    python benchmarks/projection_overhead.py --device cuda      # ViT-B/16, batch 64, bf16

``--cifar10`` instead runs ``vpt`` vs ``vpt+nsp`` and ``l2p`` vs ``l2p+pgp`` on the real CIFAR-10
images with the random ViT of ``cifar10_mechanics.py`` (its ``config()``), printing accuracy
matrices, final average accuracy, forgetting, and the drift of experience 0's features (what
projection acts on, apart from the head's confusion between old and new classes):

    DRIFTPROMPT_DATA=../shared/data python benchmarks/projection_overhead.py --cifar10 [--quick]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from driftprompt.engine.config import validate
from driftprompt.engine import hookimpl
from driftprompt.engine.events import Event
from driftprompt.engine.run import build

from common import timed  # benchmarks/ is on sys.path when run as a script

PAIRS: list[tuple[list[Any], list[Any]]] = [
    (["l2p"], ["l2p", "pgp"]),
    (["vpt"], ["vpt", "nsp"]),
    (["lora"], ["lora", "pgp"]),
]
CIFAR_RUNS: list[list[Any]] = [["vpt"], ["vpt", "nsp"], ["l2p"], ["l2p", "pgp"]]




def label(names: list[Any]) -> str:
    return "+".join(n if isinstance(n, str) else n["name"] for n in names)


class Prepared:
    """A run advanced to the first step of experience 1, with bases built from experience 0."""

    def __init__(self, names: list[Any], device: torch.device, model: str, model_kwargs: dict[str, Any], batch: int, samples: int) -> None:
        strategies = [{"name": n, "samples": samples} if n in ("pgp", "nsp") else n for n in names]
        config = validate(
            {
                "name": "bench",
                "device": str(device),
                "seed": 0,
                "backbone": {"name": model, "weights": "random", "kwargs": model_kwargs},
                "stream": {"name": "synthetic", "options": {"num_classes": 100, "n_experiences": 10, "train_per_class": 100, "test_per_class": 1, "image_size": 32}},
                "train": {"batch_size": batch, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
                "log": {"tensorboard": False, "progress": False},
                "strategies": strategies,
            }
        )
        torch.manual_seed(0)
        self.run = build(config, run_dir=None)
        loop, s = self.run.loop, self.run.state
        self.images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
        loop._init()
        s.phase = "train"
        loop.hooks.fire(Event.FIT_START, s)
        allowed = loop.begin_experience(0)
        exp = self.run.stream[0]
        self.per_epoch = math.ceil(len(exp.train) / batch)
        window = math.ceil(samples / batch)
        s.epoch = 0
        loop.hooks.fire(Event.EPOCH_START, s)
        targets = self.targets(0, batch, device)
        for b in range(self.per_epoch - window, self.per_epoch):
            s.batch_index = b
            loop.train_step(self.images, targets, {}, allowed)
        loop.hooks.fire(Event.EPOCH_END, s)
        loop.hooks.fire(Event.EXPERIENCE_END, s)
        self.allowed = loop.begin_experience(1)
        loop.hooks.fire(Event.EPOCH_START, s)
        self.targets1 = self.targets(1, batch, device)

    def targets(self, i: int, batch: int, device: torch.device) -> torch.Tensor:
        classes = torch.as_tensor(self.run.stream[i].classes, device=device)
        return classes[torch.arange(batch, device=device) % len(classes)]

    def step(self, in_window: bool = False) -> None:
        self.run.state.batch_index = self.per_epoch - 1 if in_window else 0
        self.run.loop.train_step(self.images, self.targets1, {}, self.allowed)


def projection_hooks(prepared: Prepared, device: torch.device, calls: int = 50) -> float:
    """Seconds per step spent in the projection strategy's optimizer-step hooks alone.

    The end-to-end difference of two step times is noisy on shared machines; this isolates
    the work projection adds to every step (gradient projection, update snapshot and rewrite).
    """
    state = prepared.run.state
    strategy = prepared.run.strategies[-1][1]
    for group in state.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)

    def both() -> None:
        strategy.before_optimizer_step(state)
        strategy.after_optimizer_step(state)

    return timed(both, device, 3, calls)


def overhead(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    quick = args.quick or device.type == "cpu"
    name = args.model or ("vit_tiny_patch16_224" if quick else "vit_base_patch16_224")
    model_kwargs: dict[str, Any] = {"depth": 6} if quick and args.model is None else {}
    batch = args.batch_size or (8 if quick else 64)
    steps = args.steps or (7 if quick else 30)
    samples = 4 * batch if quick else 768
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": name,
        "model_kwargs": model_kwargs,
        "batch_size": batch,
        "samples": samples,
        "threads": torch.get_num_threads(),
        "pairs": {},
    }
    print(f"{'pair':22}{'plain ms':>10}{'projected ms':>14}{'overhead':>10}{'window ms':>11}{'window ovh':>11}{'hooks ms':>10}{'hooks %':>9}")
    for plain_names, projected_names in PAIRS:
        plain = Prepared(plain_names, device, name, model_kwargs, batch, samples)
        projected = Prepared(projected_names, device, name, model_kwargs, batch, samples)
        for _ in range(2):  # warm-up
            plain.step()
            projected.step()
        figures: dict[str, list[float]] = {"plain": [], "projected": [], "window": []}
        # alternate single steps, so drift in machine speed hits all three alike
        for _ in range(steps):
            figures["plain"].append(timed(plain.step, device, 0, 1))
            figures["projected"].append(timed(projected.step, device, 0, 1))
            figures["window"].append(timed(lambda: projected.step(True), device, 0, 1))
        t_plain, t_proj, t_window = (statistics.median(figures[k]) for k in ("plain", "projected", "window"))
        t_hooks = projection_hooks(projected, device)
        key = label(projected_names)
        results["pairs"][key] = {
            "plain_ms": 1000 * t_plain,
            "projected_ms": 1000 * t_proj,
            "overhead": t_proj / t_plain - 1.0,
            "window_ms": 1000 * t_window,
            "window_overhead": t_window / t_plain - 1.0,
            "hooks_ms": 1000 * t_hooks,
            "hooks_fraction": t_hooks / t_plain,
        }
        r = results["pairs"][key]
        print(
            f"{key:22}{r['plain_ms']:10.1f}{r['projected_ms']:14.1f}{100 * r['overhead']:9.1f}%{r['window_ms']:11.1f}{100 * r['window_overhead']:10.1f}%"
            f"{r['hooks_ms']:10.2f}{100 * r['hooks_fraction']:8.2f}%"
        )
    return results


class FeatureDrift:
    """Relative change of experience 0's test features (the head's input) from after experience 0 to the end.

    Forgetting mixes representation drift with the head's confusion between old and new
    classes; projection acts on the first only, which this isolates: mean over 100 test images
    of ||f_end - f_0|| / ||f_0||, through the run's own evaluation path (``eval_step``).
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.reference: torch.Tensor | None = None
        self.batch: Any = None
        self.value = float("nan")

    @hookimpl(trylast=True)
    def eval_end(self, state: Any) -> None:
        from driftprompt.streams import iterate

        if self.batch is None:
            self.batch = next(iter(iterate(self.run.stream[0].test, 100)))
        images, targets, extras = self.batch
        self.run.loop.eval_step(images, targets, extras, None)
        features = state.features.detach().float().clone()
        if state.experience.index == 0:
            self.reference = features
        elif self.reference is not None:
            self.value = float(((features - self.reference).norm(dim=1) / self.reference.norm(dim=1).clamp_min(1e-12)).mean())


def cifar10(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cifar10_mechanics import config  # noqa: E402 - the benchmarks folder is not a package

    from driftprompt.engine.loggers import format_accuracy_matrix
    from driftprompt.engine.metrics import AccuracyMatrix

    per_class, test_per_class, epochs = (20, 20, 1) if args.quick else (200, 100, 2)
    results: dict[str, Any] = {}
    for names in CIFAR_RUNS:
        started = time.perf_counter()
        run = build(validate(config(names, per_class, test_per_class, epochs, args.device)), run_dir=None)
        drift = FeatureDrift(run)
        run.hooks.pm.register(drift)
        summary = run.fit()
        seconds = time.perf_counter() - started
        key = label(names)
        print(format_accuracy_matrix(AccuracyMatrix.from_list(summary["accuracy"]).values, f"{key} ({seconds:.0f} s)"))
        print(f"final average accuracy {summary['final_average_accuracy']:.1f}, forgetting {summary['forgetting']:.1f}, feature drift of experience 0 {drift.value:.3f}\n")
        results[key] = {
            "accuracy": summary["accuracy"],
            "final_average_accuracy": summary["final_average_accuracy"],
            "forgetting": summary["forgetting"],
            "feature_drift_e0": drift.value,
            "seconds": seconds,
        }
    return {"per_class": per_class, "test_per_class": test_per_class, "epochs": epochs, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small ViT on the CPU (or a short CIFAR-10 run with --cifar10)")
    parser.add_argument("--cifar10", action="store_true", help="accuracy and forgetting on real CIFAR-10 images instead of step time")
    parser.add_argument("--model", default=None, help="timm ViT name (default: vit_base_patch16_224, or a 6-block ViT-Ti/16 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    if args.cifar10:
        print(json.dumps(cifar10(args)))
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    print(json.dumps(overhead(args, device)))


if __name__ == "__main__":
    main()
