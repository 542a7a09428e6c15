"""Training-step and evaluation throughput of the ``l2p`` plugin against a two-copy reference.

The reference has the structure of the public L2P ports: two copies of the ViT in fp32, the
explicit-softmax attention those ports carry, a frozen pass for the query and a prompted
pass per step. ``ours`` is the engine's own path (``ContinualLoop.train_step`` and
``eval_step`` with the ``l2p`` strategy): one backbone, fused attention, bf16 autocast on CUDA.
Both see the same batches, with the same ViT weights and the same L2P settings (pool 10,
length 5, top-5, prompt-mean head, pull constraint 0.1, Adam, clipping 1.0).

    python benchmarks/l2p_throughput.py --quick                 # CPU, under a minute
    python benchmarks/l2p_throughput.py --device cuda           # ViT-B/16, batch 64, bf16
    python benchmarks/l2p_throughput.py --device cuda --strategy dualprompt --compile on --batch-size 256 --no-reference

``--strategy`` also times ``dualprompt`` and ``coda_prompt`` (their paper settings; the
two-copy reference exists for ``l2p`` only), ``--compile on`` sets ``train.compile`` (the
prompted backbone through ``torch.compile``, one graph per prompt layout). The FLOPs of one
training and one evaluation step are counted with ``torch.utils.flop_counter.FlopCounterMode``
on the eager path (the compiled graph does the same arithmetic), and on a known GPU the
achieved rate is reported as a fraction of its dense bf16 peak (``BF16_DENSE_TFLOPS``).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import timm
import torch
import torch.nn.functional as F

from driftprompt.engine.config import validate
from driftprompt.engine.run import build

from common import sync, timed  # benchmarks/ is on sys.path when run as a script

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets (the
# sheets print the sparse figure, twice these): H100/H200 SXM 989, A100 312, L40S 362. The one
# constant every figure of "fraction of peak" in the benchmarks uses.
BF16_DENSE_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU, by its name (``None`` for the CPU or an unknown GPU)."""
    return next((v for k, v in BF16_DENSE_TFLOPS.items() if k in device_name), None)


