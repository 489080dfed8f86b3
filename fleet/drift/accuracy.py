"""Accuracy without labels: an estimate from the merged top-1 confidence histogram, calibrated on the release's
held-out rows, beside the accuracy measured from feedback where labels exist.

Most devices never learn the true label of what they classify, yet every telemetry window carries a 10-bin histogram
of top-1 confidence (:data:`agent.protocol.CONFIDENCE_BINS`). The model card of a release records, per file, how
many held-out rows fell in each of those bins and how many of them were correct (its ``calibration`` section,
:func:`fleet.examples.modelgen.calibration_table`). With ``acc_b`` the held-out accuracy of bin ``b`` and ``n_b``
the rows of a window (or of windows merged across devices) in it, the estimate is ``sum_b n_b * acc_b / N``: the
idea of NannyML's confidence-based performance estimation (CBPE), but from binned counts the device already sends,
so it needs no raw output and merges exactly.

What it assumes, and where it is blind: the accuracy of a row given its confidence bin is the held-out one. That
holds under covariate shift that moves rows between bins (noisy, occluded or unusual inputs lower the confidence,
and the estimate falls with it). It fails when the model is confidently wrong: a concept change (the labels mean
something else now) or inputs the model misreads with high confidence keep the histogram, and so the estimate, where
it was. The measured accuracy from feedback (:func:`measured_accuracy`) is the check on that blind spot.

Choices:

* **Smoothing** (:meth:`Calibration.bin_accuracy`). A good model puts nearly all held-out rows in the top bin and a
  handful in each of the others; a bin with 2 rows, both wrong, would say rows there are never correct. Each bin's
  accuracy is the mean of a Beta posterior whose prior is centred on the bin's midpoint confidence (a calibrated
  model's accuracy there) with :data:`PRIOR_ROWS` rows of weight: ``(correct + k * m) / (rows + k)``. A well-filled
  bin is its own count (420 rows: the prior moves it by under 0.5 %); an empty bin is its midpoint, which is what a
  calibrated model would give and never 0 or 1. Pooling empty bins with neighbours was the alternative; it makes a
  bin's value depend on which neighbour happens to be full, and still leaves 0/1 for a pool of a few rows.
* **Standard error** (:func:`estimated_accuracy`). What is estimated is the accuracy of *these rows*. Given the
  bins, the rows are independent Bernoulli(``acc_b``), so that spread is ``sum_b n_b acc_b (1 - acc_b) / N^2``;
  the ``acc_b`` themselves are known only from held-out counts, which adds ``sum_b (n_b / N)^2 var_b`` (``var_b``
  the Beta posterior's variance; bins independent). The second term does not shrink as a fleet merges more rows:
  a 450-row held-out set caps how precisely any estimate can be known (about 0.8 points for a 97 % model).
* **Drop** (:func:`accuracy_drop`). Like the rollout's KPI gates (:mod:`fleet.rollout.kpi`): a drop must be both
  significant (one-sided z of the estimate below the card's accuracy, at ``alpha``) and material (at least
  ``min_drop``), so neither a small noisy window nor a huge fleet with a harmless shift raises it.

Measured (``tests/test_drift_accuracy.py``: the good example's int8.onnx, held-out digits, seed 0):

* clean: the 450 held-out rows estimate 0.972 +- 0.009 against the card's 0.9733; over 50 windows of 500 rows
  resampled from them (seeded), the estimate is off the same rows' measured accuracy by 0.44 points on average and
  1.6 at worst (the issue's target: within 3), and no window raises :func:`accuracy_drop`. The calibration is from
  these same rows, so this is the estimator's noise, not a claim about unseen data.
* blanking 25 / 50 / 75 % of the pixels: measured 0.824 / 0.609 / 0.411, estimated 0.905 / 0.802 / 0.602
  (+- 0.022 / 0.040 / 0.073): monotone, and a drop at every level, but the estimate overstates the accuracy of
  corrupted rows (they are misread with more confidence than held-out rows of the same bin were). Gaussian noise
  (sigma 0.1 / 0.3 / 0.5, clipped to [0, 1]) is worse for it: measured 0.967 / 0.856 / 0.571, estimated
  0.964 / 0.910 / 0.872, flat beyond sigma 0.4 (measured once, not a test): so a flagged drop is a lower bound
  on the real one, and a shift that keeps confidence high is seen late or not at all.
* the shuffled-label example is unconfident rather than confidently wrong (382 of 450 rows at confidence 0.1-0.2):
  estimated 0.140 with its own table, 0.154 with the good release's, measured 0.138: caught.

Everything here is a pure function of integer counts: no I/O, and the same counts always give the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from agent.protocol import CONFIDENCE_BINS

#: Weight, in held-out rows, of the prior that pulls a bin's accuracy toward the bin's midpoint confidence. Two rows:
#: enough that a bin of 1-3 rows cannot read 0 or 1, little enough that a bin of a few dozen rows speaks for itself.
PRIOR_ROWS = 2.0


@dataclass(frozen=True)
class Calibration:
    """Held-out rows and correct rows per top-1 confidence bin, for one model file (the card's ``calibration``)."""

    rows: tuple[int, ...]
    correct: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.correct) or not self.rows:
            raise ValueError(f"rows and correct must be equally long and non-empty: {self.rows}, {self.correct}")
        for r, c in zip(self.rows, self.correct, strict=True):
            if not (_is_count(r) and _is_count(c) and c <= r):
                raise ValueError(f"each bin needs integers 0 <= correct <= rows, got correct {c} of {r}")

    @classmethod
    def from_card(cls, card: Mapping[str, Any], file: str) -> Calibration | None:
        """The calibration the card records for ``file``; None when it has none (an older card, another file, or a
        file that could not run when the card was made). Raises ValueError for a table that is there but malformed
        or binned differently from the telemetry: a wrong table must not give a plausible estimate."""
        section = card.get("calibration")
        entry = section.get(file) if isinstance(section, Mapping) else None
        if entry is None:
            return None
        if not isinstance(entry, Mapping) or entry.get("bins") != CONFIDENCE_BINS:
            raise ValueError(f"{file}: calibration must be {{'bins': {CONFIDENCE_BINS}, 'rows', 'correct'}}")
        rows, correct = entry.get("rows"), entry.get("correct")
        if not (isinstance(rows, list) and isinstance(correct, list) and len(rows) == len(correct) == CONFIDENCE_BINS):
            raise ValueError(f"{file}: calibration rows and correct must be {CONFIDENCE_BINS} counts each")
        return cls(tuple(rows), tuple(correct))

    @property
    def held_out(self) -> int:
        return sum(self.rows)

    def bin_accuracy(self) -> tuple[float, ...]:
        """Per bin, the smoothed accuracy ``(correct + k * m) / (rows + k)``: ``m`` the bin's midpoint confidence,
        ``k`` :data:`PRIOR_ROWS` (the mean of a Beta posterior; see the module docstring for why)."""
        a, b = self._posterior()
        return tuple((a / (a + b)).tolist())

    def bin_variance(self) -> tuple[float, ...]:
        """Per bin, the variance of that Beta posterior: how uncertain the held-out counts leave ``bin_accuracy``."""
        a, b = self._posterior()
        total = a + b
        return tuple((a * b / (total * total * (total + 1.0))).tolist())

    def _posterior(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.rows, dtype=np.float64)
        correct = np.asarray(self.correct, dtype=np.float64)
        midpoint = (np.arange(len(rows)) + 0.5) / len(rows)
        return correct + PRIOR_ROWS * midpoint, rows - correct + PRIOR_ROWS * (1.0 - midpoint)


