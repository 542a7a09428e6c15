"""ImageNet variants: class lists, masks and folder layouts (tiny fake folders)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from driftprompt.engine import StreamError
from driftprompt.streams.builtin import imagenet_test_time
from driftprompt.streams.imagenet import class_names, imagenet_classes, imagenet_variant, label_mask, subset_indices


def test_class_lists_are_complete_and_consistent():
    info = imagenet_classes()
    assert len(info["wnids"]) == 1000 == len(set(info["wnids"])) and info["wnids"] == sorted(info["wnids"])
    assert len(info["clip_names"]) == 1000 and info["clip_names"][0] == "tench"
    assert len(info["imagenet_a"]) == 200 and len(info["imagenet_r"]) == 200
    assert int(label_mask("imagenet_a").sum()) == 200 and int(label_mask("imagenet_v2").sum()) == 1000
    assert class_names("imagenet_r", "subset")[0] == info["clip_names"][subset_indices("imagenet_r")[0]]


def test_class_lists_match_timm_when_available():
    timm_info = pytest.importorskip("timm.data").ImageNetInfo
    ours = imagenet_classes()
    assert ours["wnids"] == list(timm_info().label_names())


def _folder(root, names, per=1):
    for n in names:
        (root / n).mkdir(parents=True)
        for k in range(per):
            Image.new("RGB", (20, 16), (int(n) % 256 if n.isdigit() else 7, 0, 0)).save(root / n / f"{k}.jpg")


def test_imagenet_v2_folders_are_numeric_not_lexicographic(tmp_path):
    _folder(tmp_path / "v2", ["0", "2", "10", "100"])
    ds = imagenet_variant("imagenet_v2", tmp_path / "v2", image_size=8)
    by_folder = {f.parent.name: int(t) for f, t in zip(ds.files, ds.targets)}
    assert by_folder == {"0": 0, "2": 2, "10": 10, "100": 100}
    assert ds[0][0].shape == (3, 8, 8)


def test_imagenet_a_labels_mask_and_stream(tmp_path):
    wnids = imagenet_classes()["imagenet_a"][:3]
    _folder(tmp_path / "imagenet-a", wnids, per=2)
    ds = imagenet_variant("imagenet_a", tmp_path / "imagenet-a", image_size=8, label_space="subset")
    assert sorted(set(ds.targets.tolist())) == [0, 1, 2]
    stream = imagenet_test_time("imagenet_a", path=str(tmp_path / "imagenet-a"), image_size=8, batch_size=4)
    assert stream.num_classes == 1000 and stream.label_mask is not None and int(stream.label_mask.sum()) == 200
    images, targets, extras = next(stream.batches())
    assert images.shape == (4, 3, 8, 8) and all(bool(stream.label_mask[t]) for t in targets)
    assert extras["domain"] == ["imagenet_a"] * 4


def test_wrong_folders_are_refused(tmp_path):
    _folder(tmp_path / "r", ["n99999999"])
    with pytest.raises(StreamError, match="not an ImageNet WordNet id"):
        imagenet_variant("imagenet_r", tmp_path / "r")
    with pytest.raises(StreamError, match="Unknown ImageNet variant"):
        imagenet_variant("imagenet_z", tmp_path / "r")
    torch.manual_seed(0)


def test_test_time_batches_carry_the_raw_images_and_clip_style_squares(tmp_path):
    import numpy as np
    import torchvision.transforms as T

    root = tmp_path / "v2"
    rng = np.random.default_rng(0)
    sizes = {"0": (40, 24), "1": (18, 30)}  # (width, height): different sizes in one batch
    for n, size in sizes.items():
        (root / n).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / n / "0.png")
    stream = imagenet_test_time("imagenet_v2", path=str(root), image_size=16, batch_size=2, shuffle=False)
    images, _, extras = next(stream.batches())
    assert images.shape == (2, 3, 16, 16)
    assert [tuple(r.shape) for r in extras["raw"]] == [(3, 24, 40), (3, 30, 18)]
    for img, n in zip(images, sizes):
        pil = Image.open(root / n / "0.png").convert("RGB")
        want = np.asarray(T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16)])(pil))
        assert torch.equal(img, torch.from_numpy(want.copy()).permute(2, 0, 1))
    plain = imagenet_variant("imagenet_v2", root, image_size=16, keep_raw=False)
    assert not hasattr(plain, "decode_with_raw")


def test_a_truncated_test_image_is_skipped_and_a_16_bit_one_is_not_white(tmp_path):
    import numpy as np

    root = tmp_path / "v2"
    for n in ("0", "1", "2"):
        (root / n).mkdir(parents=True)
    Image.new("RGB", (20, 16), (9, 0, 0)).save(root / "0" / "0.png")
    grey16 = (np.full((16, 20), 128 * 256, dtype=np.uint16))  # mid-grey at 16 bits
    Image.fromarray(grey16).save(root / "1" / "0.png")
    Image.new("RGB", (200, 160), (5, 5, 5)).save(root / "2" / "0.png")
    data = (root / "2" / "0.png").read_bytes()
    (root / "2" / "0.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    stream = imagenet_test_time("imagenet_v2", path=str(root), image_size=8, batch_size=3, shuffle=False)
    batches = list(stream.batches())
    assert len(batches) == 1
    images, targets, extras = batches[0]
    assert targets.tolist() == [0, 1] and len(extras["raw"]) == 2
    assert int(images[1].float().mean()) == 128  # scaled to 8 bits, not clipped to 255
    assert stream.skipped == 1
