"""The one quantile and the one merge of the telemetry's histograms, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from agent.histograms import bucket_quantile, latency_quantile_ms, merge_windows
from agent.protocol import CONFIDENCE_BINS, LATENCY_EDGES_MS

EDGES = (1.0, 2.0, 4.0)  # buckets (.., 1], (1, 2], (2, 4] and the overflow (4, ..)


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ((0, 10, 0, 0), 0.5, 2.0),  # every row in one bucket: every quantile is that bucket
        ((0, 10, 0, 0), 0.0, 2.0),  # q = 0 is the smallest row's bucket, not the first bucket
        ((0, 10, 0, 0), 1.0, 2.0),
        ((5, 5, 0, 0), 0.5, 1.0),  # rank ceil(0.5 * 10) = 5: the last row of the first bucket
        ((5, 5, 0, 0), 0.51, 2.0),  # rank 6
        ((94, 5, 1, 0), 0.95, 2.0),  # rank 95 of 100
        ((94, 5, 0, 1), 0.99, 2.0),  # rank 99
        ((94, 5, 0, 1), 1.0, math.inf),  # the largest row is in the overflow
        ((1, 0, 0, 0), 0.95, 1.0),  # one row: rank 1 for every q
        ((0, 0, 3), 1.0, 4.0),  # counts without an overflow bucket
    ],
)
def test_a_quantile_is_the_upper_edge_of_the_bucket_holding_the_nearest_rank(
    counts: tuple[int, ...], q: float, expected: float
) -> None:
    assert bucket_quantile(counts, EDGES, q) == expected


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0])
def test_no_rows_have_no_quantile(q: float) -> None:
    assert bucket_quantile((0, 0, 0, 0), EDGES, q) is None
    assert latency_quantile_ms([0] * (len(LATENCY_EDGES_MS) + 1), q) is None


def test_latency_quantiles_read_the_wire_buckets() -> None:
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[3], latency[10] = 90, 10  # 90 rows <= edge 3, 10 rows <= edge 10
    assert latency_quantile_ms(latency, 0.5) == LATENCY_EDGES_MS[3]
    assert latency_quantile_ms(latency, 0.9) == LATENCY_EDGES_MS[3]
    assert latency_quantile_ms(latency, 0.95) == LATENCY_EDGES_MS[10]
    latency[-1] = 1000  # most rows slower than the last edge
    assert latency_quantile_ms(latency, 0.95) == math.inf


def test_confidence_quantiles_use_the_same_function() -> None:
    edges = [(k + 1) / CONFIDENCE_BINS for k in range(CONFIDENCE_BINS)]
    confidence = [0] * CONFIDENCE_BINS
    confidence[9], confidence[4] = 80, 20  # 20 rows in [0.4, 0.5), 80 in [0.9, 1.0]
    assert bucket_quantile(confidence, edges, 0.2) == 0.5
    assert bucket_quantile(confidence, edges, 0.21) == 1.0


@pytest.mark.parametrize(("counts", "q"), [((1, 0, 0, 0), -0.1), ((1, 0, 0, 0), 1.5), ((1, 0), 0.5), ((1,) * 5, 0.5)])
def test_a_quantile_of_the_wrong_histogram_or_q_is_refused(counts: tuple[int, ...], q: float) -> None:
    with pytest.raises(ValueError):
        bucket_quantile(counts, EDGES, q)


def window(release: str, start: float, counts: int, feedback: bool = False) -> dict[str, object]:
    made: dict[str, object] = {
        "model": "m", "release": release, "window_start": start, "window_end": start + 1,
        "count": counts, "errors": 1, "latency": [counts, 0], "confidence": [0, counts - 1],
        "classes": [counts - 1, 0], "features": [[counts, 0, 0]],
    }  # fmt: skip
    if feedback:
        made["feedback"] = [[1, 0], [0, 1]]
    return made


def test_windows_merge_by_summing_every_count_over_their_span() -> None:
    merged = merge_windows([window("m:1", 10.0, 5), window("m:1", 11.0, 3, feedback=True), window("m:1", 9.0, 2)])
    assert merged == {
        "model": "m", "release": "m:1", "window_start": 9.0, "window_end": 12.0, "count": 10, "errors": 3,
        "latency": [10, 0], "confidence": [0, 7], "classes": [7, 0], "features": [[10, 0, 0]],
        "feedback": [[1, 0], [0, 1]],
    }  # fmt: skip
    assert "feedback" not in merge_windows([window("m:1", 10.0, 5)])


def test_merge_refuses_nothing_other_releases_and_other_shapes() -> None:
    with pytest.raises(ValueError, match="no windows"):
        merge_windows([])
    with pytest.raises(ValueError, match="cannot merge"):
        merge_windows([window("m:1", 1.0, 2), window("m:2", 1.0, 2)])
    wider = {**window("m:1", 1.0, 2), "latency": [2, 0, 0]}
    with pytest.raises(ValueError, match="latency: windows have different shapes"):
        merge_windows([window("m:1", 1.0, 2), wider])
