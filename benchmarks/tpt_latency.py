"""Seconds per test sample of the ``tpt`` plugin against a reference with the official TPT structure.

The reference follows the official code (azshue/TPT, ``tpt_classification.py`` and
``clip/custom_clip.py``): 64 views made with torchvision from the raw PIL image (the resized
and centre-cropped image, and 63 ``RandomResizedCrop`` + ``RandomHorizontalFlip`` views, as
``AugMixAugmenter`` with ``augmix=False``) by the worker processes of a ``DataLoader``
(``--workers``, 4 as the official ``-j``; tpt_classification.py:213-216), the prompt reset and
the optimizer state reloaded for every sample, every view re-encoded at every step (image tower
without gradients), 77-token text encoding with the full causal mask, the 10% most confident
views chosen at the first step, ``avg_entropy``, one AdamW step (lr 5e-3), and a prediction
that encodes the original image again with the tuned prompt. On CUDA the reference runs the
official fp16 autocast with a ``GradScaler(init_scale=1000)`` (tpt_classification.py:62, 149,
290); on the CPU both sides run fp32.

``ours`` is the engine's path: ``OnlineAdapter`` with the ``tpt`` plugin (views cut on the
device from the raw image, view features encoded once per sample, text cropped at the last
end-of-text token, bf16 autocast on CUDA).

The two sides alternate sample by sample (which side goes first alternates too), so that
machine load drifts over both alike; the reference's time per sample runs from asking its
loader for the sample's views to its prediction, so views its workers made ahead of time cost
it nothing, as in the official pipeline. Both sides get the same non-square raw images, CLIP
weights and initial context ("a photo of a"). The views are not identical (PIL against tensor
resampling, different random draws), so the script reports the fraction of identical top-1
predictions on the original view after the step, how many predictions the step changed from
the zero-shot prediction on each side, and the same for the reference against itself with
other view seeds (a control for view randomness alone).

    python benchmarks/tpt_latency.py --quick               # tiny CLIP, CPU (1 thread), 8 samples, 20 classes, 2 view workers
    python benchmarks/tpt_latency.py --device cuda         # ViT-B/16 (random init), 1000 classes

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.plugins.tpt import TPT

TINY_CLIP = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-clip.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """The official ``avg_entropy``."""
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def reference_select(logits: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``select_confident_samples``."""
    batch_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * top)]
    return logits[idx], idx


