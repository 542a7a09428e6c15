"""Run logging: a crash-safe JSONL record plus TensorBoard, and text/image renderings.

A run directory holds:

* ``metrics.jsonl`` - one JSON object per line, each with ``"kind"``,
  ``"step"`` and ``"time"`` (Unix seconds) plus the logged values. Every line
  is flushed and ``fsync``-ed as it is written, and the file is opened in
  append mode, so a killed run loses nothing and a resumed run continues the
  same file.
* ``tensorboard/`` - TensorBoard event files (scalars, the accuracy-matrix
  heatmap image and its text table).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import naming

__all__ = [
    "RunLogger",
    "format_accuracy_matrix",
    "format_summary",
    "read_jsonl",
    "render_accuracy_matrix",
    "side_by_side",
]

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NAN_RGB = (128, 128, 128)
_BACKGROUND_RGB = (255, 255, 255)
_LABEL_RGB = (40, 40, 40)
# Colour stops for the heatmap ramp, from 0 % (dark) to 100 % (light).
_RAMP = np.array(
    [
        [24, 18, 60],  # deep indigo
        [40, 70, 140],  # blue
        [30, 140, 140],  # teal
        [120, 195, 90],  # green
        [245, 235, 150],  # pale yellow
    ],
    dtype=np.float64,
)

_tensorboard_warned = False


# ----------------------------------------------------------------------------
# Rendering helpers
# ----------------------------------------------------------------------------


def _as_2d(acc: Any) -> np.ndarray:
    """Converts ``acc`` to a 2-D float64 array (``None`` becomes ``NaN``)."""
    if isinstance(acc, torch.Tensor):
        acc = acc.detach().to("cpu", torch.float64).numpy()
    try:
        mat = np.asarray(acc, dtype=np.float64)  # None entries become NaN
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The accuracy matrix must be a numeric 2-D array ({exc}).") from exc
    if mat.ndim != 2:
        raise ValueError(f"The accuracy matrix must be 2-D, but it has {mat.ndim} dimension(s).")
    return mat


def _ramp_colour(value: float) -> tuple[int, int, int]:
    """Maps an accuracy in percent to an RGB colour on the dark-to-light ramp."""
    if math.isnan(value):
        return _NAN_RGB
    x = min(max(value / 100.0, 0.0), 1.0) * (len(_RAMP) - 1)
    lo = min(int(math.floor(x)), len(_RAMP) - 2)
    frac = x - lo
    rgb = _RAMP[lo] * (1.0 - frac) + _RAMP[lo + 1] * frac
    return tuple(int(round(c)) for c in rgb)  # type: ignore[return-value]


def _draw_centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, fill: Any) -> None:
    """Draws ``text`` centred in ``box`` = (x0, y0, x1, y1) with the default font."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    width, height = right - left, bottom - top
    x = box[0] + (box[2] - box[0] - width) / 2 - left
    y = box[1] + (box[3] - box[1] - height) / 2 - top
    draw.text((x, y), text, fill=fill)


def render_accuracy_matrix(acc: np.ndarray, cell: int = 40) -> np.ndarray:
    """Renders an accuracy matrix as a heatmap image.

    Each cell is coloured on a dark-to-light ramp by ``value / 100`` and shows
    its value (one decimal for ``cell >= 32``, none for smaller cells, no text
    below 16 pixels); ``NaN`` cells are grey and show ``-``. The first row and
    column hold the evaluated-experience (column) and trained-experience (row)
    indices.

    Args:
        acc: Accuracy matrix of shape ``(R, C)`` in percent (``NaN`` = unset).
        cell: Side of one cell in pixels (at least 8).

    Returns:
        An RGB ``uint8`` image of shape ``((R + 1) * cell, (C + 1) * cell, 3)``.

    Raises:
        ValueError: If ``acc`` is not 2-D or ``cell < 8``.
    """
    mat = _as_2d(acc)
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 8:
        raise ValueError(f"`cell` must be an integer of at least 8 pixels, but got {cell!r}.")
    cell = int(cell)
    rows, cols = mat.shape
    image = Image.new("RGB", ((cols + 1) * cell, (rows + 1) * cell), _BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    show_text = cell >= 16
    fmt = "{:.1f}" if cell >= 32 else "{:.0f}"

    for j in range(cols):
        x0 = (j + 1) * cell
        if show_text:
            _draw_centered(draw, (x0, 0, x0 + cell, cell), str(j), _LABEL_RGB)
    for i in range(rows):
        y0 = (i + 1) * cell
        if show_text:
            _draw_centered(draw, (0, y0, cell, y0 + cell), str(i), _LABEL_RGB)
        for j in range(cols):
            x0 = (j + 1) * cell
            value = float(mat[i, j])
            colour = _ramp_colour(value)
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=colour, outline=_BACKGROUND_RGB)
            if not show_text:
                continue
            if math.isnan(value):
                text, ink = "-", (235, 235, 235)
            else:
                text = fmt.format(value)
                luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
                ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
            _draw_centered(draw, (x0, y0, x0 + cell, y0 + cell), text, ink)
    return np.asarray(image, dtype=np.uint8).copy()


