"""Peak memory of one ``dynaprompt`` adaptation step with every buffered prompt selected.

The worst case of the strategy's memory: ``--prompts`` prompts (10), all selected for the
gradient pass, over ``--classes`` classes (1000) and ``--views`` views (64), one step through
:class:`~driftprompt.engine.adapter.OnlineAdapter`. A small helper plugin overrides the
per-sample selection with every prompt id, so the figure does not depend on what a random
model happens to select.

Measured:

* ``saved_for_backward_mb``: bytes autograd keeps for backward during the step (every tensor
  packed through ``torch.autograd.graph.saved_tensors_hooks``);
* on the CPU, ``peak_step_mb``: the process's peak resident memory during the step
  (``ru_maxrss``) minus its resident memory just before it; ``peak_rss_mb`` the peak itself;
* on CUDA, ``peak_step_mb``: ``torch.cuda.max_memory_allocated`` during the step minus the
  memory allocated before it (bf16 autocast, as runs use on CUDA); ``peak_allocated_mb``.

    python benchmarks/dynaprompt_memory.py --quick                 # tiny test CLIP, CPU, fp32
    python benchmarks/dynaprompt_memory.py                         # ViT-B/16 (random init), CPU, fp32
    python benchmarks/dynaprompt_memory.py --device cuda           # ViT-B/16, CUDA, bf16 autocast

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
from pathlib import Path

import torch

from driftprompt.engine import hookimpl
from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.plugins.dynaprompt import DynaPrompt

TINY_CLIP = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-clip.json"


def rss_mb() -> float:
    """Current resident memory of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class SelectAll:
    """Selects every buffered prompt for the gradient pass (the worst case)."""

    name = "select_all"

    def __init__(self, dp: DynaPrompt) -> None:
        self.dp = dp

    @hookimpl
    def test_sample_start(self, state) -> None:  # runs after dynaprompt's own selection
        self.dp.selected = list(range(self.dp.buffer_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny test CLIP (width 64, 2 layers) instead of ViT-B/16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1000)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = CLIPBackbone(model_config=TINY_CLIP, random_init=True) if args.quick else CLIPBackbone("ViT-B-16", random_init=True)
    clip = clip.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    dp = DynaPrompt(views=args.views, buffer_size=args.prompts, chunk_size=args.chunk_size, collapse_window=0)
    names = [f"class {i}" for i in range(args.classes)]
    adapter = OnlineAdapter(clip, [dp, SelectAll(dp)], class_names=names, device=device, amp_dtype=amp)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    # build the class tokens and the buffer outside the measured step
    dp.setup(adapter.state)
    dp._ensure(adapter.state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    before_rss = rss_mb()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = adapter.predict([image])[0]
    if not result.ok:
        sys.exit(f"the step failed: {result.error}")
    out = {
        "model": "tiny-clip" if args.quick else "ViT-B-16",
        "device": str(device),
        "precision": "bf16" if amp is not None else "fp32",
        "classes": args.classes,
        "prompts_selected": len(dp.selected),
        "views": args.views,
        "text_tokens": int(dp.token_ids.argmax(dim=-1).max()) + 1,
        "saved_for_backward_mb": round(saved[0] / 2**20, 1),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_step_mb=round((peak - before) / 2**20, 1), peak_allocated_mb=round(peak / 2**20, 1), gpu=torch.cuda.get_device_name(device))
    else:
        out.update(peak_step_mb=round(max_rss_mb() - before_rss, 1), peak_rss_mb=round(max_rss_mb(), 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
