"""Training-step and inference time of ``qprompt`` over 20 experiences: capped queue vs a growing one.

Q-Tuning's claim is constant cost: the queue of old prompts never exceeds its capacity C, so a
step costs the same at experience 20 as at experience 1. This benchmark drives the engine's
own path (``ContinualLoop.begin_experience``, ``train_step`` and ``eval_step``) through a
synthetic stream of 20 experiences for two ``qprompt`` runs built from the same seed:

* ``capped``: the defaults (prompt length 5, capacity 20, so De-Q eviction from experience 5);
* ``growing``: the same strategy with a capacity of 5 x 20 tokens, so nothing is ever evicted
  and the queue grows by 5 tokens per experience, like a queue without the De-Q rule.

The two runs advance experience by experience in lockstep, so drift in machine speed hits
both alike. Within an experience the two runs are timed in alternating rounds (``--rounds``);
each figure is the fastest round's median over ``--steps`` timed steps, which keeps bursts of
load from other processes on a shared machine out of the figures.

    python benchmarks/qprompt_scaling.py --quick                # CPU, a few minutes
    python benchmarks/qprompt_scaling.py --device cuda          # ViT-B/16, batch 64, bf16

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from driftprompt.engine import Event
from driftprompt.engine.config import validate
from driftprompt.engine.run import Run, build

from common import timed  # benchmarks/ is on sys.path when run as a script




def make_run(device: torch.device, name: str, model_kwargs: dict[str, Any], batch: int, experiences: int, options: dict[str, Any]) -> Run:
    torch.manual_seed(0)
    config = validate(
        {
            "name": "bench",
            "device": str(device),
            "seed": 0,
            "backbone": {"name": name, "weights": "random", "kwargs": model_kwargs},
            "stream": {"name": "synthetic", "options": {"num_classes": 2 * experiences, "n_experiences": experiences, "train_per_class": 1, "test_per_class": 1, "image_size": 32}},
            "train": {"batch_size": batch, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
            "log": {"tensorboard": False, "progress": False},
            "strategies": [{"name": "qprompt", **options}],
        }
    )
    run = build(config, run_dir=None)
    run.loop._init()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small ViT on the CPU, a few minutes")
    parser.add_argument("--model", default=None, help="timm ViT name (default: vit_base_patch16_224, or a 4-block ViT-Ti/16 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--experiences", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    quick = args.quick or device.type == "cpu"
    name = args.model or ("vit_tiny_patch16_224" if quick else "vit_base_patch16_224")
    model_kwargs: dict[str, Any] = {"depth": 4} if quick and args.model is None else {}
    batch = args.batch_size or (8 if quick else 64)
    steps = args.steps or (5 if quick else 20)
    n = args.experiences
    length = 5
    runs = {
        "capped": make_run(device, name, model_kwargs, batch, n, {"prompt_length": length, "capacity": 4 * length}),
        "growing": make_run(device, name, model_kwargs, batch, n, {"prompt_length": length, "capacity": length * n}),
    }
    size = runs["capped"].state.backbone.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=generator).to(device)

    per_experience: dict[str, list[dict[str, float]]] = {key: [] for key in runs}
    print(f"{'exp':>4}  {'capped tokens':>13} {'train s':>8} {'eval s':>8}   {'growing tokens':>14} {'train s':>8} {'eval s':>8}")
    for i in range(n):
        allowed = {key: run.loop.begin_experience(i) for key, run in runs.items()}
        classes = torch.as_tensor(runs["capped"].stream[i].classes)
        targets = classes[torch.randint(0, len(classes), (batch,), generator=generator)].to(device)
        train: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                train[key].append(timed(lambda: run.loop.train_step(images, targets, {}, allowed[key]), device, 1, steps))
        tokens = {key: int(run.strategies[0][1].q_prompt().shape[0]) for key, run in runs.items()}
        for run in runs.values():
            run.hooks.fire(Event.EXPERIENCE_END, run.state)
            run.state.phase = "eval"
        evaluate: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                evaluate[key].append(timed(lambda: run.loop.eval_step(images, targets, {}, allowed[key]), device, 1, steps))
        cells = []
        for key, run in runs.items():
            run.state.phase = "train"
            row = {"experience": i + 1, "q_prompt_tokens": tokens[key], "train_s_per_step": min(train[key]), "eval_s_per_batch": min(evaluate[key])}
            per_experience[key].append(row)
            cells.append(f"{row['q_prompt_tokens']:>13} {row['train_s_per_step']:8.3f} {row['eval_s_per_batch']:8.3f}")
        print(f"{i + 1:>4}  {cells[0]}   {' ' + cells[1]}", flush=True)

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": name,
        "model_kwargs": model_kwargs,
        "image_size": list(size),
        "batch_size": batch,
        "steps": steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "experiences": n,
    }
    for key, rows in per_experience.items():
        first, last = rows[0], rows[-1]
        results[key] = {
            "capacity": runs[key].strategies[0][1].capacity,
            "max_q_prompt_tokens": max(r["q_prompt_tokens"] for r in rows),
            "train_ratio_last_over_first": last["train_s_per_step"] / first["train_s_per_step"],
            "eval_ratio_last_over_first": last["eval_s_per_batch"] / first["eval_s_per_batch"],
            "per_experience": rows,
        }
    for key in runs:
        r = results[key]
        print(f"{key}: step time at experience {n} / experience 1 = {r['train_ratio_last_over_first']:.2f} (train), {r['eval_ratio_last_over_first']:.2f} (eval); at most {r['max_q_prompt_tokens']} queue tokens")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
