"""CIFAR-10 class-incremental run end to end through the launcher, from the JPEG archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO


def test_cifar10_class_incremental_through_launch(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "launch.py", "configs/cifar10_class_incremental.yaml",
        "device=cpu", "stream.options.per_class=4", "stream.options.cache_dir=null",
        "backbone.name=vit_small_patch16_224", "backbone.weights=random",
        "backbone.kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "log.tensorboard=false", "log.progress=false", "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = {**os.environ, "DRIFTPROMPT_DATA": str(cifar_dir)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategies"] == ["ncm"] and len(summary["accuracy"]) == 5
    assert all(len(row) == 5 for row in summary["accuracy"])


def test_missing_archive_is_one_clear_sentence(tmp_path):
    cmd = [sys.executable, "launch.py", "configs/cifar10_class_incremental.yaml", "device=cpu", f"stream.options.root={tmp_path}", "backbone.weights=random", "--run-dir", str(tmp_path / "r")]
    env = {k: v for k, v in os.environ.items() if k != "DRIFTPROMPT_DATA"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cifar10-jpeg.tar.gz' was not found" in done.stderr and "stream.options.root" in done.stderr
