"""Continual-learning and calibration metrics.

All accuracies are in **percent** (0-100).

The central object is the *accuracy matrix* ``acc`` of shape ``(T, T)``, where
``acc[i, j]`` is the accuracy on the test split of experience ``j`` measured
right after training on experience ``i``. Entries that were not evaluated are
``NaN``. With the default evaluation protocol only the experiences seen so far
are evaluated, so the matrix is lower triangular (``NaN`` for ``j > i``); runs
that also evaluate future experiences fill the upper triangle as well.

Definitions and their sources:

* Final average accuracy: mean of the last row, as reported by L2P
  (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022) and
  DualPrompt (Wang et al., ECCV 2022).
* Average incremental accuracy: Rebuffi et al., "iCaRL: Incremental Classifier
  and Representation Learning", CVPR 2017.
* Forgetting: Chaudhry et al., "Riemannian Walk for Incremental Learning:
  Understanding Forgetting and Intransigence", ECCV 2018, in the
  "average forgetting after the last task" form used by L2P and DualPrompt.
* Backward and forward transfer (BWT, FWT): Lopez-Paz & Ranzato, "Gradient
  Episodic Memory for Continual Learning", NeurIPS 2017.
* Expected calibration error: Guo et al., "On Calibration of Modern Neural
  Networks", ICML 2017.

Missing (``NaN``) entries are handled as follows: accuracy averages use the
entries that were evaluated; forgetting ignores ``NaN`` when taking its maximum
over earlier rows; a difference-based metric (forgetting, BWT, FWT) is ``None``
when an entry it needs was never evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "AccuracyMatrix",
    "average_incremental_accuracy",
    "backward_transfer",
    "expected_calibration_error",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "summarize",
]

SUMMARY_KEYS: tuple[str, ...] = (
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "num_experiences",
)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _as_matrix(acc: Any) -> np.ndarray:
    """Converts ``acc`` to a square float64 matrix, validating its shape.

    Args:
        acc: An array-like accuracy matrix.

    Returns:
        The matrix as a float64 numpy array (a view or a copy of ``acc``).

    Raises:
        ValueError: If ``acc`` is not a non-empty square 2-D matrix.
    """
    try:
        mat = np.asarray(acc, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"The accuracy matrix must be a numeric 2-D array, but it could not be converted ({exc})."
        ) from exc
    if mat.ndim != 2:
        raise ValueError(
            f"The accuracy matrix must be 2-D of shape (T, T), but it has {mat.ndim} dimension(s)."
        )
    if mat.shape[0] != mat.shape[1]:
        raise ValueError(
            f"The accuracy matrix must be square of shape (T, T), but it has shape {mat.shape}."
        )
    if mat.shape[0] == 0:
        raise ValueError("The accuracy matrix must cover at least one experience, but it is empty.")
    return mat


def _as_baseline(baseline: Any, num_experiences: int) -> np.ndarray:
    """Converts a baseline accuracy vector to float64, validating its length.

    Args:
        baseline: Array-like of per-experience accuracies (``None`` entries
            become ``NaN``).
        num_experiences: The number ``T`` of experiences in the matrix.

    Returns:
        The first ``num_experiences`` baseline entries as a float64 array.

    Raises:
        ValueError: If the baseline is not 1-D or shorter than ``T``.
    """
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.detach().to("cpu", torch.float64).numpy()
    elif not isinstance(baseline, np.ndarray):
        baseline = [math.nan if v is None else v for v in baseline]
    vec = np.asarray(baseline, dtype=np.float64)
    if vec.ndim != 1:
        raise ValueError(f"The baseline must be a 1-D vector of accuracies, but it has shape {vec.shape}.")
    if vec.shape[0] < num_experiences:
        raise ValueError(
            f"The baseline needs one accuracy per experience ({num_experiences}), "
            f"but it has only {vec.shape[0]}."
        )
    return vec[:num_experiences]


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries of ``values`` (NaN if there are none)."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan
    return float(finite.mean())


# ----------------------------------------------------------------------------
# Accuracy-matrix metrics
# ----------------------------------------------------------------------------


def final_average_accuracy(acc: np.ndarray) -> float:
    """Average accuracy over all experiences after training on the last one.

    ``A_T = mean_{j=0..T-1} acc[T-1, j]``, the "average accuracy" reported by
    L2P (Wang et al., CVPR 2022) and DualPrompt (Wang et al., ECCV 2022).
    Entries of the last row that were not evaluated (``NaN``) are left out.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.

    Returns:
        The final average accuracy in percent.

    Raises:
        ValueError: If ``acc`` is not square 2-D, or its last row has no
            evaluated entry.
    """
    mat = _as_matrix(acc)
    value = _nanmean(mat[-1, :])
    if math.isnan(value):
        raise ValueError("The last row of the accuracy matrix has no evaluated experience.")
    return value


def average_incremental_accuracy(acc: np.ndarray) -> float:
    """Average incremental accuracy (Rebuffi et al., iCaRL, CVPR 2017).

    ``AIA = (1/T) sum_{i=0..T-1} A_i`` with ``A_i = mean_{j<=i} acc[i, j]``, the
    accuracy on all experiences seen so far after training experience ``i``.
    Only the seen part ``j <= i`` of each row is used, even if future
    experiences were evaluated. ``NaN`` entries are left out of ``A_i``, and
    a row without any evaluated seen experience is left out of the outer mean.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.

    Returns:
        The average incremental accuracy in percent.

    Raises:
        ValueError: If ``acc`` is not square 2-D or has no evaluated entry on
            or below the diagonal.
    """
    mat = _as_matrix(acc)
    steps = [_nanmean(mat[i, : i + 1]) for i in range(mat.shape[0])]
    steps = [a for a in steps if not math.isnan(a)]
    if not steps:
        raise ValueError("The accuracy matrix has no evaluated entry on or below its diagonal.")
    return float(np.mean(steps))


def forgetting(acc: np.ndarray, skip: Iterable[int] = ()) -> float | None:
    """Average forgetting after the last experience (Chaudhry et al., 2018).

    For each earlier experience ``j < T-1``::

        f_j = max_{l = j..T-2} acc[l, j]  -  acc[T-1, j]

    i.e. the drop from the best accuracy ever observed on ``j`` while it was a
    seen experience (rows ``l >= j``; ``NaN`` entries ignored) to its final
    accuracy. The result is ``mean_{j<T-1} f_j``, as used by L2P and
    DualPrompt. Rows ``l < j`` (evaluations before ``j`` was trained) never
    count. Higher values mean more forgetting.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.
        skip: experiences left out of the mean, such as those with no test
            images (an Avalanche new-instances benchmark evaluates its one
            shared test set in column 0 and leaves the other columns empty).

    Returns:
        The average forgetting in percentage points, or ``None`` when
        ``T < 2`` or an entry it needs was never evaluated (a final accuracy
        ``acc[T-1, j]``, or every ``acc[l, j]`` for ``l = j..T-2``).

    Raises:
        ValueError: If ``acc`` is not a square 2-D matrix.
    """
    mat = _as_matrix(acc)
    num = mat.shape[0]
    if num < 2:
        return None
    drops = []
    skipped = set(skip)
    for j in range(num - 1):
        if j in skipped:
            continue
        history = mat[j : num - 1, j]
        history = history[~np.isnan(history)]
        final = mat[num - 1, j]
        if history.size == 0 or math.isnan(final):
            return None
        drops.append(float(history.max()) - float(final))
    return float(np.mean(drops)) if drops else None


def backward_transfer(acc: np.ndarray, skip: Iterable[int] = ()) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017).

    ``BWT = (1/(T-1)) sum_{j=0..T-2} (acc[T-1, j] - acc[j, j])``. Negative
    values indicate forgetting; positive values mean later training improved
    earlier experiences.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.
        skip: experiences left out of the mean (see :func:`forgetting`).

    Returns:
        The backward transfer in percentage points, or ``None`` when
        ``T < 2`` or a needed entry is ``NaN``.

    Raises:
        ValueError: If ``acc`` is not a square 2-D matrix.
    """
    mat = _as_matrix(acc)
    num = mat.shape[0]
    if num < 2:
        return None
    skipped = set(skip)
    idx = np.array([j for j in range(num - 1) if j not in skipped], dtype=np.int64)
    if idx.size == 0:
        return None
    diffs = mat[num - 1, idx] - mat[idx, idx]
    if np.isnan(diffs).any():
        return None
    return float(diffs.mean())


