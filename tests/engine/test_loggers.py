"""Tests for driftprompt.engine.loggers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from driftprompt.engine.loggers import (
    RunLogger,
    format_accuracy_matrix,
    format_summary,
    read_jsonl,
    render_accuracy_matrix,
    side_by_side,
)

NAN = math.nan
ACC = np.array([[90.0, NAN, NAN], [80.0, 85.0, NAN], [70.0, 75.0, 95.0]])


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_jsonl_lines_are_written_and_flushed_before_close(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log("train", 1, loss=0.5, lr=1e-3)
    # Visible on disk before close: one complete line per call.
    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 1
    logger.log("eval", 2, accuracy=81.25, per_class=[1.0, None], extra={"a": [1, 2]})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records[0]["kind"] == "train" and records[0]["step"] == 1
    assert records[0]["loss"] == 0.5 and isinstance(records[0]["time"], float)
    assert records[1]["per_class"] == [1.0, None]
    assert records[1]["extra"] == {"a": [1, 2]}
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        logger.log("train", 3, loss=0.1)
    assert not (tmp_path / "tensorboard").exists()


def test_jsonl_appends_across_logger_instances(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log("train", 0, loss=1.0)
        logger.log("train", 1, loss=0.9)
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log("train", 2, loss=0.8)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert read_jsonl(tmp_path, kind="train") == records


def test_resume_after_truncated_line_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 0}\n{"kind": "tr', encoding="utf-8")
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log("train", 1, loss=0.7)
    lines = _lines(tmp_path / "metrics.jsonl")
    assert json.loads(lines[-1])["step"] == 1
    with pytest.raises(ValueError, match="Line 2"):
        read_jsonl(tmp_path / "metrics.jsonl")


def test_numpy_and_tensor_values_are_serialised(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(
            "eval",
            np.int64(4),
            acc=np.float32(0.5),
            count=np.int64(7),
            vec=np.array([1.5, np.nan]),
            t=torch.tensor(2.5),
            tv=torch.tensor([[1, 2], [3, 4]]),
            half=torch.tensor([0.5], dtype=torch.bfloat16),
            flag=np.bool_(True),
            missing=None,
            inf=float("inf"),
        )
    (record,) = read_jsonl(tmp_path)
    assert record["step"] == 4
    assert record["acc"] == 0.5 and isinstance(record["acc"], float)
    assert record["count"] == 7 and isinstance(record["count"], int)
    assert record["vec"] == [1.5, None]
    assert record["t"] == 2.5
    assert record["tv"] == [[1, 2], [3, 4]]
    assert record["half"] == [0.5]
    assert record["flag"] is True
    assert record["missing"] is None
    assert record["inf"] is None


def test_tensorboard_scalars_and_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as logger:
        logger.log("train", 1, loss=0.25, note="text", flag=True, nothing=None)
        logger.log("train", 2, loss=torch.tensor(0.125))
        logger.log_accuracy_matrix(ACC, step=2)
    tb_dir = tmp_path / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents*"))
    acc_events = EventAccumulator(str(tb_dir))
    acc_events.Reload()
    tags = acc_events.Tags()
    assert tags["scalars"] == ["train/loss"]
    assert [e.value for e in acc_events.Scalars("train/loss")] == [0.25, 0.125]
    assert "accuracy_matrix" in tags["images"]
    (matrix_record,) = read_jsonl(tmp_path, kind="accuracy_matrix")
    assert matrix_record["step"] == 2
    assert matrix_record["matrix"] == [[90.0, None, None], [80.0, 85.0, None], [70.0, 75.0, 95.0]]


def test_tensorboard_disabled_writes_only_jsonl(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_accuracy_matrix(ACC, step=0)
    assert not (tmp_path / "tensorboard").exists()
    assert read_jsonl(tmp_path)[0]["kind"] == "accuracy_matrix"


@pytest.mark.parametrize("size", [1, 3, 5])
def test_render_accuracy_matrix_shape(size):
    acc = np.full((size, size), NAN)
    acc[np.tril_indices(size)] = 50.0
    image = render_accuracy_matrix(acc, cell=40)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # the cells, their tick labels, and a band for the axis titles above and to the left
    assert image.shape[0] > (size + 1) * 40 and image.shape[1] > (size + 1) * 40
    small = render_accuracy_matrix(acc, cell=12)
    assert small.shape[0] > (size + 1) * 12 and small.shape[1] > (size + 1) * 12
    if size == 5:  # a matrix wider than its titles: band + (size + 1) cells, square
        band = image.shape[0] - 6 * 40
        assert 8 <= band <= 32 and image.shape[:2] == (band + 240, band + 240)


def _grid_origin(image, rows, cols, cell):
    """Top-left pixel of cell (0, 0), for a matrix wider and taller than its axis titles."""
    return image.shape[0] - rows * cell, image.shape[1] - cols * cell


def test_render_accuracy_matrix_colours():
    acc = np.full((5, 5), 50.0)
    acc[0, 0], acc[0, 1], acc[1, 0] = 0.0, NAN, 100.0
    image = render_accuracy_matrix(acc, cell=40)
    y, x = _grid_origin(image, 5, 5, 40)
    # Sample near a cell corner, away from the text.
    low, nan_cell, high = image[y + 3, x + 3], image[y + 3, x + 40 + 3], image[y + 40 + 3, x + 3]
    assert tuple(nan_cell) == (128, 128, 128)
    assert int(high.astype(int).sum()) > int(low.astype(int).sum())  # dark -> light
    with pytest.raises(ValueError):
        render_accuracy_matrix(np.zeros(3))


def test_render_accuracy_matrix_labels_its_axes():
    acc = np.full((5, 5), 50.0)
    image = render_accuracy_matrix(acc, cell=40).astype(int)
    y, x = _grid_origin(image, 5, 5, 40)
    ink = image.sum(axis=2) < 400  # dark text on the white background
    band = y - 40
    # the columns' title in the top band above the grid, the rows' title in the left band
    assert ink[:band, x:].sum() > 50
    assert ink[y:, :band].sum() > 50
    # tick labels: the experience indices in the row above the grid and the column left of it
    for j in range(5):
        assert ink[band:y, x + j * 40 : x + (j + 1) * 40].any()
        assert ink[y + j * 40 : y + (j + 1) * 40, band:x].any()
    # the rows' title reads upwards: rotated, its ink spans more rows than columns
    rows_with_ink = np.flatnonzero(ink[:, :band].any(axis=1))
    cols_with_ink = np.flatnonzero(ink[:, :band].any(axis=0))
    assert np.ptp(rows_with_ink) > 3 * np.ptp(cols_with_ink)


def test_format_accuracy_matrix():
    text = format_accuracy_matrix(ACC, "Accuracy")
    lines = text.splitlines()
    assert lines[0] == "Accuracy"
    assert lines[1].split() == ["e0", "e1", "e2"]
    assert lines[2].split() == ["after", "e0", "90.0", "-", "-"]
    assert lines[4].split() == ["after", "e2", "70.0", "75.0", "95.0"]
    # Columns are aligned: every data row has the same width.
    assert len({len(line) for line in lines[2:]}) == 1


def test_side_by_side_aligns_blocks_of_unequal_height():
    left = "ab\nabcdef\nx"
    right = "R1\nR2\nR3\nR4\nR5"
    combined = side_by_side([left, right], gap=2)
    lines = combined.splitlines()
    assert len(lines) == 5
    assert lines[0] == "ab      R1"
    assert lines[1] == "abcdef  R2"
    assert lines[2] == "x       R3"
    assert lines[3] == "        R4"
    # Right column starts at the same offset on every line.
    assert {line.index("R") for line in lines} == {8}
    # A taller left block leaves no trailing spaces.
    assert side_by_side(["a\nb\nc", "Z"]).splitlines() == ["a    Z", "b", "c"]
    assert side_by_side([]) == ""


def test_format_summary():
    text = format_summary(
        {"final_average_accuracy": 80.0, "forgetting": 12.345, "forward_transfer": None, "num_experiences": 3}
    )
    assert text.splitlines() == [
        "final_average_accuracy: 80.0",
        "forgetting: 12.3",
        "forward_transfer: n/a",
        "num_experiences: 3",
    ]


def test_log_scalars_uses_its_keys_as_tags_and_keeps_extras_out_of_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as logger:
        logger.log_scalars("step", 10, {"loss/total": 0.5, "lr/head": torch.tensor(1e-3), "hist": [1, 2]}, extra={"experience": 3})
        logger.log_scalars("accuracy", 2, {"accuracy/exp_0": 75.0}, axis="experience", jsonl=False)
        with pytest.raises(ValueError, match="reserved"):
            logger.log_scalars("step", 11, {"time": 1.0})
        with pytest.raises(ValueError, match="axis"):
            logger.log_scalars("step", 11, {"a": 1.0}, axis="epoch")
    (record,) = read_jsonl(tmp_path)
    assert record["kind"] == "step" and record["step"] == 10 and record["experience"] == 3
    assert record["loss/total"] == 0.5 and record["hist"] == [1, 2]
    steps = EventAccumulator(str(tmp_path / "tensorboard"))
    steps.Reload()
    assert sorted(steps.Tags()["scalars"]) == ["loss/total", "lr/head"]
    by_experience = EventAccumulator(str(tmp_path / "tensorboard" / "by_experience"))
    by_experience.Reload()
    assert [(e.step, e.value) for e in by_experience.Scalars("accuracy/exp_0")] == [(2, 75.0)]