def count_flops(fn: Any) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())




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
    parser.add_argument("--strategy", default="l2p", choices=["l2p", "dualprompt", "coda_prompt"])
    parser.add_argument("--compile", default="off", choices=["on", "off", "auto"], help="train.compile: the prompted backbone through torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--cuda-graphs", action="store_true", help="train.cuda_graphs (compile mode reduce-overhead)")
    parser.add_argument("--no-reference", action="store_true", help="skip the two-copy reference (it exists for l2p only)")
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
    with_reference = args.strategy == "l2p" and not args.no_reference
    compile_option: Any = {"on": True, "off": False, "auto": "auto"}[args.compile]

    torch.manual_seed(0)
    config = validate(
        {
            "name": "bench",
            "device": str(device),
            "backbone": {"name": name, "weights": "random", "kwargs": model_kwargs},
            "stream": {"name": "synthetic", "options": {"num_classes": num_classes, "n_experiences": 10, "train_per_class": 1, "test_per_class": 1, "image_size": 224}},
            "train": {
                "batch_size": batch,
                "optimizer": {"name": "adam", "lr": 0.001},
                "grad_clip": 1.0,
                "compile": compile_option,
                "compile_backend": args.compile_backend,
                "cuda_graphs": args.cuda_graphs,
            },
            "log": {"tensorboard": False, "progress": False},
            "strategies": [args.strategy],
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

    def train() -> Any:
        return loop.train_step(images, targets, {}, allowed)

    def evaluate() -> Any:
        state.phase = "eval"
        try:
            return loop.eval_step(images, targets, {}, allowed)
        finally:
            state.phase = "train"

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": device_name, "model": name, "model_kwargs": model_kwargs, "strategy": args.strategy, "batch_size": batch, "threads": torch.get_num_threads()}
    warmup = 3 if compile_option is not False else 2
    started = time.perf_counter()
    for _ in range(warmup):  # compiles every layout (train, query, eval) when compile is on
        train()
        evaluate()
    sync(device)
    results["warmup_seconds"] = time.perf_counter() - started
    compiled = state.backbone.__dict__.get("compiled_forward")
    results["compiled"] = bool(compiled is not None and compiled.failed is None and compiled.graphs)
    if compiled is not None and compiled.failed is not None:
        results["compile_failure"] = compiled.failed
    results["fused_optimizer"] = bool(state.optimizer is not None and state.optimizer.defaults.get("fused"))

    # FLOPs of one step, counted on the eager path (the same arithmetic as the compiled graph)
    state.backbone.__dict__.pop("compiled_forward", None)
    try:
        train_flops = count_flops(train)
        eval_flops = count_flops(evaluate)
    finally:
        if compiled is not None:
            state.backbone.compiled_forward = compiled
    results["train_gflop_per_image"] = train_flops / batch / 1e9
    results["eval_gflop_per_image"] = eval_flops / batch / 1e9

    reference = None
    if with_reference:
        reference = Reference(name, model_kwargs, state.backbone.model.state_dict(), num_classes, device)
        x = state.backbone.preprocess(images)
    figures: dict[str, list[float]] = {k: [] for k in (("ours_train", "ref_train", "ours_eval", "ref_eval") if reference else ("ours_train", "ours_eval"))}
    for _ in range(2):  # interleaved rounds, so drift in machine speed hits both sides alike
        figures["ours_train"].append(timed(train, device, 1, steps))
        if reference is not None:
            figures["ref_train"].append(timed(lambda: reference.train_step(x, targets, mask), device, 2, steps))
        figures["ours_eval"].append(timed(evaluate, device, 1, steps))
        if reference is not None:
            figures["ref_eval"].append(timed(lambda: reference.eval_step(x), device, 2, steps))
    for key, values in figures.items():
        results[f"{key}_img_per_s"] = batch / min(values)
    if reference is not None:
        results["train_ratio"] = results["ours_train_img_per_s"] / results["ref_train_img_per_s"]
        results["eval_ratio"] = results["ours_eval_img_per_s"] / results["ref_eval_img_per_s"]
    results["train_tflop_per_s"] = results["ours_train_img_per_s"] * results["train_gflop_per_image"] / 1e3
    results["eval_tflop_per_s"] = results["ours_eval_img_per_s"] * results["eval_gflop_per_image"] / 1e3
    peak = peak_tflops(device_name)
    if peak is not None:
        results["bf16_dense_peak_tflop_per_s"] = peak
        results["train_peak_fraction"] = results["train_tflop_per_s"] / peak
        results["eval_peak_fraction"] = results["eval_tflop_per_s"] / peak

    if device.type == "cuda":
        sides = [("ours", train)] + ([("ref", lambda: reference.train_step(x, targets, mask))] if reference is not None else [])
        for label, fn in sides:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            results[f"{label}_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if reference is not None:
            results["memory_ratio"] = results["ours_peak_memory_mb"] / results["ref_peak_memory_mb"]

    print(f"{args.strategy}, batch {batch}, compile {args.compile} ({'compiled' if results['compiled'] else 'eager'})")
    print(f"{'':10}{'train img/s':>14}{'eval img/s':>14}")
    print(f"{'ours':10}{results['ours_train_img_per_s']:14.1f}{results['ours_eval_img_per_s']:14.1f}")
    if reference is not None:
        print(f"{'reference':10}{results['ref_train_img_per_s']:14.1f}{results['ref_eval_img_per_s']:14.1f}")
        print(f"{'ratio':10}{results['train_ratio']:14.2f}{results['eval_ratio']:14.2f}")
    print(f"GFLOP/image: train {results['train_gflop_per_image']:.1f}, eval {results['eval_gflop_per_image']:.1f}" + (f"; fraction of bf16 dense peak: train {results['train_peak_fraction']:.3f}, eval {results['eval_peak_fraction']:.3f}" if peak else ""))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
