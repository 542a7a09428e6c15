"""Sources: the CIFAR-10 archive read in place, folders, arrays, torchvision, bad input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from driftprompt.engine import StreamError
from driftprompt.streams import from_arrays, iterate, resolve_path, torchvision_dataset
from driftprompt.streams.builtin import image_folder, image_tar
from driftprompt.streams.folders import read_tar


def _jpeg(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_archive_is_read_in_place_with_a_per_class_limit(cifar_dir):
    parts, names = read_tar(cifar_dir / "cifar10-jpeg.tar.gz", per_class=3)
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in ("train", "test"):
        ds = parts[split]
        assert ds.images.shape == (30, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert torch.bincount(ds.targets).tolist() == [3] * 10 and ds.skipped == 0
    assert float(parts["train"].images.float().std()) > 20  # real pictures, not blanks


def test_archive_builder_resolves_the_path_through_the_environment(cifar_dir, monkeypatch):
    monkeypatch.setenv("DRIFTPROMPT_DATA", str(cifar_dir))
    stream = image_tar("cifar10-jpeg.tar.gz", per_class=3, n_experiences=5, seed=None)
    assert [e.classes for e in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert stream.class_names[0] == "airplane" and len(stream[0].train) == 6


def test_corrupt_archive_members_are_skipped_and_counted(tmp_path, caplog):
    members = {
        "data/train/a/0.jpg": _jpeg((255, 0, 0)),
        "data/train/a/1.jpg": b"not a jpeg at all",
        "data/train/b/0.jpg": _jpeg((0, 0, 255)),
        "data/test/a/0.jpg": _jpeg((250, 0, 0)),
        "data/test/b/0.jpg": _jpeg((0, 0, 250)),
        "data/README.txt": b"ignored",
    }
    path = _archive(tmp_path / "tiny.tar.gz", members)
    parts, names = read_tar(path)
    assert names == ["a", "b"]
    assert len(parts["train"]) == 2 and parts["train"].skipped == 1
    assert "Skipped 1 unreadable image" in caplog.text
    assert parts["train"].targets.tolist() == [0, 1]
    assert int(parts["train"].images[0, 0].float().mean()) > 200  # red stays red


def test_archive_cache_file_is_reused(tmp_path):
    path = _archive(tmp_path / "c.tar", {"train/x/0.png": _jpeg((9, 9, 9)), "test/x/0.png": _jpeg((9, 9, 9))})
    read_tar(path, cache_dir=tmp_path / "cache", per_class=7)
    assert len(list((tmp_path / "cache").glob("c-*.pt"))) == 1


def test_image_folder_with_class_name_file(tmp_path):
    for split in ("train", "test"):
        for cls, colour in (("n1", (10, 200, 10)), ("n2", (200, 10, 10)), ("n3", (10, 10, 200))):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (12, 10), colour).save(tmp_path / "set" / split / cls / f"{k}.png")
    (tmp_path / "names.txt").write_text("leaf\nfire\nsea\n")
    stream = image_folder("set", root=str(tmp_path), image_size=8, class_names_file="names.txt", n_experiences=3, seed=None)
    assert stream.class_names == ["leaf", "fire", "sea"]
    assert stream[0].train.images.shape == (2, 3, 8, 8)


def test_arrays_numpy_and_grey():
    ds = from_arrays(np.zeros((5, 6, 6, 3), dtype=np.uint8), [0, 1, 0, 1, 2])
    assert ds.images.shape == (5, 3, 6, 6)
    grey = from_arrays(torch.rand(4, 6, 6), [0, 0, 1, 1])
    assert grey.images.dtype == torch.uint8 and grey.images.shape == (4, 3, 6, 6)
    with pytest.raises(StreamError, match="Float images must lie in"):
        from_arrays(np.full((2, 4, 4, 3), 200.0), [0, 1])


def test_missing_data_errors_name_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv("DRIFTPROMPT_DATA", raising=False)
    with pytest.raises(StreamError, match="stream.options.download: true"):
        torchvision_dataset("cifar10", tmp_path)
    with pytest.raises(StreamError, match="set stream.options.path"):
        resolve_path("nowhere.tar.gz")
    with pytest.raises(StreamError, match="Unknown torchvision dataset 'imagenet9'"):
        torchvision_dataset("imagenet9", tmp_path)
    with pytest.raises(StreamError, match="has no class subfolders"):
        image_folder(str(tmp_path))
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(StreamError, match="not a readable tar archive"):
        read_tar(bad)


@pytest.mark.parametrize("in_memory", [True, False])
def test_flat_folder_is_split_per_class_in_memory_or_lazily(tmp_path, in_memory):
    for cls in ("c0", "c1", "c2", "c3"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (9, 9), (k * 40, 0, 0)).save(tmp_path / "flat" / cls / f"{k}.png")
    stream = image_folder(str(tmp_path / "flat"), image_size=8, in_memory=in_memory, n_experiences=2, seed=None)
    assert [e.classes for e in stream] == [[0, 1], [2, 3]]
    train_ids = {int(i) for e in stream for _, _, x in iterate(e.train, 4) for i in x["index"]}
    assert len(train_ids) == 16 and sum(len(e.test) for e in stream) == 4  # round(0.2 * 5) = 1 per class
    images, _, _ = next(iterate(stream[0].test, 4))
    assert images.shape[1:] == (3, 8, 8)


def test_16_bit_arrays_are_shifted_to_8_bits_not_refused_or_clipped():
    images = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (0x1000, 0xFF00)])
    ds = from_arrays(images, [0, 1])
    assert ds.images.dtype == torch.uint8 and ds.images[:, 0, 0, 0].tolist() == [0x10, 0xFF]
    assert from_arrays(np.full((1, 4, 4), 200, dtype=np.int32), [0]).images.unique().tolist() == [200]
    with pytest.raises(StreamError, match="negative"):
        from_arrays(np.full((1, 4, 4), -1, dtype=np.int16), [0])


def test_synthetic_options_out_of_range_are_one_sentence():
    from driftprompt.streams.synthetic import synthetic_split

    with pytest.raises(StreamError, match="num_classes must be at least 1"):
        synthetic_split(num_classes=-1)
    with pytest.raises(StreamError, match="difficulty must lie in"):
        synthetic_split(num_classes=2, difficulty=3.0)


def test_a_stream_without_any_test_image_is_refused_when_built():
    from driftprompt.streams import Experience, Stream, TensorImageDataset

    empty = TensorImageDataset(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    train = TensorImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(StreamError, match="no accuracy can be measured"):
        Stream([Experience(0, train, empty, [0, 1])], num_classes=2)
    assert len(Stream([Experience(0, train, train, [0, 1]), Experience(1, train, empty, [0, 1])], num_classes=2)) == 2


def test_dark_16_bit_data_gives_the_same_pixels_as_an_array_and_as_a_file(tmp_path):
    from PIL import Image

    from driftprompt.streams.folders import decode

    grey = np.full((4, 4), 300, dtype=np.uint16)  # 16-bit data that uses only 9 bits
    Image.fromarray(grey).save(tmp_path / "dark.png")
    from_file = decode(tmp_path / "dark.png")
    from_array = from_arrays(grey[None], [0]).images[0]
    assert from_file[0, 0, 0].item() == from_array[0, 0, 0].item() == 300 >> 8
