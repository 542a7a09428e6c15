"""Image folders and tar archives of image folders, decoded once and cached.

Layout (ImageFolder style, the same inside an archive, optionally under one top folder)::

    <split>/<class>/<file>.jpg      e.g. train/cat/0001.jpg, test/cat/0001.jpg

Class ids are the class folder names in sorted order over every split, so train and test
agree. Unreadable images are skipped, counted on the dataset's ``skipped`` attribute and
reported in one warning; they are never replaced by something else.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from driftprompt.engine.errors import StreamError, load_error_cause

from .base import TensorImageDataset, UnreadableImageError, container_bits

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")

_MEMORY: dict[str, dict[str, Any]] = {}


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of any Pillow image, with high-bit-depth grey images scaled to 8 bits.

    Pillow's ``convert("RGB")`` clips 16-bit grey images (modes ``I;16``, ``I;16B``, ``I;16L``,
    and ``I`` as 16-bit PNG and TIFF files open) at 255, which turns nearly every pixel
    white. Their values are shifted down to 8 bits instead: by 8 bits for a 16-bit mode, and
    for the 32-bit ``I`` mode by the bit depth its values actually use (8, 16 or 32 bits, as
    a 16-bit file read into it keeps values below 65536). Float (``F``) images are taken to
    lie in [0, 1] when their maximum is at most 1, else in [0, 255]. Palette, grey, RGBA and
    CMYK images convert as Pillow converts them.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode == "I":
            bits = container_bits(int(arr.max()) if arr.size else 0)
        else:
            bits = 16
        grey = (np.clip(arr, 0, None) >> (bits - 8)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def decode(data: bytes | Path, image_size: int | None = None) -> torch.Tensor:
    """Decode an image file (bytes or path) to a uint8 (3, H, W) RGB tensor with Pillow.

    16-bit images are scaled to 8 bits (see :func:`to_rgb`). With ``image_size``, the shorter
    side is resized to it (bilinear, antialiased) and the centre square is cut, so every
    image of a dataset has the same shape.
    """
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img = to_rgb(img)
        if image_size is not None and img.size != (image_size, image_size):
            w, h = img.size
            scale = image_size / min(w, h)
            nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class _Collected:
    """Decoded images of one split while reading a folder or an archive."""

    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)


def _split_and_class(parts: Sequence[str], splits: Sequence[str]) -> tuple[str, str] | None:
    """(split, class) of a member path like ``[top/]train/cat/0001.jpg``."""
    for i in range(len(parts) - 2):
        if parts[i] in splits:
            return parts[i], parts[i + 1]
    return None


def _stack(c: _Collected, classes: list[str], source: str, split: str) -> TensorImageDataset:
    if c.skipped and not c.images:
        raise StreamError(f"All {len(c.skipped)} image(s) of split '{split}' in '{source}' are unreadable or empty (first: {c.skipped[0]}); replace them with valid image files.")
    if c.skipped:
        log.warning("Skipped %d unreadable image(s) of split '%s' in '%s' (first: %s); remove or replace them to silence this.", len(c.skipped), split, source, c.skipped[0])
    if not c.images:
        return _empty(c)
    shapes = {tuple(t.shape) for t in c.images}
    if len(shapes) > 1:
        raise StreamError(f"Images in '{source}' have different sizes ({sorted(shapes)[:3]}...); set stream.options.image_size to resize them to one size.")
    index = {name: i for i, name in enumerate(classes)}
    ds = TensorImageDataset(torch.stack(c.images), torch.tensor([index[n] for n in c.labels], dtype=torch.long))
    ds.skipped = len(c.skipped)
    return ds


def _empty(c: _Collected) -> TensorImageDataset:
    ds = TensorImageDataset(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    ds.skipped = len(c.skipped)
    return ds


def check_image_size(image_size: int | None) -> None:
    """Refuse an ``image_size`` no image can be resized to (before any file is decoded)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise StreamError(f"image_size must be a whole number of pixels of at least 1, got {image_size!r}; e.g. 224, or leave it unset to keep the images' own size.")