def forward_transfer(acc: np.ndarray, baseline: Sequence[float | None] | np.ndarray | None) -> float | None:
    """Forward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017).

    ``FWT = (1/(T-1)) sum_{j=1..T-1} (acc[j-1, j] - b[j])`` where ``b[j]`` is
    the accuracy on experience ``j`` of the model before any training (the
    untrained / initial model), so ``acc[j-1, j]`` must come from a run that
    also evaluates future experiences.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.
        baseline: Per-experience accuracies ``b`` of the untrained model, in
            percent, with at least ``T`` entries (extra entries are ignored;
            ``b[0]`` is not used). ``None`` if unavailable.

    Returns:
        The forward transfer in percentage points, or ``None`` when
        ``T < 2``, ``baseline`` is ``None``, or a needed entry
        (``acc[j-1, j]`` or ``b[j]``) is ``NaN``.

    Raises:
        ValueError: If ``acc`` is not a square 2-D matrix, or ``baseline`` is
            not 1-D or shorter than ``T``.
    """
    mat = _as_matrix(acc)
    num = mat.shape[0]
    if baseline is None:
        return None
    base = _as_baseline(baseline, num)
    if num < 2:
        return None
    idx = np.arange(1, num)
    diffs = mat[idx - 1, idx] - base[idx]
    if np.isnan(diffs).any():
        return None
    return float(diffs.mean())


