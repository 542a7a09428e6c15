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
    "ENGINE_METRICS",
    "OnlineCurves",
    "RunLogger",
    "TrainCurves",
    "accuracy_curves",
    "format_experience_line",
    "scalars",
    "strategy_metrics",
    "format_accuracy_matrix",
    "format_summary",
    "read_jsonl",
    "render_accuracy_matrix",
    "side_by_side",
]

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EXPERIENCE_TB_DIR = "by_experience"  # inside TENSORBOARD_DIR: the curves whose x is the experience

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


ROW_AXIS_LABEL = "after training experience i"
COLUMN_AXIS_LABEL = "evaluated on experience j"


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text)
    return right - left, bottom - top


def render_accuracy_matrix(acc: np.ndarray, cell: int = 40) -> np.ndarray:
    """Renders an accuracy matrix as a heatmap image with labelled axes.

    Each cell is coloured on a dark-to-light ramp by ``value / 100`` and shows
    its value (one decimal for ``cell >= 32``, none for smaller cells, no text
    below 16 pixels); ``NaN`` cells are grey and show ``-``. The rows are the
    trained experiences, titled ``"after training experience i"`` (written
    upwards along the left edge) with ``i`` as tick labels; the columns are
    the evaluated experiences, titled ``"evaluated on experience j"`` along the
    top edge with ``j`` as tick labels.

    Args:
        acc: Accuracy matrix of shape ``(R, C)`` in percent (``NaN`` = unset).
        cell: Side of one cell in pixels (at least 8).

    Returns:
        An RGB ``uint8`` image of ``(R + 1) x (C + 1)`` cells (the tick labels, then the
        matrix) below and right of a band one line of axis title high (about 16 pixels);
        the canvas is widened (or heightened) when an axis title is longer than the
        matrix, so that it is never cut.

    Raises:
        ValueError: If ``acc`` is not 2-D or ``cell < 8``.
    """
    mat = _as_2d(acc)
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 8:
        raise ValueError(f"`cell` must be an integer of at least 8 pixels, but got {cell!r}.")
    cell = int(cell)
    rows, cols = mat.shape
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band = _text_size(probe, "Ag")[1] + 6  # one line of axis title, with a margin
    width = band + cell + max(cols * cell, _text_size(probe, COLUMN_AXIS_LABEL)[0] + 8)
    height = band + cell + max(rows * cell, _text_size(probe, ROW_AXIS_LABEL)[0] + 8)
    image = Image.new("RGB", (width, height), _BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    show_text = cell >= 16
    fmt = "{:.1f}" if cell >= 32 else "{:.0f}"
    ox, oy = band + cell, band + cell  # top-left corner of cell (0, 0)

    # axis titles: the columns' across the top, the rows' written upwards on the left
    _draw_centered(draw, (ox, 0, max(ox + cols * cell, band + cell + _text_size(probe, COLUMN_AXIS_LABEL)[0] + 8), band), COLUMN_AXIS_LABEL, _LABEL_RGB)
    label_w = _text_size(probe, ROW_AXIS_LABEL)[0]
    strip = Image.new("RGB", (label_w + 4, band), _BACKGROUND_RGB)
    _draw_centered(ImageDraw.Draw(strip), (0, 0, label_w + 4, band), ROW_AXIS_LABEL, _LABEL_RGB)
    strip = strip.rotate(90, expand=True)  # now band wide, label_w + 4 tall
    top = oy + max(0, (rows * cell - strip.height) // 2)
    image.paste(strip.crop((0, 0, band, min(strip.height, height - top))), (0, top))

    for j in range(cols):
        x0 = ox + j * cell
        _draw_centered(draw, (x0, band, x0 + cell, oy), str(j), _LABEL_RGB)
    for i in range(rows):
        y0 = oy + i * cell
        _draw_centered(draw, (band, y0, ox, y0 + cell), str(i), _LABEL_RGB)
        for j in range(cols):
            x0 = ox + j * cell
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

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        jsonl: bool = True,
        *,
        truncate_to: int | None = None,
        purge_step: int | None = None,
        purge_experience: int | None = None,
    ) -> None:
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
            purge_experience: a resumed run: the same for the curves indexed by experience
                (``tensorboard/by_experience``), from the experience the run continues with.
        """
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR
        self._use_tensorboard = bool(tensorboard)
        self._writer: Any = None
        self._experience_writer: Any = None
        self._purge_experience = purge_experience
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

    def _tb(self, axis: str = "step") -> Any:
        """Returns the SummaryWriter of ``axis``, creating it on first use (or ``None``).

        ``"step"``: ``tensorboard/``, whose x axis is the optimizer step (or the test sample);
        ``"experience"``: ``tensorboard/by_experience``, whose x axis is the experience index.
        Two writers, because a resumed run purges each axis from its own position.
        """
        global _tensorboard_warned
        if not self._use_tensorboard:
            return None
        if axis == "experience":
            if self._experience_writer is None and self._tb() is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._experience_writer = SummaryWriter(log_dir=str(self.tensorboard_dir / EXPERIENCE_TB_DIR), purge_step=self._purge_experience)
            return self._experience_writer
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

    def log_scalars(self, kind: str, step: int, values: Mapping[str, Any], *, axis: str = "step", jsonl: bool = True, extra: Mapping[str, Any] | None = None) -> None:
        """Logs values under their own names as TensorBoard tags (no ``kind`` prefix).

        The JSONL line is ``{"kind": kind, "step": step, "time": ..., **values}``; every
        value that is a finite int or float (not a bool) is also the TensorBoard scalar
        named by its key (e.g. ``"loss/total"``) at ``step``. Other values (lists, dicts,
        strings) stay in the JSONL line.

        Args:
            kind: Record type, e.g. ``"step"`` or ``"online"``.
            step: The x value: an optimizer step or test sample (``axis="step"``), or an
                experience index (``axis="experience"``, written to ``tensorboard/by_experience``).
            values: Tag -> value.
            axis: ``"step"`` or ``"experience"``.
            jsonl: Also write the JSONL line (``False`` when another record already holds
                the values).
            extra: Fields of the JSONL line only (never TensorBoard), e.g. ``experience``.

        Raises:
            ValueError: If the logger is closed, ``kind`` is empty, ``axis`` is unknown, or a
                value uses one of the record's own keys (``kind``, ``step``, ``time``).
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"`kind` must be a non-empty string, but got {kind!r}.")
        if axis not in ("step", "experience"):
            raise ValueError(f"`axis` must be 'step' or 'experience', but got {axis!r}.")
        reserved = {"kind", "step", "time"} & (set(values) | set(extra or {}))
        if reserved:
            raise ValueError(f"The keys {sorted(reserved)} are reserved for the record itself.")
        step = int(step)
        now = time.time()
        clean = {str(key): _to_jsonable(value) for key, value in values.items()}
        with self._lock:
            self._check_open()
            if jsonl:
                self._write_record({"kind": kind, "step": step, "time": now, **{str(k): _to_jsonable(v) for k, v in (extra or {}).items()}, **clean})
            writer = self._tb(axis)
            if writer is not None:
                for key, value in clean.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(key, value, global_step=step, walltime=now)

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
            for writer in (self._writer, self._experience_writer):
                if writer is not None:
                    writer.flush()

    def close(self) -> None:
        """Flushes and closes all outputs; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for writer in (self._experience_writer, self._writer):
                    if writer is not None:
                        writer.close()
            finally:
                self._writer = self._experience_writer = None
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


# ----------------------------------------------------------------------------
# Curves: strategy metrics, training steps, test-time online accuracy
# ----------------------------------------------------------------------------

#: Keys of ``state.metrics`` that the engine itself writes; every other key is a strategy's.
ENGINE_METRICS = frozenset({"accuracy_matrix", "online"})


def strategy_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The strategies' entries of ``state.metrics``, flattened to ``"<strategy>/<name>"`` keys.

    A strategy writes ``state.metrics["<strategy>/<name>"] = value``, or a dict of figures
    under its own name (``state.metrics["<strategy>"] = {"<name>": value}``), which is read
    as the same keys (an explicit ``"<strategy>/<name>"`` key wins). The engine's own keys
    (:data:`ENGINE_METRICS`) are left out. Values are returned as they are (see
    :func:`scalars` for the TensorBoard subset).
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key not in ENGINE_METRICS and not (isinstance(value, Mapping) and "/" not in str(key)):
            out[str(key)] = value
    for key, value in metrics.items():
        if key not in ENGINE_METRICS and isinstance(value, Mapping) and "/" not in str(key):
            for sub, v in value.items():
                out.setdefault(f"{key}/{sub}", v)
    return out


def scalars(values: Mapping[str, Any]) -> dict[str, float | int]:
    """The entries of ``values`` that are finite numbers (not booleans): TensorBoard scalars.

    0-dim tensors count (read with one host transfer each: call this at a logging step only).
    """
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        value = _to_jsonable(value)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def accuracy_curves(row: Any, trained: int) -> dict[str, float]:
    """TensorBoard values of accuracy row ``trained``: ``accuracy/exp_<j>`` for every
    evaluated experience ``j`` and ``accuracy/average`` over the seen ones (``j <= trained``)."""
    values = [float(v) for v in np.asarray(row, dtype=np.float64).tolist()]
    out = {f"accuracy/exp_{j}": v for j, v in enumerate(values) if not math.isnan(v)}
    average = _nanmean(values[: trained + 1])
    if not math.isnan(average):
        out["accuracy/average"] = average
    return out


def format_experience_line(trained: int, total: int, row: Any, train_seconds: float, eval_seconds: float) -> str:
    """One line after an experience, e.g.
    ``experience 3/10: accuracy [91.2 85.0 80.1] avg 85.4 (train 12.3 s, eval 1.2 s)``.

    ``trained`` is 0-based and shown 1-based; the row shows the seen experiences
    (``0..trained``), ``-`` where an experience has no test image.
    """
    values = [float(v) for v in np.asarray(row, dtype=np.float64).tolist()][: trained + 1]
    cells = " ".join("-" if math.isnan(v) else f"{v:.1f}" for v in values)
    average = _nanmean(values)
    avg = "n/a" if math.isnan(average) else f"{average:.1f}"
    return f"experience {trained + 1}/{total}: accuracy [{cells}] avg {avg} (train {train_seconds:.1f} s, eval {eval_seconds:.1f} s)"


def _lr_values(optimizer: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for index, group in enumerate(getattr(optimizer, "param_groups", None) or []):
        name = group.get("name", f"group{index}")
        lr = group.get("lr")
        if lr is not None:
            out.setdefault(f"lr/{name}", float(lr))  # groups added later under one name share its rate
    return out


class TrainCurves:
    """The training curves of the continual loop, accumulated on the device between logging steps.

    :meth:`after_step` folds one optimizer step in with device operations only: the total
    loss and every named loss term (left out on a step the non-finite guard flagged, as the
    epoch's mean loss does), and the training accuracy of the batch (argmax of the logits
    the loss saw, against integer targets). Every ``every`` optimizer steps it reads them
    all with one host transfer, and logs (kind ``"step"``, x = ``state.step``):
    ``loss/total``, ``loss/<term>`` (means over the interval's steps), ``train/accuracy``
    (percent over its samples), ``lr/<group>`` (each parameter group's current rate), and the
    strategies' scalar metrics (see :func:`strategy_metrics`). In a data-parallel run the
    figures are those of the logging process's share of each batch.

    Args:
        every: the interval in optimizer steps (``log.every_steps``).
    """

    def __init__(self, every: int) -> None:
        self.every = max(int(every), 1)
        self._new()

    def _new(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.samples = 0

    def observe(self, state: Any, bad: torch.Tensor | None = None) -> None:
        """Fold the current step in (no host sync)."""
        if state.loss is None:
            return
        with torch.no_grad():
            values = {"loss/total": state.loss.detach().float().mean()}
            for name, term in (state.loss_terms or {}).items():
                values[f"loss/{name}"] = term.detach().float().mean()
            good = torch.ones((), device=values["loss/total"].device) if bad is None else (~bad).float()
            for key, value in values.items():
                if bad is not None:
                    value = torch.where(bad, torch.zeros_like(value), value)
                self.sums[key] = value if key not in self.sums else self.sums[key] + value
                self.counts[key] = good if key not in self.counts else self.counts[key] + good
            logits, targets = state.logits, state.targets
            if (
                isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor)
                and logits.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()
                and logits.shape[0] == targets.shape[0] and targets.shape[0] > 0
            ):
                correct = (logits.detach().argmax(dim=1) == targets).sum().float()
                self.sums["train/correct"] = correct if "train/correct" not in self.sums else self.sums["train/correct"] + correct
                self.samples += int(targets.shape[0])

    def read(self, state: Any) -> dict[str, Any]:
        """The interval's figures (one host transfer), then a new interval; ``{}`` if empty."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        counted = [k for k in keys if k in self.counts]
        flat = torch.stack([self.sums[k].to(torch.float32) for k in keys] + [self.counts[k] for k in counted]).tolist()
        sums = dict(zip(keys, flat[: len(keys)]))
        counts = dict(zip(counted, flat[len(keys) :]))
        out: dict[str, Any] = {k: (sums[k] / counts[k] if counts[k] > 0 else None) for k in counted}
        if self.samples:
            out["train/accuracy"] = 100.0 * sums["train/correct"] / self.samples
        out.update(_lr_values(state.optimizer))
        out.update(scalars(strategy_metrics(state.metrics)))
        self._new()
        return out

    def after_step(self, state: Any, bad: torch.Tensor | None, logger: RunLogger | None) -> dict[str, Any] | None:
        """:meth:`observe`, then at every ``every``-th optimizer step read and log; returns
        the figures read (for a progress bar), or ``None`` when this step logged nothing."""
        self.observe(state, bad)
        if state.step % self.every != 0:
            return None
        return self.flush(state, logger)

    def flush(self, state: Any, logger: RunLogger | None) -> dict[str, Any] | None:
        """Read and log what the interval holds so far (the end of an experience)."""
        values = self.read(state)
        if not values:
            return None
        if logger is not None:
            logger.log_scalars("step", state.step, values)
        return values

    def state_dict(self) -> dict[str, Any]:
        """The open interval, on the CPU (for a mid-experience checkpoint)."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": {k: v.detach().cpu() for k, v in self.counts.items()}, "samples": self.samples}

    def load_state_dict(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        """Continue the interval that :meth:`state_dict` saved (``None``: a new one)."""
        self._new()
        if saved:
            self.sums = {k: v.to(device) for k, v in saved["sums"].items()}
            self.counts = {k: v.to(device) for k, v in saved["counts"].items()}
            self.samples = int(saved["samples"])


class OnlineCurves:
    """Running online accuracy of the test-time loop, overall and per domain, with the
    strategies' scalar metrics and every collapse-guard reset.

    Predictions are already on the host there (the loop scores each sample), so this is
    plain counting. Every ``every`` test batches (samples, in a sample-wise stream) it logs
    (kind ``"online"``, x = samples predicted so far) ``online/accuracy``,
    ``online/domain/<domain>`` and the strategies' scalars. Whenever a strategy's
    ``"<strategy>/collapse_resets"`` metric grows, it logs a ``"collapse"`` record at that
    sample with the new count (TensorBoard: ``<strategy>/collapse_resets``).

    Args:
        every: the interval in test batches (``log.every_steps``).
    """

    def __init__(self, every: int) -> None:
        self.every = max(int(every), 1)
        self.units = self.samples = self.correct = 0
        self.per_domain: dict[str, list[int]] = {}
        self.resets: dict[str, Any] = {}
        self._logged_at = 0

    def update(self, done: int, hits: list[bool], domains: list[str] | None) -> None:
        """Count one test batch: ``done`` samples predicted, their hits and domains."""
        self.units += 1
        self.samples += int(done)
        self.correct += int(sum(bool(h) for h in hits))
        for domain, hit in zip(domains or [], hits):
            slot = self.per_domain.setdefault(domain, [0, 0])
            slot[0] += int(bool(hit))
            slot[1] += 1

    def values(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The running figures (percent) and the strategies' scalar metrics."""
        out: dict[str, Any] = {"online/accuracy": 100.0 * self.correct / max(self.samples, 1)}
        for domain, (correct, total) in self.per_domain.items():
            out[f"online/domain/{domain}"] = 100.0 * correct / max(total, 1)
        out.update(scalars(strategy_metrics(metrics)))
        return out

    def after_sample(self, done: int, hits: list[bool], domains: list[str] | None, metrics: Mapping[str, Any], logger: RunLogger | None) -> dict[str, Any] | None:
        """:meth:`update`, log any new collapse reset, and every ``every`` batches log the
        running figures; returns them when logged (for a progress bar), else ``None``."""
        self.update(done, hits, domains)
        for key, value in metrics.items():
            if str(key).endswith("/collapse_resets") and isinstance(value, (int, float)) and value != self.resets.get(key, 0):
                self.resets[key] = value
                if logger is not None:
                    logger.log_scalars("collapse", self.samples, {key: value}, extra={"strategy": str(key).split("/")[0]})
        if self.units % self.every != 0:
            return None
        return self._log(metrics, logger)

    def finish(self, metrics: Mapping[str, Any], logger: RunLogger | None) -> None:
        """Log the last point (only the strategies' scalars, published at the stream's end,
        when the last batch was already a logging one)."""
        if not self.samples:
            return
        if self._logged_at != self.samples:
            self._log(metrics, logger)
        elif logger is not None and (last := scalars(strategy_metrics(metrics))):
            logger.log_scalars("online", self.samples, last)

    def _log(self, metrics: Mapping[str, Any], logger: RunLogger | None) -> dict[str, Any]:
        values = self.values(metrics)
        self._logged_at = self.samples
        if logger is not None:
            logger.log_scalars("online", self.samples, values)
        return values


def postfix(values: Mapping[str, Any]) -> dict[str, str]:
    """A progress bar's postfix from figures already read: the loss and the accuracy."""
    out: dict[str, str] = {}
    loss = values.get("loss/total")
    if isinstance(loss, float):
        out["loss"] = f"{loss:.4g}"
    acc = values.get("train/accuracy", values.get("online/accuracy"))
    if isinstance(acc, float):
        out["acc"] = f"{acc:.1f}"
    return out