def _cache_key(path: Path, **options: Any) -> str:
    st = path.stat()
    raw = json.dumps({"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, **options}, sort_keys=True)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _cached(path: Path, cache_dir: str | os.PathLike[str] | None, options: dict[str, Any], read: Any) -> dict[str, Any]:
    """Return ``read()``'s result, memoised in memory and (with ``cache_dir``) on disk."""
    key = _cache_key(path, **options)
    if key in _MEMORY:
        return _MEMORY[key]
    file = Path(os.path.expanduser(str(cache_dir))) / f"{path.name.split('.')[0]}-{key}.pt" if cache_dir is not None else None
    if file is not None and file.is_file():
        result = _load_cache(file, options)
    else:
        result = read()
        if file is not None:
            tmp = file.with_suffix(".tmp")
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(result, tmp)
                os.replace(tmp, file)
            except OSError as exc:  # the cache saves time next run; this run has its images already
                log.warning("Could not write the stream cache '%s' (%s); the images are decoded again next time; set stream.options.cache_dir to a writable folder.", file, exc.strerror or exc)
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
    _MEMORY[key] = result
    return result


def _load_cache(file: Path, options: dict[str, Any]) -> dict[str, Any]:
    """A decoded-stream cache file, checked: a truncated or foreign file is named, never half-used."""
    try:
        result = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, pickles and foreign files fail in many ways
        raise StreamError(f"Stream cache file '{file}' cannot be read ({load_error_cause(exc)}); delete it and it is rebuilt from the images.") from exc
    splits = [s or "" for s in options.get("splits", [])]
    ok = isinstance(result, dict) and isinstance(result.get("classes"), list)
    for split in splits if ok else []:
        part = result.get(split)
        ok = ok and isinstance(part, dict) and torch.is_tensor(part.get("images")) and torch.is_tensor(part.get("targets")) and part["images"].dim() == 4 and part["images"].shape[0] == part["targets"].shape[0]
    if not ok:
        raise StreamError(f"Stream cache file '{file}' does not hold a decoded image stream (written by another program or version); delete it and it is rebuilt from the images.")
    return result


def _pack(collected: dict[str, _Collected], classes: list[str], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {"classes": classes}
    for split, c in collected.items():
        ds = _stack(c, classes, source, split)
        out[split] = {"images": ds.images, "targets": ds.targets, "skipped": ds.skipped}
    return out


def _unpack(packed: dict[str, Any], split: str) -> TensorImageDataset:
    part = packed[split]
    ds = TensorImageDataset(part["images"], part["targets"])
    ds.skipped = int(part["skipped"])
    return ds


def read_tar(
    path: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "test"),
    per_class: int | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, TensorImageDataset], list[str]]:
    """Decode the image folders inside a tar archive (any compression) without extracting it.

    One sequential pass over the archive reads every requested split; with ``per_class`` only
    the first ``per_class`` images of each class and split (in archive order) are decoded.

    Returns:
        ``{split: dataset}`` and the class names (class id = position).
    """
    path = Path(path)
    check_image_size(image_size)
    if path.is_dir():
        raise StreamError(f"'{path}' is a folder, not a tar archive; use the image_folder stream for it, or give the archive's path.")
    if not path.is_file():
        raise StreamError(f"Archive '{path}' does not exist; fix stream.options.path or the data root.")
    options = {"splits": list(splits), "per_class": per_class, "image_size": image_size, "kind": "tar"}

    def read() -> dict[str, Any]:
        collected = {s: _Collected() for s in splits}
        names: set[str] = set()
        try:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    found = _split_and_class(Path(member.name).parts, splits)
                    if found is None:
                        continue
                    split, cls = found
                    names.add(cls)
                    c = collected[split]
                    if per_class is not None and c.per_class.get(cls, 0) >= per_class:
                        continue
                    handle = tf.extractfile(member)
                    try:
                        c.images.append(decode(handle.read() if handle else b"", image_size))
                    except _DECODE_ERRORS:
                        c.skipped.append(member.name)
                        continue
                    c.labels.append(cls)
                    c.per_class[cls] = c.per_class.get(cls, 0) + 1
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise StreamError(f"'{path}' is not a readable tar archive ({load_error_cause(exc)}); re-download or re-create it.") from exc
        if not names:
            raise StreamError(f"Archive '{path}' holds no images under {'/'.join(splits)}/<class>/; use the layout <split>/<class>/<image> inside it.")
        return _pack(collected, sorted(names), str(path))

    packed = _cached(path, cache_dir, options, read)
    return {s: _unpack(packed, s) for s in splits}, list(packed["classes"])


def _folder_files(root: Path, split: str | None) -> list[tuple[Path, str]]:
    base = root / split if split else root
    items = []
    for cls_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, cls_dir.name))
    return items