def summarize(
    acc: np.ndarray,
    baseline: Sequence[float | None] | np.ndarray | None = None,
    skip: Iterable[int] = (),
) -> dict[str, float | None]:
    """Computes every accuracy-matrix metric at once.

    Args:
        acc: Accuracy matrix of shape ``(T, T)`` in percent.
        baseline: Optional untrained-model accuracies for forward transfer
            (see :func:`forward_transfer`).
        skip: experiences with no test images, left out of forgetting and
            backward transfer.

    Returns:
        A dict with keys ``"final_average_accuracy"``,
        ``"average_incremental_accuracy"``, ``"forgetting"``,
        ``"backward_transfer"``, ``"forward_transfer"`` (floats in percent or
        ``None``) and ``"num_experiences"`` (the integer ``T``).

    Raises:
        ValueError: If ``acc`` is not a valid accuracy matrix (see the
            individual metrics).
    """
    mat = _as_matrix(acc)
    return {
        "final_average_accuracy": final_average_accuracy(mat),
        "average_incremental_accuracy": average_incremental_accuracy(mat),
        "forgetting": forgetting(mat, skip),
        "backward_transfer": backward_transfer(mat, skip),
        "forward_transfer": forward_transfer(mat, baseline),
        "num_experiences": int(mat.shape[0]),
    }


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Converts a tensor or array-like to a numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float64)
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` could not be converted to an array ({exc}).") from exc


def expected_calibration_error(
    probs: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray | Sequence[int],
    n_bins: int = 15,
) -> float:
    """Expected calibration error (Guo et al., ICML 2017).

    The confidence of a prediction is its maximum class probability and the
    prediction is the arg-max class. Predictions are grouped into ``n_bins``
    equal-width confidence bins ``(b/n, (b+1)/n]`` (a confidence of exactly 0
    falls in the first bin) and::

        ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean_confidence(B_b)|

    Args:
        probs: Class probabilities of shape ``(N, C)`` (e.g. a softmax output).
        targets: Integer class labels of shape ``(N,)``.
        n_bins: Number of equal-width confidence bins.

    Returns:
        The ECE in percent (0-100).

    Raises:
        ValueError: On empty input, mismatched shapes, or ``n_bins < 1``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, but got {n_bins!r}.")
    p = _to_numpy(probs, "probs").astype(np.float64, copy=False)
    y = _to_numpy(targets, "targets")
    if p.ndim != 2:
        raise ValueError(f"`probs` must have shape (N, C), but it has shape {p.shape}.")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(
            f"`targets` must have shape ({p.shape[0]},) to match `probs`, but it has shape {y.shape}."
        )
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError("`probs` must contain at least one sample and one class.")

    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y.astype(np.int64)).astype(np.float64)
    upper_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:]
    # First upper edge >= confidence, i.e. bins are right-closed (lo, hi].
    bins = np.clip(np.searchsorted(upper_edges, confidence, side="left"), 0, n_bins - 1)

    total = float(confidence.shape[0])
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        count = int(mask.sum())
        if count == 0:
            continue
        gap = abs(float(correct[mask].mean()) - float(confidence[mask].mean()))
        ece += (count / total) * gap
    return 100.0 * ece


# ----------------------------------------------------------------------------
# Incrementally filled accuracy matrix
# ----------------------------------------------------------------------------


class AccuracyMatrix:
    """An accuracy matrix that is filled in as experiences are evaluated.

    ``acc[i, j]`` holds the accuracy (percent) on experience ``j`` after
    training experience ``i``; unset entries are ``NaN``.

    Example:
        >>> m = AccuracyMatrix(3)
        >>> m.set(0, 0, 90.0)
        >>> m.set(1, 0, 80.0)
        >>> m.set(1, 1, 85.0)
        >>> m.summary()["forgetting"]
        10.0
    """

    def __init__(self, num_experiences: int) -> None:
        """Creates an empty matrix.

        Args:
            num_experiences: The number ``T`` of experiences in the stream.

        Raises:
            ValueError: If ``num_experiences`` is not a positive integer.
        """
        if (
            isinstance(num_experiences, bool)
            or not isinstance(num_experiences, (int, np.integer))
            or num_experiences < 1
        ):
            raise ValueError(f"`num_experiences` must be a positive integer, but got {num_experiences!r}.")
        self._acc = np.full((int(num_experiences), int(num_experiences)), np.nan, dtype=np.float64)
        self.empty: set[int] = set()
        """Experiences whose test split holds no image: their entries stay ``NaN``."""
        self.notes: dict[str, Any] = {}
        """Run facts that :meth:`summary` reports too (e.g. ``skipped_nonfinite_steps``)."""

    def mark_empty(self, evaluated: int) -> bool:
        """Records that experience ``evaluated`` has no test image, so it has no accuracy.

        Its entries stay ``NaN``: the accuracy averages leave it out, and a difference-based
        metric that needs it is ``None``. :meth:`summary` lists it under
        ``"empty_test_experiences"``.

        Returns:
            ``True`` the first time the experience is marked.
        """
        j = self._check_index(evaluated, "evaluated")
        new = j not in self.empty
        self.empty.add(j)
        return new

    @property
    def num_experiences(self) -> int:
        """The number ``T`` of experiences (matrix side length)."""
        return int(self._acc.shape[0])

    @property
    def values(self) -> np.ndarray:
        """A copy of the ``(T, T)`` matrix, ``NaN`` where unset."""
        return self._acc.copy()

    @property
    def rows_written(self) -> int:
        """``k``: one plus the index of the last row holding any value (0 if empty)."""
        written = np.flatnonzero(~np.isnan(self._acc).all(axis=1))
        return int(written[-1]) + 1 if written.size else 0

    def _check_index(self, index: int, name: str) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"`{name}` must be an integer experience index, but got {index!r}.")
        if not 0 <= index < self.num_experiences:
            raise ValueError(
                f"`{name}` index {index} is out of range for {self.num_experiences} experience(s)."
            )
        return int(index)

    def set(self, trained: int, evaluated: int, value: float) -> None:
        """Records the accuracy on ``evaluated`` after training ``trained``.

        Args:
            trained: Index ``i`` of the experience just trained.
            evaluated: Index ``j`` of the experience evaluated.
            value: Accuracy in percent, within ``[0, 100]`` (``None`` or ``NaN`` for
                an experience marked with :meth:`mark_empty`).

        Raises:
            ValueError: If an index is out of range or ``value`` is not a
                finite number within ``[0, 100]``.
        """
        i = self._check_index(trained, "trained")
        j = self._check_index(evaluated, "evaluated")
        if isinstance(value, torch.Tensor):
            value = value.item()
        if j in self.empty and (value is None or (isinstance(value, float) and math.isnan(value))):
            return  # no test image: nothing to record
        try:
            val = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"The accuracy must be a number, but got {value!r}.") from exc
        if not math.isfinite(val) or not 0.0 <= val <= 100.0:
            raise ValueError(f"The accuracy must be a finite percentage within [0, 100], but got {val!r}.")
        self._acc[i, j] = val

    def row(self, i: int) -> np.ndarray:
        """Returns a copy of row ``i`` (accuracies after training experience ``i``).

        Raises:
            ValueError: If ``i`` is out of range.
        """
        return self._acc[self._check_index(i, "row"), :].copy()

    def to_list(self) -> list[list[float | None]]:
        """Returns the matrix as nested lists with ``None`` for ``NaN`` (JSON-safe)."""
        return [[None if math.isnan(v) else float(v) for v in row] for row in self._acc.tolist()]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> AccuracyMatrix:
        """Rebuilds a matrix from :meth:`to_list` output.

        Args:
            rows: A square nested list; ``None`` (or ``NaN``) marks unset entries.

        Returns:
            A new :class:`AccuracyMatrix`.

        Raises:
            ValueError: If ``rows`` is not square or holds invalid accuracies.
        """
        if isinstance(rows, np.ndarray):
            rows = rows.tolist()
        rows = list(rows)
        num = len(rows)
        if num == 0:
            raise ValueError("The accuracy matrix must cover at least one experience, but the list is empty.")
        checked = []
        for i, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) != num:
                raise ValueError(
                    f"The accuracy matrix must be square ({num} x {num}), but row {i} does not have {num} entries."
                )
            checked.append(list(row))
        matrix = cls(num)
        for i, row in enumerate(checked):
            for j, value in enumerate(row):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                matrix.set(i, j, value)
        # A seen experience is always evaluated; one without a value in any row that had
        # seen it (while later rows were written) had no test image.
        k = matrix.rows_written
        for j in range(k - 1):
            if np.isnan(matrix._acc[j:k, j]).all():
                matrix.empty.add(j)
        return matrix

    def summary(self, baseline: Sequence[float | None] | np.ndarray | None = None) -> dict[str, float | None]:
        """Summarises the experiences trained so far.

        With ``k`` = :attr:`rows_written`, metrics are computed on the leading
        ``k x k`` block (so forward transfer uses ``acc[j-1, j]`` for
        ``1 <= j < k``), and ``"num_experiences"`` is ``k``.

        Args:
            baseline: Optional untrained-model accuracies (at least ``k``
                entries; typically all ``T``) for forward transfer.

        Returns:
            The :func:`summarize` dict for the leading block, plus
            ``"empty_test_experiences"`` (when an experience had no test image)
            and the entries of :attr:`notes`.

        Raises:
            ValueError: If no value has been recorded yet.
        """
        k = self.rows_written
        if k == 0:
            raise ValueError("The accuracy matrix is empty; record at least one accuracy before summarising.")
        if baseline is not None:
            baseline = _as_baseline(baseline, k)
        out: dict[str, Any] = summarize(self._acc[:k, :k], baseline, skip=self.empty)
        if self.empty:
            out["empty_test_experiences"] = sorted(self.empty)
        out.update(self.notes)
        return out

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_experiences={self.num_experiences}, rows_written={self.rows_written})"
