"""Tests for driftprompt.engine.metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from driftprompt.engine.metrics import (
    AccuracyMatrix,
    average_incremental_accuracy,
    backward_transfer,
    expected_calibration_error,
    final_average_accuracy,
    forgetting,
    forward_transfer,
    summarize,
)

NAN = math.nan

# Default protocol: only seen experiences are evaluated (NaN above the diagonal).
LOWER = np.array(
    [
        [90.0, NAN, NAN],
        [80.0, 85.0, NAN],
        [70.0, 75.0, 95.0],
    ]
)

# Experience 0 improves after training experience 1, so its best accuracy is
# not on the diagonal: max-based forgetting differs from diagonal-based drops.
IMPROVED = np.array(
    [
        [60.0, NAN, NAN],
        [80.0, 70.0, NAN],
        [50.0, 65.0, 90.0],
    ]
)

# Future experiences evaluated too (upper triangle filled), for forward transfer.
FULL = np.array(
    [
        [90.0, 30.0, 20.0],
        [85.0, 88.0, 40.0],
        [80.0, 82.0, 91.0],
    ]
)
FULL_BASELINE = [10.0, 25.0, 33.0]


def test_final_average_accuracy_lower_triangular():
    # (70 + 75 + 95) / 3 = 240 / 3 = 80.0
    assert final_average_accuracy(LOWER) == pytest.approx(80.0)


def test_average_incremental_accuracy_lower_triangular():
    # A_0 = 90; A_1 = (80 + 85) / 2 = 82.5; A_2 = (70 + 75 + 95) / 3 = 80
    # (90 + 82.5 + 80) / 3 = 252.5 / 3 = 84.1666...
    assert average_incremental_accuracy(LOWER) == pytest.approx(84.16666666666667)


def test_forgetting_lower_triangular():
    # f_0 = max(90, 80) - 70 = 20; f_1 = max(85) - 75 = 10; mean = 15.0
    assert forgetting(LOWER) == pytest.approx(15.0)


def test_backward_transfer_lower_triangular():
    # ((70 - 90) + (75 - 85)) / 2 = (-20 - 10) / 2 = -15.0
    assert backward_transfer(LOWER) == pytest.approx(-15.0)


def test_forgetting_uses_max_over_earlier_rows_not_diagonal():
    # f_0 = max(acc[0,0]=60, acc[1,0]=80) - 50 = 30; f_1 = max(70) - 65 = 5
    # mean = (30 + 5) / 2 = 17.5
    assert forgetting(IMPROVED) == pytest.approx(17.5)
    # A diagonal-only drop would give ((60-50) + (70-65)) / 2 = 7.5; BWT is its negative.
    # BWT = ((50 - 60) + (65 - 70)) / 2 = -7.5
    assert backward_transfer(IMPROVED) == pytest.approx(-7.5)
    assert forgetting(IMPROVED) != pytest.approx(-backward_transfer(IMPROVED))


def test_forgetting_ignores_rows_before_the_experience_was_trained():
    acc = FULL.copy()
    acc[0, 1] = 99.0  # evaluated before experience 1 was trained: must not count
    # f_0 = max(90, 85) - 80 = 10; f_1 = max(acc[1,1]=88) - 82 = 6 (not 99 - 82)
    # mean = (10 + 6) / 2 = 8.0
    assert forgetting(acc) == pytest.approx(8.0)


def test_forgetting_ignores_nan_in_the_max():
    acc = np.array(
        [
            [NAN, NAN, NAN],  # experience 0 was not evaluated after training it
            [80.0, 85.0, NAN],
            [70.0, 75.0, 95.0],
        ]
    )
    # f_0 = max(NaN, 80) - 70 = 10; f_1 = 85 - 75 = 10; mean = 10.0
    assert forgetting(acc) == pytest.approx(10.0)
    # BWT needs acc[0, 0], which is missing.
    assert backward_transfer(acc) is None


def test_full_matrix_with_baseline():
    # Final: (80 + 82 + 91) / 3 = 253 / 3 = 84.333...
    assert final_average_accuracy(FULL) == pytest.approx(84.33333333333333)
    # Only j <= i counts: A_0 = 90; A_1 = (85 + 88) / 2 = 86.5; A_2 = 253 / 3
    # (90 + 86.5 + 84.333...) / 3 = 260.8333... / 3 = 86.9444...
    assert average_incremental_accuracy(FULL) == pytest.approx(86.94444444444444)
    # f_0 = max(90, 85) - 80 = 10; f_1 = 88 - 82 = 6; mean = 8.0
    assert forgetting(FULL) == pytest.approx(8.0)
    # BWT = ((80 - 90) + (82 - 88)) / 2 = (-10 - 6) / 2 = -8.0
    assert backward_transfer(FULL) == pytest.approx(-8.0)
    # FWT = ((acc[0,1] - b[1]) + (acc[1,2] - b[2])) / 2 = ((30 - 25) + (40 - 33)) / 2 = 6.0
    assert forward_transfer(FULL, FULL_BASELINE) == pytest.approx(6.0)
    assert forward_transfer(FULL, np.array(FULL_BASELINE)) == pytest.approx(6.0)


def test_forward_transfer_none_cases():
    assert forward_transfer(FULL, None) is None
    # Lower-triangular matrix: acc[j-1, j] was never evaluated.
    assert forward_transfer(LOWER, FULL_BASELINE) is None
    # A missing baseline entry that is needed.
    assert forward_transfer(FULL, [10.0, None, 33.0]) is None
    # b[0] is never used, so it may be missing.
    assert forward_transfer(FULL, [None, 25.0, 33.0]) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(FULL, [10.0, 25.0])


def test_summarize_keys_and_values():
    result = summarize(FULL, FULL_BASELINE)
    assert set(result) == {
        "final_average_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "backward_transfer",
        "forward_transfer",
        "num_experiences",
    }
    assert result["num_experiences"] == 3
    assert result["forgetting"] == pytest.approx(8.0)
    assert result["forward_transfer"] == pytest.approx(6.0)
    assert summarize(LOWER)["forward_transfer"] is None


def test_single_experience_gives_none_for_transfer_metrics():
    acc = np.array([[75.0]])
    assert final_average_accuracy(acc) == pytest.approx(75.0)
    assert average_incremental_accuracy(acc) == pytest.approx(75.0)
    assert forgetting(acc) is None
    assert backward_transfer(acc) is None
    assert forward_transfer(acc, [10.0]) is None
    result = summarize(acc, [10.0])
    assert result["forgetting"] is None
    assert result["backward_transfer"] is None
    assert result["forward_transfer"] is None
    assert result["num_experiences"] == 1


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3)), np.zeros(3), np.zeros((2, 2, 2)), np.zeros((0, 0))],
)
def test_invalid_matrix_raises_value_error(bad):
    for fn in (final_average_accuracy, average_incremental_accuracy, forgetting, backward_transfer, summarize):
        with pytest.raises(ValueError):
            fn(bad)


def test_non_square_message_is_clear():
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        summarize(np.zeros((2, 3)))


# --------------------------------------------------------------------------
# Expected calibration error
# --------------------------------------------------------------------------


def test_ece_single_bin_known_value():
    # 10 samples, all at confidence 0.9 (one bin), 7 correct -> accuracy 0.7.
    # ECE = 1.0 * |0.7 - 0.9| = 0.2 -> 20.0 percent
    probs = torch.tensor([[0.9, 0.1]] * 10)
    targets = torch.tensor([0] * 7 + [1] * 3)
    assert expected_calibration_error(probs, targets) == pytest.approx(20.0)
    assert expected_calibration_error(probs.numpy(), targets.numpy()) == pytest.approx(20.0)


def test_ece_two_bins_weighted_by_size():
    # Bin at 0.9: 4 samples, 3 correct -> |0.75 - 0.9| = 0.15, weight 4/8
    # Bin at 0.6: 4 samples, 2 correct -> |0.5 - 0.6| = 0.10, weight 4/8
    # ECE = 0.5 * 0.15 + 0.5 * 0.10 = 0.125 -> 12.5 percent
    probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 4)
    targets = np.array([0, 0, 0, 1] + [1, 1, 0, 0])
    assert expected_calibration_error(probs, targets, n_bins=15) == pytest.approx(12.5)
    # With a single bin: |mean acc - mean conf| = |5/8 - 0.75| = 0.125 -> 12.5
    assert expected_calibration_error(probs, targets, n_bins=1) == pytest.approx(12.5)
    # Perfect calibration: confidence 1.0 and always right -> 0.
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0)


def test_ece_bins_are_right_closed():
    # Confidence exactly 0.5 with n_bins=2 falls in (0, 0.5], 0.75 in (0.5, 1].
    # Bin 1: conf 0.5, correct -> |1 - 0.5| = 0.5, weight 1/2
    # Bin 2: conf 0.75, wrong -> |0 - 0.75| = 0.75, weight 1/2
    # ECE = 0.25 + 0.375 = 0.625 -> 62.5 (a shared bin would give |0.5 - 0.625| = 12.5)
    probs = np.array([[0.5, 0.5], [0.75, 0.25]])
    targets = np.array([0, 1])
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(62.5)


def test_ece_validation():
    with pytest.raises(ValueError):
        expected_calibration_error(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError):
        expected_calibration_error(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        expected_calibration_error(np.zeros((3, 2)), np.zeros(3, dtype=int), n_bins=0)


# --------------------------------------------------------------------------
# AccuracyMatrix
# --------------------------------------------------------------------------


def test_accuracy_matrix_grows_and_summarises_written_rows():
    m = AccuracyMatrix(3)
    assert m.rows_written == 0
    with pytest.raises(ValueError):
        m.summary()
    m.set(0, 0, 90.0)
    m.set(1, 0, 80.0)
    m.set(1, 1, 85.0)
    assert m.rows_written == 2
    assert np.isnan(m.values[2]).all()
    np.testing.assert_array_equal(m.row(1), [80.0, 85.0, NAN])
    s = m.summary()
    # Leading 2 x 2 block [[90, -], [80, 85]]:
    # final = (80 + 85) / 2 = 82.5; AIA = (90 + 82.5) / 2 = 86.25
    # forgetting = 90 - 80 = 10; BWT = 80 - 90 = -10
    assert s["num_experiences"] == 2
    assert s["final_average_accuracy"] == pytest.approx(82.5)
    assert s["average_incremental_accuracy"] == pytest.approx(86.25)
    assert s["forgetting"] == pytest.approx(10.0)
    assert s["backward_transfer"] == pytest.approx(-10.0)
    assert s["forward_transfer"] is None


def test_accuracy_matrix_forward_transfer_within_written_rows():
    m = AccuracyMatrix(3)
    for i in range(2):
        for j in range(3):
            m.set(i, j, float(FULL[i, j]))
    s = m.summary(baseline=FULL_BASELINE)
    # k = 2: FWT = acc[0,1] - b[1] = 30 - 25 = 5.0
    assert s["forward_transfer"] == pytest.approx(5.0)
    for j in range(3):
        m.set(2, j, float(FULL[2, j]))
    assert m.summary(FULL_BASELINE) == pytest.approx(summarize(FULL, FULL_BASELINE))


def test_accuracy_matrix_values_is_a_copy():
    m = AccuracyMatrix(2)
    m.values[0, 0] = 50.0
    assert np.isnan(m.values[0, 0])


def test_accuracy_matrix_round_trip_with_nan():
    m = AccuracyMatrix(3)
    m.set(0, 0, 90.0)
    m.set(1, 0, 80.5)
    m.set(1, 1, 85.25)
    rows = m.to_list()
    assert rows == [[90.0, None, None], [80.5, 85.25, None], [None, None, None]]
    restored = AccuracyMatrix.from_list(json.loads(json.dumps(rows)))
    np.testing.assert_array_equal(restored.values, m.values)  # NaN compare equal here
    assert restored.rows_written == 2


def test_accuracy_matrix_validation():
    with pytest.raises(ValueError):
        AccuracyMatrix(0)
    m = AccuracyMatrix(2)
    with pytest.raises(ValueError, match="out of range"):
        m.set(2, 0, 50.0)
    with pytest.raises(ValueError, match="out of range"):
        m.set(0, -1, 50.0)
    with pytest.raises(ValueError):
        m.set(0, 0, 150.0)
    with pytest.raises(ValueError):
        m.set(0, 0, NAN)
    with pytest.raises(ValueError, match="out of range"):
        m.row(5)
    with pytest.raises(ValueError, match="square"):
        AccuracyMatrix.from_list([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError):
        AccuracyMatrix.from_list([])


def test_an_experience_without_test_images_is_left_out_not_zero():
    m = AccuracyMatrix(3)
    assert m.mark_empty(1) and not m.mark_empty(1)
    for i in range(3):
        for j in range(i + 1):
            m.set(i, j, NAN if j == 1 else 90.0 - 10 * (i - j))
    s = m.summary()
    assert s["empty_test_experiences"] == [1]
    assert s["final_average_accuracy"] == pytest.approx((70.0 + 90.0) / 2)  # not (70 + 0 + 90) / 3
    assert s["average_incremental_accuracy"] == pytest.approx((90.0 + 80.0 + 80.0) / 3)
    # forgetting and BWT are taken over the experiences that have test images, not refused
    assert s["forgetting"] == pytest.approx(90.0 - 70.0)
    assert s["backward_transfer"] == pytest.approx(70.0 - 90.0)
    # the empty experience survives a round trip through the checkpoint's lists
    assert AccuracyMatrix.from_list(m.to_list()).summary()["empty_test_experiences"] == [1]
    assert "empty_test_experiences" not in AccuracyMatrix.from_list([[50.0, None], [40.0, 60.0]]).summary()


def test_a_shared_test_set_in_column_zero_gives_forgetting_over_that_column():
    # new-instances streams evaluate one shared test set: the other columns are empty
    m = AccuracyMatrix(3)
    for j in (1, 2):
        m.mark_empty(j)
    for i, value in enumerate((60.0, 75.0, 70.0)):
        for j in range(i + 1):
            m.set(i, j, value if j == 0 else NAN)
    s = m.summary()
    assert s["forgetting"] == pytest.approx(75.0 - 70.0)
    assert s["backward_transfer"] == pytest.approx(70.0 - 60.0)
    assert s["final_average_accuracy"] == pytest.approx(70.0)


def test_summary_reports_run_notes():
    m = AccuracyMatrix(1)
    m.set(0, 0, 50.0)
    m.notes["skipped_nonfinite_steps"] = 3
    assert m.summary()["skipped_nonfinite_steps"] == 3


def test_a_run_leaves_an_experience_without_test_images_out_with_a_warning(tmp_path, make_config, caplog):
    from driftprompt.engine.plugins import Registered, discover
    from driftprompt.engine.run import build
    from driftprompt.streams.builtin import synthetic_class_incremental

    def one_empty(**options):
        stream = synthetic_class_incremental(**options)
        stream[1].test = stream[1].test.subset(torch.zeros(0, dtype=torch.long))
        return stream

    registry = discover()
    registry.streams["one_empty"] = Registered("one_empty", one_empty, "tests")
    config = make_config(eval={"batch_size": 64, "future": True})
    config = config.model_copy(update={"stream": config.stream.model_copy(update={"name": "one_empty"})})
    with build(config, run_dir=tmp_path / "run", registry=registry) as run:
        summary = run.fit()
    assert summary["empty_test_experiences"] == [1]
    assert summary["accuracy"][1][1] is None and summary["accuracy"][1][0] is not None
    assert summary["final_average_accuracy"] == summary["accuracy"][1][0]
    def strict(constant: str) -> None:
        raise AssertionError(f"summary.json holds {constant}, which is not JSON")

    written = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=strict)
    assert written["empty_test_experiences"] == [1] and written["baseline"][1] is None
    assert "Experience 1 has no test images" in caplog.text
