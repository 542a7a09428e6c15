"""Loader throughput against what a small model consumes.

Measures, on one device:

* ``loader_img_per_s``: CIFAR-10 images per second out of the in-memory stream (the JPEG
  archive decoded once, then tensor-sliced batches moved to the device), and, when the archive
  is available, the one-off decode rate ``decode_img_per_s``;
* ``corrupt_img_per_s``: images per second through a test-time corruption stream (severity 5,
  all 15 corruptions in turn);
* ``model_img_per_s``: images per second a small ViT (ViT-S/16 at 224, random weights)
  consumes in inference;
* ``ratio``: loader over model; above 1 the loader is not the bottleneck.

Usage: ``python benchmarks/stream_throughput.py --device cuda`` (``--quick`` finishes in
under a minute on a CPU). The archive is found through ``--data`` or ``DRIFTPROMPT_DATA``;
without it synthetic images stand in. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _loader_rate(dataset, device: torch.device, batch_size: int, seconds: float) -> float:
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for images, _, _ in dataset.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(n)):
            images = images.to(device, non_blocking=True)
            n += images.shape[0]
            if time.perf_counter() - started >= seconds:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def _model_rate(device: torch.device, batch_size: int, seconds: float) -> float:
    from driftprompt.engine.backbones import ViTBackbone

    model = ViTBackbone("vit_small_patch16_224", "random").to(device)
    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    n, started = 0, None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for step in range(10_000):
            if step == 1:  # first batch is warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started, n = time.perf_counter(), 0
            model(model.preprocess(x))
            n += batch_size
            if started is not None and time.perf_counter() - started >= seconds:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="short measurements, a subset of the archive")
    parser.add_argument("--data", default=os.environ.get("DRIFTPROMPT_DATA"), help="folder holding cifar10-jpeg.tar.gz")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    seconds = 2.0 if args.quick else 10.0
    from driftprompt.streams.builtin import corruption_test_time
    from driftprompt.streams.folders import read_tar
    from driftprompt.streams.synthetic import synthetic_split

    figures: dict[str, object] = {"device": str(device), "quick": args.quick}
    archive = Path(args.data) / "cifar10-jpeg.tar.gz" if args.data else None
    if archive is not None and archive.is_file():
        per_class = 300 if args.quick else None
        started = time.perf_counter()
        parts, _ = read_tar(archive, ("train",), per_class=per_class)
        train = parts["train"]
        figures["decode_img_per_s"] = round(len(train) / (time.perf_counter() - started), 1)
        figures["source"] = "cifar10-jpeg.tar.gz" + (f" ({per_class}/class)" if per_class else "")
    else:
        train, _ = synthetic_split(10, 500, 1, 32, 0)
        figures["source"] = "synthetic (archive not found)"
    figures["loader_img_per_s"] = round(_loader_rate(train, device, args.batch_size, seconds), 1)
    stream = corruption_test_time(source="synthetic", per_class=20 if args.quick else 100, batch_size=args.batch_size, seed=0)
    started = time.perf_counter()
    n = sum(images.to(device).shape[0] for images, _, _ in stream.batches())
    figures["corrupt_img_per_s"] = round(n / (time.perf_counter() - started), 1)
    figures["model_img_per_s"] = round(_model_rate(device, 64 if args.quick else args.batch_size, seconds), 1)
    figures["ratio"] = round(figures["loader_img_per_s"] / figures["model_img_per_s"], 2)  # type: ignore[operator]
    figures["corrupt_ratio"] = round(figures["corrupt_img_per_s"] / figures["model_img_per_s"], 2)  # type: ignore[operator]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
