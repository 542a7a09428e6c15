"""Training-step and evaluation throughput of the ``l2p`` plugin against a two-copy reference.

The reference has the structure of the public L2P ports: two copies of the ViT in fp32, the
explicit-softmax attention those ports carry, a frozen pass for the query and a prompted
pass per step. ``ours`` is the engine's own path (``ContinualLoop.train_step`` and
``eval_step`` with the ``l2p`` strategy): one backbone, fused attention, bf16 autocast on CUDA.
Both see the same batches, with the same ViT weights and the same L2P settings (pool 10,
length 5, top-5, prompt-mean head, pull constraint 0.1, Adam, clipping 1.0).

    python benchmarks/l2p_throughput.py --quick                 # CPU, under a minute
    python benchmarks/l2p_throughput.py --device cuda           # ViT-B/16, batch 64, bf16

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import timm
import torch
import torch.nn.functional as F

from driftprompt.engine.config import validate
from driftprompt.engine.run import build

from common import sync, timed  # benchmarks/ is on sys.path when run as a script

VIT_B16_TRAIN_GFLOP_PER_IMAGE = 57.0  # frozen query pass + prompted forward and backward
BF16_DENSE_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}




class Reference:
    """L2P as the public ports structure it: a frozen copy for the query, a prompted copy to train."""

    def __init__(self, name: str, model_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], num_classes: int, device: torch.device) -> None:
        self.original = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
        self.original.load_state_dict(state_dict)
        self.model = copy.deepcopy(self.original)
        for m in (self.original, self.model):
            m.requires_grad_(False).eval().to(device)
            for block in m.blocks:
                block.attn.fused_attn = False  # the ports' explicit q @ k^T softmax attention
        dim = self.model.embed_dim
        self.prompts = torch.nn.Parameter(torch.rand(10, 5, dim, device=device))
        self.keys = torch.nn.Parameter(torch.rand(10, dim, device=device))
        self.head = torch.nn.Linear(dim, num_classes).to(device)
        self.optimizer = torch.optim.Adam([self.prompts, self.keys, *self.head.parameters()], lr=0.03 * 16 / 256)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            query = self.original.forward_features(x)[:, 0]
        sim = F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T
        idx = sim.topk(5, dim=1).indices
        m = self.model
        tokens = m._pos_embed(m.patch_embed(x))
        prompts = self.prompts[idx].reshape(x.shape[0], -1, tokens.shape[-1])
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        tokens = m.norm(m.blocks(tokens))
        feats = tokens[:, 1 : 1 + prompts.shape[1]].mean(dim=1)
        return self.head(feats), query, idx

    def train_step(self, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> None:
        logits, query, idx = self.logits(x)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        k = F.normalize(self.keys, dim=1)[idx]
        pull = (1 - (F.normalize(query, dim=1).unsqueeze(1) * k).sum(-1)).sum(1).mean()
        loss = F.cross_entropy(logits, y) + 0.1 * pull
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.prompts, self.keys, *self.head.parameters()], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small ViT on the CPU, under a minute")
    parser.add_argument("--model", default=None, help="timm ViT name (default: vit_base_patch16_224, or a 6-block ViT-Ti/16 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    quick = args.quick or device.type == "cpu"
    name = args.model or ("vit_tiny_patch16_224" if quick else "vit_base_patch16_224")
    model_kwargs: dict[str, Any] = {"depth": 6} if quick and args.model is None else {}
    batch = args.batch_size or (16 if quick else 64)
    steps = args.steps or (5 if quick else 20)
    num_classes = 100

    torch.manual_seed(0)
    config = validate(
        {
            "name": "bench",
            "device": str(device),
            "backbone": {"name": name, "weights": "random", "kwargs": model_kwargs},
            "stream": {"name": "synthetic", "options": {"num_classes": num_classes, "n_experiences": 10, "train_per_class": 1, "test_per_class": 1, "image_size": 224}},
            "train": {"batch_size": batch, "optimizer": {"name": "adam", "lr": 0.001}, "grad_clip": 1.0},
            "log": {"tensorboard": False, "progress": False},
            "strategies": ["l2p"],
        }
    )
    run = build(config, run_dir=None)
    loop, state = run.loop, run.state
    loop._init()
    allowed = loop.begin_experience(0)
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    targets = torch.as_tensor(run.stream[0].classes, device=device)[torch.randint(0, len(run.stream[0].classes), (batch,), device=device)]
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    mask[torch.as_tensor(run.stream[0].classes, device=device)] = True
    reference = Reference(name, model_kwargs, state.backbone.model.state_dict(), num_classes, device)
    x = state.backbone.preprocess(images)

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name, "model_kwargs": model_kwargs, "batch_size": batch, "threads": torch.get_num_threads()}
    warmup = 2
    figures: dict[str, list[float]] = {k: [] for k in ("ours_train", "ref_train", "ours_eval", "ref_eval")}
    for _ in range(2):  # interleaved rounds, so drift in machine speed hits both sides alike
        figures["ours_train"].append(timed(lambda: loop.train_step(images, targets, {}, allowed), device, warmup, steps))
        figures["ref_train"].append(timed(lambda: reference.train_step(x, targets, mask), device, warmup, steps))
        figures["ours_eval"].append(timed(lambda: loop.eval_step(images, targets, {}, allowed), device, warmup, steps))
        figures["ref_eval"].append(timed(lambda: reference.eval_step(x), device, warmup, steps))
    for key, values in figures.items():
        results[f"{key}_img_per_s"] = batch / min(values)
    results["train_ratio"] = results["ours_train_img_per_s"] / results["ref_train_img_per_s"]
    results["eval_ratio"] = results["ours_eval_img_per_s"] / results["ref_eval_img_per_s"]

    if device.type == "cuda":
        for label, fn in (("ours", lambda: loop.train_step(images, targets, {}, allowed)), ("ref", lambda: reference.train_step(x, targets, mask))):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            results[f"{label}_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        results["memory_ratio"] = results["ours_peak_memory_mb"] / results["ref_peak_memory_mb"]
        gpu = next((k for k in BF16_DENSE_TFLOPS if k in results["device"]), None)
        if gpu and name.startswith("vit_base_patch16_224") and not model_kwargs:
            achieved = results["ours_train_img_per_s"] * VIT_B16_TRAIN_GFLOP_PER_IMAGE * 1e9
            results["bf16_flop_fraction"] = achieved / (BF16_DENSE_TFLOPS[gpu] * 1e12)

    print(f"{'':10}{'train img/s':>14}{'eval img/s':>14}")
    print(f"{'ours':10}{results['ours_train_img_per_s']:14.1f}{results['ours_eval_img_per_s']:14.1f}")
    print(f"{'reference':10}{results['ref_train_img_per_s']:14.1f}{results['ref_eval_img_per_s']:14.1f}")
    print(f"{'ratio':10}{results['train_ratio']:14.2f}{results['eval_ratio']:14.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