def format_accuracy_matrix(acc: np.ndarray, title: str) -> str:
    """Formats an accuracy matrix as a plain-text table.

    Example output::

        Accuracy matrix
                   e0    e1
        after e0  90.0     -
        after e1  80.0  85.0

    Args:
        acc: Accuracy matrix of shape ``(R, C)`` in percent (``NaN`` = unset).
        title: First line of the output.

    Returns:
        The table, without a trailing newline.

    Raises:
        ValueError: If ``acc`` is not 2-D.
    """
    mat = _as_2d(acc)
    rows, cols = mat.shape
    headers = [f"e{j}" for j in range(cols)]
    labels = [f"after e{i}" for i in range(rows)]
    cells = [["-" if math.isnan(v) else f"{v:.1f}" for v in row] for row in mat.tolist()]
    width = max([len(h) for h in headers] + [len(c) for row in cells for c in row] + [1])
    label_width = max([len(s) for s in labels] + [0])
    lines = [title]
    lines.append((" " * label_width + "".join("  " + h.rjust(width) for h in headers)).rstrip())
    for label, row in zip(labels, cells):
        lines.append(label.ljust(label_width) + "".join("  " + c.rjust(width) for c in row))
    return "\n".join(lines)


def side_by_side(blocks: list[str], gap: int = 4) -> str:
    """Joins multi-line text blocks horizontally.

    Each block is padded to its widest line (and shorter blocks with blank
    lines at the bottom), then blocks are separated by ``gap`` spaces.
    Trailing spaces are stripped from every output line.

    Args:
        blocks: Text blocks, each possibly spanning several lines.
        gap: Number of spaces between neighbouring blocks.

    Returns:
        The combined text.

    Raises:
        ValueError: If ``gap`` is negative.
    """
    if gap < 0:
        raise ValueError(f"`gap` must be zero or positive, but got {gap}.")
    split = [block.splitlines() for block in blocks]
    if not split:
        return ""
    widths = [max((len(line) for line in lines), default=0) for lines in split]
    height = max(len(lines) for lines in split)
    out = []
    for r in range(height):
        parts = [(lines[r] if r < len(lines) else "").ljust(w) for lines, w in zip(split, widths)]
        out.append((" " * gap).join(parts).rstrip())
    return "\n".join(out)


def format_summary(summary: Mapping[str, Any]) -> str:
    """Formats a metrics summary, one ``name: value`` line per entry.

    Floats are shown with one decimal, integers as-is, and ``None`` / ``NaN``
    as ``n/a`` (e.g. ``forgetting: 12.3``).

    Args:
        summary: Mapping such as the output of ``metrics.summarize``.

    Returns:
        The formatted lines joined by newlines.
    """
    lines = []
    for key, value in summary.items():
        if isinstance(value, (np.generic, torch.Tensor)):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            text = "n/a"
        elif isinstance(value, bool):
            text = str(value)
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            text = f"{value:.1f}"
        else:
            text = str(value)
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# JSON conversion
# ----------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
    """Converts ``value`` to plain JSON-serialisable Python objects.

    numpy scalars/arrays and tensors become Python numbers/lists, mappings
    become dicts with string keys, tuples/sets become lists, paths become
    strings, non-finite floats become ``None`` (keeping the file strict JSON),
    and any other object falls back to ``str(value)``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.to(torch.float32)
        return _to_jsonable(tensor.item() if tensor.ndim == 0 else tensor.tolist())
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _to_jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """Reads a JSONL file written by :class:`RunLogger`.

    Args:
        path: The ``metrics.jsonl`` file (or a run directory containing it).
        kind: If given, only records whose ``"kind"`` equals it are returned.

    Returns:
        The records in file order (blank lines are skipped).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a line is not a valid JSON object.
    """
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_NAME
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Line {number} of {path} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(record, dict):
                raise ValueError(f"Line {number} of {path} is not a JSON object.")
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


def _truncate_atomically(path: Path, size: int) -> None:
    """Keep the first ``size`` bytes of ``path``: copy them to a temporary file, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        remaining = size
        while remaining > 0:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Run logger
# ----------------------------------------------------------------------------


