"""Image decoding and reading faults: 16-bit images, truncated files, damaged caches and archives."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from driftprompt.engine import StreamError
from driftprompt.streams import iterate
from driftprompt.streams.base import UnreadableImageError
from driftprompt.streams.builtin import image_folder, image_tar
from driftprompt.streams.folders import ImageFileDataset, decode, read_folder


def _png16(path: Path, value: int, mode: str = "I;16") -> Path:
    arr = np.full((6, 6), value, dtype=np.uint16)
    if mode == "I;16B":
        Image.frombytes("I;16B", (6, 6), arr.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path, mode):
    path = _png16(tmp_path / "x.png", 0x4000, mode)  # a quarter of the 16-bit range
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    pixels = decode(path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 6, 6)
    assert pixels.unique().tolist() == [0x40]  # 16384 >> 8, the same grey on each channel


def test_32_bit_integer_images_use_the_bit_depth_of_their_values(tmp_path):
    from driftprompt.streams.folders import to_rgb

    sixteen = Image.fromarray(np.full((2, 2), 0x8000, dtype=np.int32), mode="I")
    eight = Image.fromarray(np.full((2, 2), 200, dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(sixteen)).max() == 0x80
    assert np.asarray(to_rgb(eight)).max() == 200


def test_16_bit_folder_decodes_in_a_stream(tmp_path):
    for split in ("train", "test"):
        for c, value in (("dark", 0x1000), ("light", 0xC000)):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            _png16(tmp_path / "d" / split / c / "0.png", value)
    parts, names = read_folder(tmp_path / "d")
    means = parts["train"].images.float().mean(dim=(1, 2, 3)).tolist()
    assert names == ["dark", "light"] and means == [16.0, 192.0]


def _folder(root: Path, good: int = 3, truncated: int = 1) -> Path:
    for split in ("train", "test"):
        for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(good):
                Image.new("RGB", (8, 8), colour).save(d / f"{k}.png")
    # a PNG whose header is fine but whose data stops short: only a full decode finds out
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    for k in range(truncated):
        (root / "train" / "a" / f"trunc{k}.png").write_bytes(buf.getvalue()[:300])
    return root


def test_a_lazily_decoded_truncated_image_is_skipped_and_counted(tmp_path, caplog):
    root = _folder(tmp_path / "f")
    ds = ImageFileDataset(sorted((root / "train").rglob("*.png")), [0] * 7, image_size=8)
    assert len(ds) == 7 and ds.skipped == 0  # the header check lets it through
    with pytest.raises(UnreadableImageError, match="trunc0.png"):
        ds[[f.name for f in ds.files].index("trunc0.png")]
    for _ in range(2):  # two epochs: counted once
        seen = sum(images.shape[0] for images, _, _ in iterate(ds, 3))
        assert seen == 6
    assert ds.skipped == 1
    assert "Skipped 1 unreadable image" in caplog.text


def test_a_lazy_stream_trains_over_a_truncated_image(tmp_path):
    root = _folder(tmp_path / "f")
    stream = image_folder(str(root), image_size=8, in_memory=False, n_experiences=1)
    seen = sum(images.shape[0] for images, _, _ in iterate(stream[0].train, 4))
    assert seen == 6


def test_all_images_unreadable_is_one_sentence(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "bad" / split / "a").mkdir(parents=True)
        (tmp_path / "bad" / split / "a" / "0.png").write_bytes(b"")
        (tmp_path / "bad" / split / "a" / "1.jpg").write_bytes(b"garbage")
    with pytest.raises(StreamError, match="All 2 image"):
        image_folder(str(tmp_path / "bad"), image_size=8, n_experiences=1)


@pytest.mark.parametrize("damage", ["truncate", "foreign", "text"])
def test_a_damaged_cache_file_is_named_with_the_fix(tmp_path, damage):
    root = _folder(tmp_path / "f", truncated=0)
    cache = tmp_path / "cache"
    read_folder(root, cache_dir=cache)
    (file,) = cache.glob("*.pt")
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:200])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, file)
    else:
        file.write_text("hello")
    from driftprompt.streams import folders

    folders._MEMORY.clear()
    with pytest.raises(StreamError) as info:
        read_folder(root, cache_dir=cache)
    msg = str(info.value)
    assert str(file) in msg and "delete it" in msg and "\n" not in msg


def test_a_file_that_is_not_a_tar_is_one_line(tmp_path):
    bogus = tmp_path / "data.tar.gz"
    bogus.write_text("not an archive\n")
    with pytest.raises(StreamError) as info:
        image_tar(str(bogus))
    msg = str(info.value)
    assert "not a readable tar archive" in msg and "\n" not in msg


def test_a_cache_folder_that_cannot_be_written_only_warns(tmp_path, caplog):
    root = _folder(tmp_path / "f", truncated=0)
    (tmp_path / "in_the_way").write_text("a file where the cache folder should be")
    parts, names = read_folder(root, cache_dir=tmp_path / "in_the_way" / "cache")
    assert names == ["a", "b"] and len(parts["train"]) == 6
    assert "Could not write the stream cache" in caplog.text


@pytest.mark.parametrize("size", [0, -5, 2.5])
def test_an_impossible_image_size_is_refused_before_decoding(tmp_path, size):
    root = _folder(tmp_path / "f", truncated=0)
    with pytest.raises(StreamError, match="image_size must be"):
        read_folder(root, image_size=size)


def test_folder_and_archive_paths_of_the_wrong_kind_are_named(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StreamError, match="is a file, not an image folder"):
        image_folder(str(tmp_path / "file.txt"), n_experiences=1)
    (tmp_path / "folder.tar").mkdir()
    with pytest.raises(StreamError, match="is a folder, not a tar archive"):
        image_tar(str(tmp_path / "folder.tar"), n_experiences=1)


def test_a_run_over_truncated_images_says_how_many_it_left_out(tmp_path, make_config):
    from driftprompt.engine.run import build

    root = _folder(tmp_path / "f")
    config = make_config(stream={"name": "image_folder", "options": {"path": str(root), "image_size": 16, "in_memory": False, "n_experiences": 1}})
    with build(config, run_dir=None) as run:
        summary = run.fit()
    assert summary["skipped_unreadable_images"] >= 1  # a result on fewer images is never silent
