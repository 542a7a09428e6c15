"""Batched test-time adaptation against one sample at a time: seconds per sample and agreement.

Both sides run the engine's :class:`~driftprompt.engine.loop.TestTimeLoop` (through
``OnlineAdapter.loop``) on the same stream of raw images of different sizes, with the same
CLIP weights, class names and view seed:

* ``one_at_a_time``: test-time batches of one sample (``test_time.batch_size: 1``);
* ``batched``: test-time batches of ``--batch`` samples (``test_time.batch_size: B``). ``tpt``
  (episodic, ``per_sample``) adapts the B samples in one step with per-sample prompts: one
  image pass over B x V views, one text pass over B x C prompts. ``dynaprompt``
  (``per_sample: true``, ``--prompts`` prompts) computes the views and image features of the
  B samples once, then adapts them one after the other on its buffer (its selection depends
  on the previous sample's update, so that part cannot be batched exactly).

The sides alternate batch by batch (which one goes first alternates too), so load on the
machine falls on both alike. ``max_abs_logit_diff`` is the largest difference between the two
sides' final logits over every sample (fp32 rounding on the CPU; bf16 autocast on CUDA
rounds differently for different batch shapes, so it is larger there). Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` over each side's batches.

    python benchmarks/tta_batching.py --quick                     # tiny test CLIP, CPU, 1 thread
    python benchmarks/tta_batching.py --device cuda               # ViT-B/16 (random init), 1000 classes, 64 views, bf16

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone, crop_length
from driftprompt.engine.config import OptimizerConfig
from driftprompt.plugins.dynaprompt import DynaPrompt
from driftprompt.plugins.tpt import TPT

TINY_CLIP = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-clip.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Logits:
    """Keeps every sample's final logits (at ``test_sample_end``)."""

    name = "logits"
    independent_samples = True  # it only observes

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    @hookimpl
    def test_sample_end(self, state):  # type: ignore[no-untyped-def]
        self.rows += list(state.logits.detach().float().cpu())


def class_names(n: int, tokens: int) -> list[str]:
    """``n`` distinct names; the last one is long, so that text is cropped at about ``tokens`` positions
    (ImageNet's longest class name crops CLIP's text at about 20-30)."""
    names = [f"object {i}" for i in range(n)]
    names[-1] = " ".join(["long"] * max(1, tokens - 8)) + " object"
    return names


def make_side(method: str, clip: CLIPBackbone, names: list[str], args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> tuple[OnlineAdapter, Logits]:
    if method == "tpt":
        strategy: Any = TPT(class_names=names, views=args.views, seed=args.seed, chunk_size=args.tpt_chunk)
    else:
        strategy = DynaPrompt(class_names=names, views=args.views, buffer_size=args.prompts, per_sample=True, collapse_window=0, seed=args.seed, chunk_size=args.chunk_size)
    rec = Logits()
    optimizer = OptimizerConfig(name="adamw", lr=5e-3, weight_decay=0.01)
    adapter = OnlineAdapter(clip, [strategy, rec], class_names=names, steps=1, optimizer=optimizer, device=device, amp_dtype=amp)
    return adapter, rec


def run_method(method: str, clip: CLIPBackbone, names: list[str], raws: list[torch.Tensor], args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    one, one_logits = make_side(method, clip, names, args, device, amp)
    many, many_logits = make_side(method, clip, names, args, device, amp)
    squares = [(clip.preprocess(r.unsqueeze(0)) * clip.std + clip.mean).clamp(0, 1) for r in raws]
    B = args.batch
    seconds = {"one": 0.0, "many": 0.0}
    peak = {"one": 0.0, "many": 0.0}
    counted = 0

    def side_one(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            one.loop.run([(squares[i], None, {"raw": [raws[i]]})], total=1)

    def side_many(lo: int, hi: int) -> None:
        many.loop.run([(torch.cat(squares[lo:hi]), None, {"raw": raws[lo:hi]})], total=1)

    sides = {"one": side_one, "many": side_many}
    for k, lo in enumerate(range(0, len(raws), B)):
        hi = min(lo + B, len(raws))
        order = ("one", "many") if k % 2 == 0 else ("many", "one")
        for side in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            sides[side](lo, hi)
            sync(device)
            if k > 0:  # the first batch warms both sides up
                seconds[side] += time.perf_counter() - start
            if device.type == "cuda":
                peak[side] = max(peak[side], torch.cuda.max_memory_allocated(device) / 2**30)
        if k > 0:
            counted += hi - lo
    diff = max(float((a - b).abs().max()) for a, b in zip(one_logits.rows, many_logits.rows))
    assert len(one_logits.rows) == len(many_logits.rows) == len(raws)
    out = {
        "one_at_a_time_s_per_sample": seconds["one"] / max(counted, 1),
        "batched_s_per_sample": seconds["many"] / max(counted, 1),
        "speedup": seconds["one"] / max(seconds["many"], 1e-12),
        "max_abs_logit_diff": diff,
        "top1_agreement": sum(int(a.argmax() == b.argmax()) for a, b in zip(one_logits.rows, many_logits.rows)) / len(raws),
    }
    if device.type == "cuda":
        out["one_at_a_time_peak_gb"] = peak["one"]
        out["batched_peak_gb"] = peak["many"]
        out["batched_ms_per_sample"] = 1000 * out["batched_s_per_sample"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the tiny test CLIP on the CPU (1 thread), 20 classes, 64 views, 12 samples in batches of 4")
    parser.add_argument("--samples", type=int, default=None, help="test samples (the first batch is a warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="samples per test-time batch on the batched side (4 with --quick, 8 otherwise)")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=10, help="dynaprompt buffer size")
    parser.add_argument("--chunk-size", type=int, default=1000, help="dynaprompt text sequences per chunk")
    parser.add_argument("--tpt-chunk", type=int, default=None, help="tpt text sequences per chunk (samples x classes); default all at once")
    parser.add_argument("--text-tokens", type=int, default=24, help="text positions after cropping, set by one long class name")
    parser.add_argument("--methods", default="tpt,dynaprompt")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if args.quick:
        device = torch.device("cpu")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    args.batch = args.batch or (4 if args.quick else 8)
    args.samples = args.samples or (3 * args.batch if args.quick else 5 * args.batch)
    classes = args.classes or (20 if args.quick else 1000)
    torch.manual_seed(args.seed)
    clip = CLIPBackbone(model_config=TINY_CLIP, random_init=True) if args.quick else CLIPBackbone("ViT-B-16", random_init=True)
    clip = clip.to(device)
    names = class_names(classes, args.text_tokens)
    amp = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = (40, 72) if args.quick else (300, 500)
    raws = [torch.randint(0, 256, (3, int(torch.randint(lo, hi, (1,), generator=g)), int(torch.randint(lo, hi, (1,), generator=g))), dtype=torch.uint8, generator=g).to(device) for _ in range(args.samples)]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny-clip" if args.quick else "ViT-B-16",
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "batch": args.batch,
        "classes": classes,
        "views": args.views,
        "text_tokens": crop_length(clip.class_token_ids(names, 4)),
        "precision": "bf16 autocast" if amp is not None else "fp32",
    }
    for method in args.methods.split(","):
        figures = run_method(method, clip, names, raws, args, device, amp)
        results[method] = figures
        print(method, json.dumps(figures), flush=True)
    first = results[args.methods.split(",")[0]]
    results.update({k: first[k] for k in ("one_at_a_time_s_per_sample", "batched_s_per_sample", "speedup", "max_abs_logit_diff")})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