class RunLogger:
    """Writes a run's metrics to ``metrics.jsonl`` and TensorBoard.

    Example:
        >>> with RunLogger("runs/demo") as log:  # doctest: +SKIP
        ...     log.log("train", step=10, loss=0.42, lr=1e-3)
        ...     log.log_accuracy_matrix(acc, step=1)
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, jsonl: bool = True, *, truncate_to: int | None = None, purge_step: int | None = None) -> None:
        """Opens (or resumes) a run directory.

        Args:
            run_dir: Directory of the run; created if missing.
            tensorboard: Write TensorBoard events to ``run_dir/tensorboard``.
                The writer is created on first use; if TensorBoard cannot be
                imported a warning is issued once and only JSONL is written.
            jsonl: Append records to ``run_dir/metrics.jsonl``.
            truncate_to: a resumed run: first cut ``metrics.jsonl`` back to this many bytes
                (the size recorded in the checkpoint), so that records written after the
                checkpoint, which the resumed run writes again, are not counted twice. The
                cut is atomic (a copy of the kept bytes renamed over the file).
            purge_step: a resumed run: TensorBoard drops events at or after this step from
                earlier event files (``SummaryWriter(purge_step=...)``).
        """
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR
        self._use_tensorboard = bool(tensorboard)
        self._writer: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._file = None
        self._purge_step = purge_step
        if jsonl and truncate_to is not None and self.jsonl_path.exists() and self.jsonl_path.stat().st_size > truncate_to:
            _truncate_atomically(self.jsonl_path, truncate_to)
        if jsonl:
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
            # A run killed in the middle of a line leaves no trailing newline;
            # start on a fresh line so the next record stays parseable.
            if self._file.tell() > 0:
                with open(self.jsonl_path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    if existing.read(1) != b"\n":
                        self._file.write("\n")
                        self._sync()

    # -- internals -------------------------------------------------------

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"The RunLogger for {self.run_dir} is closed.")

    def _tb(self) -> Any:
        """Returns the SummaryWriter, creating it on first use (or ``None``)."""
        global _tensorboard_warned
        if not self._use_tensorboard:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # ImportError, or a broken installation
                self._use_tensorboard = False
                if not _tensorboard_warned:
                    _tensorboard_warned = True
                    warnings.warn(
                        f"TensorBoard is unavailable ({exc}); logging to JSONL only.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return None
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(_to_jsonable(record), ensure_ascii=False, allow_nan=False)
        with naming(self.jsonl_path):
            self._file.write(line + "\n")
            self._sync()

    # -- public API --------------------------------------------------------

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Logs one record.

        The JSONL line is ``{"kind": kind, "step": step, "time": <unix time>,
        **values}``; values may be nested lists/dicts/None, numpy values or
        tensors (converted to plain Python; non-finite floats become
        ``null``). Every top-level value that is a finite int or float (not a
        bool) is also written as the TensorBoard scalar ``f"{kind}/{key}"``.

        Args:
            kind: Record type, e.g. ``"train"``, ``"eval"``, ``"online"``.
            step: Global step (e.g. iteration or experience index).
            **values: The values to record (``"time"`` is reserved).

        Raises:
            ValueError: If the logger is closed, ``kind`` is empty, or a value
                uses the reserved key ``"time"``.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"`kind` must be a non-empty string, but got {kind!r}.")
        if "time" in values:
            raise ValueError("The key 'time' is reserved for the record's timestamp.")
        step = int(step)
        now = time.time()
        clean = {key: _to_jsonable(value) for key, value in values.items()}
        with self._lock:
            self._check_open()
            self._write_record({"kind": kind, "step": step, "time": now, **clean})
            writer = self._tb()
            if writer is not None:
                for key, value in clean.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(f"{kind}/{key}", value, global_step=step, walltime=now)

    def log_accuracy_matrix(self, acc: np.ndarray, step: int, tag: str = "accuracy_matrix") -> None:
        """Logs an accuracy matrix.

        Writes a TensorBoard image (the :func:`render_accuracy_matrix`
        heatmap, tag ``tag``) and text (the :func:`format_accuracy_matrix`
        table in a Markdown code block, tag ``f"{tag}/text_summary"`` in the
        event file), and the JSONL record ``{"kind": "accuracy_matrix",
        "step": step, "time": ..., "tag": tag, "matrix": [[...], ...]}`` with
        ``null`` for unset entries.

        Args:
            acc: Accuracy matrix in percent (``NaN`` = unset).
            step: Global step, typically the index of the experience just trained.
            tag: TensorBoard tag, and the record's ``"tag"`` field.

        Raises:
            ValueError: If the logger is closed or ``acc`` is not 2-D.
        """
        mat = _as_2d(acc)
        step = int(step)
        now = time.time()
        with self._lock:
            self._check_open()
            self._write_record(
                {"kind": "accuracy_matrix", "step": step, "time": now, "tag": tag, "matrix": mat.tolist()}
            )
            writer = self._tb()
            if writer is not None:
                writer.add_image(tag, render_accuracy_matrix(mat), global_step=step, walltime=now, dataformats="HWC")
                table = format_accuracy_matrix(mat, f"{tag} (step {step})")
                writer.add_text(tag, f"```\n{table}\n```", global_step=step, walltime=now)

    def flush(self) -> None:
        """Flushes pending TensorBoard events (JSONL lines are always synced)."""
        with self._lock:
            if self._closed:
                return
            if self._file is not None:
                self._sync()
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        """Flushes and closes all outputs; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                self._writer = None
                if self._file is not None:
                    try:
                        self._sync()
                    finally:
                        self._file.close()
                        self._file = None

    @property
    def offset(self) -> int | None:
        """Bytes of ``metrics.jsonl`` written so far (every record is synced), or ``None``."""
        with self._lock:
            return None if self._file is None else self._file.tell()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLogger(run_dir={str(self.run_dir)!r}, closed={self._closed})"
