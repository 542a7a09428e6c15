"""Every paper config runs end to end through the CLI on tiny stand-in data, and records its recipe.

The data are small files in the formats the real readers take: a CIFAR-100 folder in
torchvision's pickle layout (with its checksum test switched off, as the files are fakes) and
an ImageNet-R style image folder, cut into 2 experiences. The backbone is a randomly
initialised ViT of width 32, so each run takes seconds; what is checked is that each config's recorded
``config.yaml`` says what its recipe card in docs/results.md says.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from driftprompt.engine.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "backbone.kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 5, num_heads: 2}"

# config -> (weights, normalize, eval classes, eval resize, eval interpolation, augment scale, hflip, class_order)
RECIPES = {
    "l2p_cifar100": ("vit_base_patch16_224.orig_in21k", "none", "all", 256, "bicubic", [0.05, 1.0], 0.5, "natural"),
    "dualprompt_cifar100": ("vit_base_patch16_224.orig_in21k", "none", "all", 256, "bicubic", [0.05, 1.0], 0.5, "natural"),
    "pgp_l2p_cifar100": ("vit_base_patch16_224.orig_in21k", "none", "all", 256, "bicubic", [0.05, 1.0], 0.5, "natural"),
    "coda_prompt_cifar100": ("vit_base_patch16_224.augreg_in21k_ft_in1k", "none", "seen", None, "bilinear", [0.08, 1.0], 0.5, "natural"),
    "nsp_vpt_cifar100": ("vit_base_patch16_224.augreg_in21k", "model", "seen", None, "bicubic", [0.08, 1.0], 0.0, None),
    "dualprompt_imagenet_r": ("vit_base_patch16_224.orig_in21k", "none", "all", 256, "bicubic", [0.05, 1.0], 0.5, "natural"),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100-class CIFAR-100 in torchvision's layout (1 train, 1 test image a class) and a 10-class image folder."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir()
    for split, per_class in (("train", 1), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:02d}" for c in range(100)], "coarse_label_names": [f"super{c}" for c in range(20)]}, f)
    for split, per_class in (("train", 2), ("test", 1)):
        for c in range(10):
            d = root / "imagenet-r" / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(d / f"{k}.png")
    return root


@pytest.fixture
def fake_cifar_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the archive's md5 sums, which fake files cannot match."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_config_runs_and_records_its_recipe(name, data_root, fake_cifar_checksums, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "device=cpu", "backbone.weights=random", TINY, "train.epochs=1", "log.tensorboard=false", "log.progress=false",
        f"stream.options.root={data_root}", "stream.options.per_class=1", "stream.options.test_per_class=1", "stream.options.n_experiences=2",
    ]  # fmt: skip
    if name != "dualprompt_imagenet_r":
        overrides += ["stream.options.download=false"]
    if name == "coda_prompt_cifar100":  # orthogonal keys: at most one per channel of the width-32 model
        overrides += ["strategies.1.pool_size=10"]
    if name == "pgp_l2p_cifar100":  # sample-space bases need as many images per experience as the model is wide
        overrides += ["strategies.2.space=channel"]
    if name == "dualprompt_imagenet_r":
        overrides += ["stream.options.image_size=16", "stream.options.cache_dir=null"]
    assert main([str(REPO / "configs" / f"{name}.yaml"), *overrides, "--run-dir", str(run_dir), "--quiet"]) == 0

    weights, normalize, classes, resize, interpolation, scale, hflip, order = RECIPES[name]
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["backbone"]["name"] == weights
    assert recorded["backbone"]["normalize"] == normalize
    assert recorded["eval"]["classes"] == classes
    assert recorded["eval"]["resize"] == resize
    assert recorded["eval"]["interpolation"] == interpolation
    assert recorded["stream"]["options"].get("class_order") == order
    augment = next(s for s in recorded["strategies"] if s["name"] == "augment")["options"]
    assert augment["scale"] == scale and augment["hflip"] == hflip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["accuracy"]) == 2


def test_natural_order_and_all_classes_reach_the_run(data_root, fake_cifar_checksums, tmp_path):
    """The L2P config's stream arrives in label order, and eval.classes: all lets predictions fall on untrained classes."""
    from driftprompt.engine.config import load_config
    from driftprompt.engine.plugins import discover
    from driftprompt.engine.run import build_stream

    config = load_config(REPO / "configs" / "l2p_cifar100.yaml", [f"stream.options.root={data_root}", "stream.options.download=false"])
    stream = build_stream(config, discover())
    assert [list(exp.classes) for exp in stream] == [list(range(10 * i, 10 * i + 10)) for i in range(10)]
    nsp = load_config(REPO / "configs" / "nsp_vpt_cifar100.yaml", [f"stream.options.root={data_root}", "stream.options.download=false"])
    # the NSP code's order: numpy.random.Generator(PCG64(2024)).shuffle over the sorted classes,
    # cut into 10 tasks (VPTinNSforCL utils/continual_manager.py:10-16)
    expected = np.arange(100)
    np.random.Generator(np.random.PCG64(2024)).shuffle(expected)
    assert [sorted(exp.classes) for exp in build_stream(nsp, discover())] == [sorted(expected[10 * i : 10 * i + 10].tolist()) for i in range(10)]