def files_of(root: Path, split: str | None) -> list[tuple[Path, str]]:
    """Image files and their class folder names under ``root[/split]/<class>/``."""
    base = root / split if split else root
    if base.is_file():
        raise StreamError(f"'{base}' is a file, not an image folder; give the folder that holds <split>/<class>/<image> or <class>/<image> (image_tar reads archives).")
    if not base.is_dir():
        raise StreamError(f"Image folder '{base}' does not exist; use the layout <split>/<class>/<image> or <class>/<image>.")
    return _folder_files(root, split)


def stratified_split(targets: torch.Tensor, test_fraction: float, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a per-class random split: ``round(test_fraction * n_c)`` of each class go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise StreamError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}; e.g. 0.2.")
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    train, test = [], []
    for c in torch.unique(targets).tolist():
        pos = torch.nonzero(targets == c).flatten()
        pos = pos[torch.randperm(len(pos), generator=gen)]
        k = round(test_fraction * len(pos))
        test.append(pos[:k])
        train.append(pos[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def lazy_splits(
    root: Path, splits: Sequence[str | None], test_fraction: float, image_size: int, per_class: int | None, test_per_class: int | None, seed: int
) -> tuple[ImageFileDataset, ImageFileDataset, list[str]]:
    """Train and test :class:`ImageFileDataset` of a folder (split folders, or a stratified split of a flat one)."""
    classes = folder_classes(root, splits)
    index = {c: i for i, c in enumerate(classes)}

    def build(items: list[tuple[Path, str]], limit: int | None) -> ImageFileDataset:
        counts: dict[str, int] = {}
        kept = []
        for f, c in items:
            if limit is None or counts.get(c, 0) < limit:
                kept.append((f, c))
                counts[c] = counts.get(c, 0) + 1
        return ImageFileDataset([f for f, _ in kept], [index[c] for _, c in kept], image_size)

    test_limit = test_per_class if test_per_class is not None else per_class
    if len(splits) == 2:
        return build(files_of(root, splits[0]), per_class), build(files_of(root, splits[1]), test_limit), classes
    items = files_of(root, None)
    train_pos, test_pos = stratified_split(torch.tensor([index[c] for _, c in items]), test_fraction, seed)
    return build([items[i] for i in train_pos.tolist()], per_class), build([items[i] for i in test_pos.tolist()], test_limit), classes


def folder_splits(root: Path) -> list[str]:
    """The split folders (train, test, val, ...) directly under ``root``; empty when none."""
    return [s for s in SPLIT_NAMES if (root / s).is_dir()]


def folder_classes(root: Path, splits: Sequence[str | None]) -> list[str]:
    names: set[str] = set()
    for split in splits:
        base = root / split if split else root
        names.update(p.name for p in base.iterdir() if p.is_dir())
    return sorted(names)


def read_folder(
    root: str | os.PathLike[str],
    splits: Sequence[str | None] = ("train", "test"),
    per_class: int | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str | None, TensorImageDataset], list[str]]:
    """Decode an image folder into memory (``None`` as a split reads ``root/<class>/`` directly)."""
    root = Path(root)
    check_image_size(image_size)
    if not root.is_dir():
        raise StreamError(f"Image folder '{root}' does not exist; fix stream.options.path or the data root.")
    for split in splits:
        if split and not (root / split).is_dir():
            raise StreamError(f"Image folder '{root}' has no '{split}' subfolder; use the layout {root}/{split}/<class>/<image>.")
    classes = folder_classes(root, splits)
    if not classes:
        raise StreamError(f"Image folder '{root}' has no class subfolders; use the layout <split>/<class>/<image>.")
    options = {"splits": [s or "" for s in splits], "per_class": per_class, "image_size": image_size, "kind": "folder"}

    def read() -> dict[str, Any]:
        collected: dict[str, _Collected] = {}
        for split in splits:
            c = collected.setdefault(split or "", _Collected())
            for f, cls in _folder_files(root, split):
                if per_class is not None and c.per_class.get(cls, 0) >= per_class:
                    continue
                try:
                    c.images.append(decode(f, image_size))
                except _DECODE_ERRORS:
                    c.skipped.append(str(f))
                    continue
                c.labels.append(cls)
                c.per_class[cls] = c.per_class.get(cls, 0) + 1
        return _pack(collected, classes, str(root))

    packed = _cached(root, cache_dir, options, read)
    return {s: _unpack(packed, s or "") for s in splits}, list(packed["classes"])


class ImageFileDataset(Dataset):
    """Images decoded from files on demand (for folders too large to hold in memory).

    Headers are checked once when the dataset is built (Pillow reads only the header, so
    this is fast); unreadable files are skipped and counted in ``skipped``. Items are
    ``(uint8 (3, S, S) tensor, label, index)`` with ``S = image_size``.

    Args:
        files: image paths.
        labels: one label per file.
        image_size: side of the square every image is resized and centre-cropped to.
        verify: check each file's header when building the dataset.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int = 224, verify: bool = True) -> None:
        check_image_size(image_size)
        keep_files, keep_labels, skipped = [], [], []
        for f, y in zip(files, labels):
            if verify:
                try:
                    with Image.open(f) as img:
                        img.size  # noqa: B018 - forces the header parse
                except _DECODE_ERRORS:
                    skipped.append(str(f))
                    continue
            keep_files.append(Path(f))
            keep_labels.append(int(y))
        if skipped and not keep_files:
            raise StreamError(f"All {len(skipped)} image(s) given are unreadable or empty (first: {skipped[0]}); replace them with valid image files.")
        if skipped:
            log.warning("Skipped %d unreadable image(s) (first: %s); remove or replace them to silence this.", len(skipped), skipped[0])
        self.files = keep_files
        self.targets = torch.tensor(keep_labels, dtype=torch.long)
        self.image_size = image_size
        self.skipped = len(skipped)
        self.tags: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """Decode item ``i``; a file that passed the header check but is truncated or corrupt
        raises :class:`UnreadableImageError`, which batch iteration skips and counts."""
        try:
            return decode(self.files[i], self.image_size), int(self.targets[i]), i
        except _DECODE_ERRORS as exc:
            raise UnreadableImageError(f"Image '{self.files[i]}' cannot be decoded ({load_error_cause(exc)}); remove or replace the file.", str(self.files[i])) from exc


def lazy_folder(root: str | os.PathLike[str], split: str | None, image_size: int = 224, classes: list[str] | None = None) -> ImageFileDataset:
    """An :class:`ImageFileDataset` over ``root/split/<class>/`` (class ids by ``classes`` order)."""
    root = Path(root)
    base = root / split if split else root
    if not base.is_dir():
        raise StreamError(f"Image folder '{base}' does not exist; fix stream.options.path or the data root.")
    items = _folder_files(root, split)
    classes = classes or sorted({c for _, c in items})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for _, c in items if c not in index})
    if unknown:
        raise StreamError(f"Folder '{base}' has class folders {unknown[:3]} not in the class list; remove them or fix the class list.")
    return ImageFileDataset([f for f, _ in items], [index[c] for _, c in items], image_size)


def read_class_names(path: str | os.PathLike[str], count: int) -> list[str]:
    """Class names from a text file (one per line) or a JSON list, checked against ``count``."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"Class-name file '{path}' does not exist; fix stream.options.class_names_file.")
    text = path.read_text(encoding="utf-8")
    names = json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != count:
        raise StreamError(f"Class-name file '{path}' lists {len(names)} names for {count} classes; give one name per class, in class-folder order.")
    return [str(n) for n in names]
