"""Pure functions over the telemetry's fixed-bin histograms: one definition of a quantile, one merge of windows.

The device (probation), the fleet's CLI and its campaign gates all read the same counts, so they must agree on what
"p95 latency" of a set of rows is. A window holds counts per bucket, not the values, so a quantile is a bucket:

* :func:`bucket_quantile` returns the **upper edge of the bucket holding the row of rank** ``max(1, ceil(q * n))``
  (the nearest-rank method) among the ``n`` counted rows. ``q = 0`` is the smallest row's bucket, ``q = 1`` the
  largest's; a row in the overflow bucket (past the last edge) gives ``inf``. With no rows there is no quantile:
  the answer is ``None``, and each caller says what that means to it (the CLI prints "-"; probation has no latency
  evidence against a release).
* :func:`merge_windows` sums windows exactly: every field is an integer count with fixed bins.

Nothing here runs on the inference hot path: the aggregator histograms in batches (``agent.telemetry``), and these
functions read its results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

from agent.protocol import LATENCY_EDGES_MS

#: Confusion counts, present in a window only when feedback arrived.
FEEDBACK = "feedback"
_COUNT_LISTS = ("latency", "confidence", "classes")


def bucket_quantile(counts: Sequence[int], upper_edges: Sequence[float], q: float) -> float | None:
    """The upper edge of the bucket that holds quantile ``q`` of the counted rows (nearest rank), or None if empty.

    ``counts[i]`` is the number of rows in the bucket ending at ``upper_edges[i]``; ``counts`` may have one bucket
    more than there are edges, the overflow, whose upper edge is ``inf``. Raises ValueError for ``q`` outside
    [0, 1] or counts that do not fit the edges: a caller mixing up histograms must not get a plausible number.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be between 0 and 1, got {q}")
    if len(counts) not in (len(upper_edges), len(upper_edges) + 1):
        raise ValueError(f"{len(counts)} counts do not fit {len(upper_edges)} bucket edges")
    total = sum(counts)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    for bucket, cumulative in enumerate(accumulate(counts)):
        if cumulative >= rank:
            return float(upper_edges[bucket]) if bucket < len(upper_edges) else math.inf
    raise AssertionError("unreachable: the last cumulative count is the total")


def latency_quantile_ms(latency: Sequence[int], q: float) -> float | None:
    """:func:`bucket_quantile` of a window's ``latency`` counts (over ``LATENCY_EDGES_MS`` plus the overflow), in ms."""
    return bucket_quantile(latency, LATENCY_EDGES_MS, q)


def merge_windows(windows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum windows of one model and release into one window over their time span. Exact: counts are integers.

    Envelope fields (device, seq, dropped, health) are ignored; the result has the fields of
    :meth:`agent.telemetry.WindowAggregator.flush`. ``feedback`` is present if any input has it. Windows of
    different models or releases, or with differently shaped counts, raise ValueError: their bins need not mean
    the same thing.
    """
    items = list(windows)
    if not items:
        raise ValueError("no windows to merge")
    first = items[0]
    for w in items[1:]:
        if (w["model"], w["release"]) != (first["model"], first["release"]):
            raise ValueError(
                f"cannot merge windows of {w['model']}@{w['release']!r} into {first['model']}@{first['release']!r}"
            )
    merged: dict[str, Any] = {
        "model": first["model"],
        "release": first["release"],
        "window_start": min(w["window_start"] for w in items),
        "window_end": max(w["window_end"] for w in items),
        "count": sum(int(w["count"]) for w in items),
        "errors": sum(int(w["errors"]) for w in items),
    }
    for key in (*_COUNT_LISTS, "features"):
        merged[key] = _sum_counts(key, [w[key] for w in items])
    with_feedback = [w[FEEDBACK] for w in items if FEEDBACK in w]
    if with_feedback:
        merged[FEEDBACK] = _sum_counts(FEEDBACK, with_feedback)
    return merged


def _sum_counts(key: str, values: list[Any]) -> list[Any]:
    arrays = [np.asarray(v, dtype=np.int64) for v in values]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"{key}: windows have different shapes {sorted({a.shape for a in arrays})}")
    total: list[Any] = np.sum(arrays, axis=0, dtype=np.int64).tolist()
    return total