def estimated_accuracy(confidence: Sequence[int], calibration: Calibration) -> tuple[float, float] | None:
    """``(estimate, standard error)`` of the accuracy of the rows counted in ``confidence`` (a window's, or windows
    merged across time and devices), from the held-out accuracy of each confidence bin. None for an empty
    histogram: no rows, no estimate. Raises ValueError for negative or non-integer counts, or a histogram binned
    differently from the calibration."""
    counts = list(confidence)
    if len(counts) != len(calibration.rows):
        raise ValueError(f"the histogram has {len(counts)} bins, the calibration {len(calibration.rows)}")
    if not all(_is_count(c) for c in counts):
        raise ValueError(f"confidence counts must be integers >= 0, got {counts}")
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total == 0:
        return None
    acc = np.asarray(calibration.bin_accuracy())
    var = np.asarray(calibration.bin_variance())
    share = n / total
    estimate = float(share @ acc)
    rows_spread = float(n @ (acc * (1.0 - acc))) / (total * total)  # Bernoulli rows, given their bins
    table_spread = float(share**2 @ var)  # the held-out counts' uncertainty about each bin's accuracy
    return estimate, math.sqrt(rows_spread + table_spread)


def measured_accuracy(feedback: Sequence[Sequence[int]]) -> tuple[float, int] | None:
    """``(accuracy, labelled rows)`` from confusion counts (rows: true label, columns: predicted, as the agent's
    ``feedback``): the diagonal over the total. None with no labelled row. Raises ValueError for a matrix that is
    not square or holds anything but non-negative integers."""
    matrix = [list(row) for row in feedback]
    if any(len(row) != len(matrix) for row in matrix):
        raise ValueError("feedback must be a square confusion matrix (true label x predicted label)")
    if not all(_is_count(c) for row in matrix for c in row):
        raise ValueError("feedback counts must be integers >= 0")
    labelled = sum(sum(row) for row in matrix)
    if labelled == 0:
        return None
    return sum(matrix[i][i] for i in range(len(matrix))) / labelled, labelled


def accuracy_drop(
    estimate: tuple[float, float], reference: float, *, alpha: float = 0.01, min_drop: float = 0.03
) -> bool:
    """Whether ``estimate`` (``(accuracy, standard error)``, from :func:`estimated_accuracy`) is below
    ``reference`` (the card's held-out accuracy for the file) both significantly (one-sided z-test at ``alpha``)
    and materially (by ``min_drop`` or more)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    value, se = estimate
    drop = reference - value
    if drop < min_drop or drop <= 0.0:
        return False
    if se <= 0.0:
        return True
    return bool(stats.norm.sf(drop / se) <= alpha)


def _is_count(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0