class ReferenceTPT:
    """TPT with the official code's structure, in fp32, on an open_clip model."""

    def __init__(self, clip: CLIPBackbone, names: list[str], device: torch.device, n_ctx: int = 4, ctx_init: str = "a photo of a", views: int = 64, selection: float = 0.1, lr: float = 5e-3, steps: int = 1, fp16: bool = False) -> None:
        import torchvision.transforms as T

        self.model = clip.model
        self.device = device
        self.views, self.selection, self.steps = views, selection, steps
        size = clip.image_size[0]
        mean, std = clip.mean.flatten().tolist(), clip.std.flatten().tolist()
        self.base = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
        self.preprocess = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.preaugment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
        ids = clip.tokenize([f"{ctx_init} {name.replace('_', ' ')}." for name in names])  # C, 77
        with torch.no_grad():
            emb = self.model.token_embedding(ids)
        self.ids = ids
        self.prefix, self.suffix = emb[:, :1], emb[:, 1 + n_ctx :]
        self.init_ctx = emb[0, 1 : 1 + n_ctx].clone()
        self.ctx = torch.nn.Parameter(self.init_ctx.clone())
        self.optimizer = torch.optim.AdamW([self.ctx], lr=lr)
        self.optim_state = copy.deepcopy(self.optimizer.state_dict())
        self.fp16 = fp16
        self.scaler = torch.cuda.amp.GradScaler(init_scale=1000) if fp16 else None

    def autocast(self):  # type: ignore[no-untyped-def]
        """The official ``torch.cuda.amp.autocast()`` (fp16) on CUDA; nothing on the CPU."""
        import contextlib

        return torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()

    def text_features(self) -> torch.Tensor:
        m = self.model
        C = self.ids.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(C, -1, -1), self.suffix], dim=1)
        x = x + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(C, device=x.device), self.ids.argmax(dim=-1)] @ m.text_projection
        return F.normalize(x, dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image_features = F.normalize(self.model.encode_image(images), dim=-1)
        return self.model.logit_scale.exp() * image_features @ self.text_features().T

    def make_views(self, raw: torch.Tensor, seed: int) -> torch.Tensor:
        """The original (resize + centre crop) and ``views - 1`` crop-and-flip views, on the CPU."""
        import torchvision.transforms.functional as TF

        pil = TF.to_pil_image(raw)
        torch.manual_seed(seed)
        out = [self.preprocess(self.base(pil))] + [self.preprocess(self.preaugment(pil)) for _ in range(self.views - 1)]
        return torch.stack(out)

    def reset(self) -> None:
        with torch.no_grad():
            self.ctx.copy_(self.init_ctx)
        self.optimizer.load_state_dict(self.optim_state)

    def zero_shot(self, raw: torch.Tensor) -> int:
        import torchvision.transforms.functional as TF

        self.reset()
        image = self.preprocess(self.base(TF.to_pil_image(raw))).unsqueeze(0).to(self.device)
        with torch.no_grad():
            return int(self.logits(image).argmax())

    def sample(self, raw: torch.Tensor, seed: int) -> torch.Tensor:
        """Adapt on one raw image, views made here; returns the probabilities (C,) on the original view."""
        return self.adapt(self.make_views(raw, seed))

    def adapt(self, views: torch.Tensor) -> torch.Tensor:
        """Adapt on one sample's views (V, 3, S, S), the original first; probabilities (C,) on the CPU."""
        images = views.to(self.device, non_blocking=True)
        image = images[:1]
        self.reset()
        selected = None
        for _ in range(self.steps):
            with self.autocast():
                output = self.logits(images)
                if selected is None:
                    output, selected = reference_select(output, self.selection)
                else:
                    output = output[selected]
                loss = reference_avg_entropy(output)
            self.optimizer.zero_grad()
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
        with torch.no_grad(), self.autocast():
            return self.logits(image)[0].float().softmax(dim=-1).cpu()


class ViewDataset(torch.utils.data.Dataset):
    """The official ``AugMixAugmenter`` (augmix off) over raw images, run in DataLoader workers."""

    def __init__(self, reference: ReferenceTPT, raws: torch.Tensor, seed: int) -> None:
        self.base, self.preprocess, self.preaugment = reference.base, reference.preprocess, reference.preaugment
        self.views, self.raws, self.seed = reference.views, raws, seed

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        pil = TF.to_pil_image(self.raws[i])
        torch.manual_seed(self.seed + i)
        return torch.stack([self.preprocess(self.base(pil))] + [self.preprocess(self.preaugment(pil)) for _ in range(self.views - 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the tiny test CLIP on the CPU, 8 samples, 20 classes")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers making the reference's views (default 4, the official -j; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick, so that other load on the machine does not swamp the tiny model)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if args.quick:
        device = torch.device("cpu")
    samples = args.samples or (8 if args.quick else 16)
    classes = args.classes or (20 if args.quick else 1000)
    torch.manual_seed(args.seed)
    if args.quick:
        clip = CLIPBackbone(model_config=TINY_CLIP, random_init=True)
        raw_size = (48, 64)
    else:
        clip = CLIPBackbone("ViT-B-16", random_init=True)
        raw_size = (375, 500)
    clip = clip.to(device)
    names = [f"object {i}" for i in range(classes)]
    g = torch.Generator().manual_seed(args.seed)
    raws = torch.randint(0, 256, (samples + 1, 3, *raw_size), dtype=torch.uint8, generator=g)  # the first is a warm-up
    amp = torch.bfloat16 if device.type == "cuda" else None

    ours = OnlineAdapter(clip, [TPT(class_names=names, views=64, seed=args.seed)], class_names=names, steps=1, amp_dtype=amp)
    reference = ReferenceTPT(clip, names, device, fp16=device.type == "cuda")
    workers = args.workers if args.workers is not None else (2 if args.quick else 4)
    loader = torch.utils.data.DataLoader(ViewDataset(reference, raws, args.seed), batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": clip.name,
        "weights": clip.weights,
        "classes": classes,
        "samples": samples,
        "views": 64,
        "steps": 1,
        "threads": torch.get_num_threads(),
        "ours_dtype": "bf16" if amp is not None else "fp32",
        "reference_dtype": "fp16 autocast" if reference.fp16 else "fp32",
        "reference_view_workers": workers,
        "order": "interleaved",
    }
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    probs: dict[str, list[torch.Tensor]] = {"ours": [], "ref": [], "ref_reseeded": []}
    peaks: dict[str, float] = {"ours": 0.0, "ref": 0.0}
    views = iter(loader)

    def run(label: str, i: int, raw: torch.Tensor) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        if label == "ours":
            prediction = ours.predict([raw.to(device)])[0]
            if prediction.error is not None:
                raise RuntimeError(prediction.error)
            p = prediction.probs
            assert p is not None
        else:
            p = reference.adapt(next(views))
        sync(device)
        if device.type == "cuda":
            peaks[label] = max(peaks[label], torch.cuda.max_memory_allocated(device) / 2**20)
        if i == 0:
            return  # warm-up
        times[label].append(time.perf_counter() - start)
        probs[label].append(p)

    for i, raw in enumerate(raws):  # alternate the sides, and which goes first
        for label in (("ours", "ref") if i % 2 == 0 else ("ref", "ours")):
            run(label, i, raw)
    # control: the reference again with other view seeds (untimed), to size what view randomness alone does
    probs["ref_reseeded"] = [reference.sample(raw, args.seed + 10_000 + i) for i, raw in enumerate(raws[1:], start=1)]
    zero_shot = [reference.zero_shot(raw) for raw in raws[1:]]
    preds = {k: [int(p.argmax()) for p in v] for k, v in probs.items()}
    for label in ("ours", "ref"):
        results[f"{label}_seconds_per_sample"] = statistics.median(times[label])
        results[f"{label}_changed_from_zero_shot"] = sum(p != z for p, z in zip(preds[label], zero_shot)) / samples
        results[f"{label}_distinct_predictions"] = len(set(preds[label]))
        if device.type == "cuda":
            results[f"{label}_peak_memory_mb"] = peaks[label]
    results["speedup"] = results["ref_seconds_per_sample"] / results["ours_seconds_per_sample"]

    def agreement(a: str, b: str) -> tuple[float, float]:
        same = sum(x == y for x, y in zip(preds[a], preds[b])) / samples
        tv = statistics.mean(0.5 * float((x - y).abs().sum()) for x, y in zip(probs[a], probs[b]))
        return same, tv

    results["top1_agreement"], results["mean_tv_distance"] = agreement("ours", "ref")
    results["ref_reseeded_top1_agreement"], results["ref_reseeded_mean_tv_distance"] = agreement("ref", "ref_reseeded")

    print(f"{'':10}{'s/sample':>12}{'changed vs zero-shot':>24}{'distinct classes':>20}")
    for label, title in (("ours", "ours"), ("ref", "reference")):
        print(f"{title:10}{results[f'{label}_seconds_per_sample']:12.4f}{results[f'{label}_changed_from_zero_shot']:24.2f}{results[f'{label}_distinct_predictions']:20d}")
    print(f"speed-up {results['speedup']:.2f}x over {samples} samples")
    print(f"identical top-1, ours vs reference: {results['top1_agreement']:.2f} (mean TV distance {results['mean_tv_distance']:.4f})")
    print(f"identical top-1, reference vs reference with other view seeds: {results['ref_reseeded_top1_agreement']:.2f} (mean TV distance {results['ref_reseeded_mean_tv_distance']:.4f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
