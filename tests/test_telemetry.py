"""Telemetry windows: exact counts against a plain numpy reference, exact merging, thread safety, wire size."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.histograms import merge_windows
from agent.protocol import CONFIDENCE_BINS, FEATURE_EXTRA_BINS, LATENCY_EDGES_MS, Kind
from agent.telemetry import WindowAggregator


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reference_features(edges: Sequence[Sequence[float]], inputs: np.ndarray) -> np.ndarray:
    """The documented layout, one feature at a time: underflow, bins, zero padding, overflow, NaN."""
    width = max(len(e) - 1 for e in edges) + FEATURE_EXTRA_BINS
    out = np.zeros((len(edges), width), np.int64)
    for i, e in enumerate(edges):
        e64 = np.asarray(e, np.float64)
        col = inputs[:, i].astype(np.float64)
        values = col[~np.isnan(col)]
        out[i, 0] = np.count_nonzero(values < e64[0])
        out[i, 1 : len(e64)] = np.histogram(values[(values >= e64[0]) & (values <= e64[-1])], bins=e64)[0]
        out[i, -2] = np.count_nonzero(values > e64[-1])
        out[i, -1] = np.count_nonzero(np.isnan(col))
    return out


def reference_confidence(probs: np.ndarray) -> list[int]:
    top = probs.max(axis=1).astype(np.float64)
    return np.histogram(top, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].tolist()


def random_edges(rng: np.random.Generator, n_features: int, max_bins: int = 8) -> list[list[float]]:
    """Edges that are mostly not float32-representable, so the exact float32/float64 comparison is exercised."""
    edges = []
    for i in range(n_features):
        n = max_bins + 1 if i == 0 else int(rng.integers(2, max_bins + 2))  # 1 .. max_bins bins, the first has max
        edges.append(np.sort(rng.choice(rng.normal(0, 3, size=64), size=n, replace=False)).tolist())
    return edges


def random_inputs(rng: np.random.Generator, edges: list[list[float]], rows: int) -> np.ndarray:
    """Normal data plus values on, just beside, below and above the edges, NaN and infinities."""
    x = rng.normal(0, 4, size=(rows, len(edges))).astype(np.float32)
    for i, e in enumerate(edges):
        specials = np.array([*e, e[0] - 1, e[-1] + 1, np.nan, np.inf, -np.inf, -0.0], np.float32)
        specials = np.concatenate([specials, np.nextafter(specials, np.float32(np.inf))])
        pick = rng.random(rows) < 0.3
        x[pick, i] = rng.choice(specials, size=int(pick.sum()))
    return x


def random_probs(rng: np.random.Generator, rows: int, n_classes: int) -> np.ndarray:
    return rng.dirichlet(np.full(n_classes, 0.3), size=rows).astype(np.float32)


def record_in_batches(agg: WindowAggregator, rng: np.random.Generator, inputs: np.ndarray, probs: np.ndarray) -> None:
    """Random batch sizes, so batches straddle the buffer and some exceed it."""
    start = 0
    while start < len(inputs):
        end = start + int(rng.choice([1, 3, 17, 100, 300]))
        agg.record(inputs[start:end], probs[start:end], 0.002)
        start = end


@pytest.mark.parametrize("max_bins", [1, 8, 40], ids=["one-bin", "digits-like", "wide-card"])
def test_feature_histograms_match_numpy_reference_with_nan_edges_and_out_of_range(max_bins: int) -> None:
    rng = np.random.default_rng(max_bins)
    edges = random_edges(rng, 12, max_bins)
    inputs = random_inputs(rng, edges, 2000)
    probs = random_probs(rng, 2000, 4)
    agg = WindowAggregator("m", "m:1", edges, 4, buffer_rows=64)

    record_in_batches(agg, rng, inputs, probs)
    window = agg.flush()

    assert np.array_equal(np.array(window["features"]), reference_features(edges, inputs))
    assert window["count"] == 2000
    assert all(sum(row) == 2000 for row in window["features"])


def test_feature_rows_pad_between_last_bin_and_fixed_overflow_and_nan_columns() -> None:
    agg = WindowAggregator("m", "", [[0.0, 1.0, 2.0, 3.0], [0.0, 10.0]], 2)
    inputs = np.array(
        [[-1.0, 5.0], [0.0, 10.0], [3.0, 10.5], [np.nan, -0.0], [2.5, np.inf]],
        np.float32,
    )
    agg.record(inputs, None, 0.001)
    assert agg.flush()["features"] == [
        # under, [0,1), [1,2), [2,3], over, NaN
        [1, 1, 0, 2, 0, 1],
        # under, [0,10], pad, pad, over, NaN
        [0, 3, 0, 0, 2, 0],
    ]


def test_latency_on_an_edge_counts_in_that_edges_bucket_and_once_per_batch_row() -> None:
    exact = [i for i, ms in enumerate(LATENCY_EDGES_MS) if (ms / 1000.0) * 1000.0 == ms]
    assert len(exact) > 10
    agg = WindowAggregator("m", "", [[0.0, 1.0]], 2)
    row = np.zeros((1, 1), np.float32)
    expected = [0] * (len(LATENCY_EDGES_MS) + 1)
    for i in exact:
        agg.record(row, None, LATENCY_EDGES_MS[i] / 1000.0)
        expected[i] += 1
        agg.record(row, None, LATENCY_EDGES_MS[i] * 1.001 / 1000.0)
        expected[i + 1] += 1
    agg.record(row, None, 0.0)
    expected[0] += 1
    agg.record(np.zeros((5, 1), np.float32), None, 3600.0)
    expected[-1] += 5

    window = agg.flush()
    assert window["latency"] == expected
    assert sum(window["latency"]) == window["count"]


def test_confidence_and_classes_count_successful_rows_and_errors_count_failed_rows() -> None:
    agg = WindowAggregator("m", "", [[0.0, 1.0]], 3)
    rows = np.zeros((4, 1), np.float32)
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.34, 0.33, 0.33]], np.float32)
    agg.record(rows, probs, 0.001)
    agg.record(rows[:2], None, 0.001)
    agg.record(rows[:3], probs[:3], 0.001, error=True)

    window = agg.flush()
    assert (window["count"], window["errors"]) == (9, 5)
    assert window["classes"] == [2, 1, 1]
    assert window["confidence"] == [0, 0, 0, 1, 0, 1, 0, 0, 0, 2]
    assert sum(window["confidence"]) == sum(window["classes"]) == window["count"] - window["errors"]


def test_confidence_and_classes_match_numpy_reference_for_random_probabilities() -> None:
    rng = np.random.default_rng(2)
    probs = random_probs(rng, 3000, 7)
    agg = WindowAggregator("m", "", [[0.0, 1.0]], 7, buffer_rows=100)
    record_in_batches(agg, rng, np.zeros((3000, 1), np.float32), probs)

    window = agg.flush()
    assert window["confidence"] == reference_confidence(probs)
    assert window["classes"] == np.bincount(probs.argmax(axis=1), minlength=7).tolist()


def test_feedback_confusion_is_sent_only_for_windows_that_received_feedback() -> None:
    agg = WindowAggregator("m", "", [[0.0, 1.0]], 3)
    for true, predicted in [(0, 0), (0, 0), (1, 2), (2, 2)]:
        agg.record_feedback(true, predicted)
    assert agg.flush()["feedback"] == [[2, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert "feedback" not in agg.flush()
    with pytest.raises(ValueError):
        agg.record_feedback(3, 0)


def test_flush_starts_the_next_window_at_now_and_an_empty_window_has_zero_counts() -> None:
    clock = FakeClock()
    agg = WindowAggregator("m", "m:2", [[0.0, 1.0, 2.0]], 2, clock=clock)
    agg.record(np.ones((2, 1), np.float32), np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), 0.001)
    clock.now += 60
    first = agg.flush()
    assert (first["window_start"], first["window_end"], first["count"]) == (1_700_000_000.0, 1_700_000_060.0, 2)

    second = agg.flush(now=1_700_000_120.0)
    assert (second["window_start"], second["window_end"]) == (1_700_000_060.0, 1_700_000_120.0)
    assert second["count"] == second["errors"] == 0
    assert not any(second["latency"]) and not any(second["confidence"]) and not any(second["classes"])
    assert second["features"] == [[0, 0, 0, 0, 0]]

    stepped_back = agg.flush(now=1_600_000_000.0)
    assert stepped_back["window_end"] == stepped_back["window_start"] == 1_700_000_120.0


def test_inputs_of_the_wrong_shape_are_refused_and_outputs_of_the_wrong_shape_count_as_errors() -> None:
    agg = WindowAggregator("m", "", [[0.0, 1.0], [0.0, 1.0]], 3)
    with pytest.raises(ValueError):
        agg.record(np.zeros((1, 3), np.float32), None, 0.001)
    agg.record(np.zeros((2, 2), np.float32), np.zeros((2, 1), np.float32), 0.001)
    window = agg.flush()
    assert window["count"] == window["errors"] == 2
    assert sum(window["classes"]) == 0
    with pytest.raises(ValueError):
        WindowAggregator("m", "", [[1.0, 1.0]], 3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 400), split=st.floats(0, 1))
def test_merging_two_windows_equals_one_window_over_the_concatenated_data(seed: int, rows: int, split: float) -> None:
    rng = np.random.default_rng(seed)
    edges = random_edges(rng, 5)
    inputs = random_inputs(rng, edges, rows)
    probs = random_probs(rng, rows, 4)
    failed = rng.random(rows) < 0.1
    latencies = rng.lognormal(-7, 2, size=rows)
    labels = rng.integers(0, 4, size=(rows, 2))
    cut = int(rows * split)
    clock = FakeClock(1000.0)

    def run(agg: WindowAggregator, part: slice) -> dict[str, object]:
        for i in range(rows)[part]:
            agg.record(inputs[i : i + 1], None if failed[i] else probs[i : i + 1], float(latencies[i]))
            if i % 3 == 0:
                agg.record_feedback(int(labels[i, 0]), int(labels[i, 1]))
        clock.now += 10
        return agg.flush()

    split_agg = WindowAggregator("m", "m:1", edges, 4, clock=clock, buffer_rows=16)
    halves = [run(split_agg, slice(0, cut)), run(split_agg, slice(cut, rows))]
    clock.now = 1000.0
    whole = run(WindowAggregator("m", "m:1", edges, 4, clock=clock, buffer_rows=16), slice(0, rows))
    whole["window_end"] += 10  # the split run ticked the clock twice

    assert merge_windows(halves) == whole


def test_merge_refuses_windows_of_different_releases() -> None:
    a = WindowAggregator("m", "m:1", [[0.0, 1.0]], 2).flush(now=2.0)
    b = WindowAggregator("m", "m:2", [[0.0, 1.0]], 2).flush(now=2.0)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_windows([a, b])


def test_concurrent_recording_from_threads_keeps_every_count_exact() -> None:
    rng = np.random.default_rng(3)
    edges = random_edges(rng, 16)
    threads_n, per_thread = 8, 1500
    inputs = random_inputs(rng, edges, threads_n * per_thread)
    probs = random_probs(rng, threads_n * per_thread, 5)
    agg = WindowAggregator("m", "", edges, 5, buffer_rows=128)
    barrier = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        barrier.wait()
        base = t * per_thread
        for i in range(base, base + per_thread, 3):
            if t % 2:
                agg.record(inputs[i : i + 3], probs[i : i + 3], 0.001)
            else:
                agg.record(inputs[i : i + 3], None, 0.001)
            agg.record_feedback(t % 5, 0)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    window = agg.flush()

    ok = np.concatenate([probs[t * per_thread : (t + 1) * per_thread] for t in range(1, threads_n, 2)])
    assert window["count"] == threads_n * per_thread
    assert window["errors"] == threads_n // 2 * per_thread
    assert np.array_equal(np.array(window["features"]), reference_features(edges, inputs))
    assert window["classes"] == np.bincount(ok.argmax(axis=1), minlength=5).tolist()
    assert window["confidence"] == reference_confidence(ok)
    assert sum(map(sum, window["feedback"])) == threads_n * per_thread // 3


def test_encoded_window_of_a_64_feature_digits_model_fits_in_2_kib() -> None:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(4)
    data = load_digits().data.astype(np.float32)
    lows, highs = data.min(axis=0), data.max(axis=0)
    edges = [np.linspace(lo, hi, 9).tolist() if hi > lo else [lo, lo + 1.0] for lo, hi in zip(lows, highs, strict=True)]
    agg = WindowAggregator("digits", "digits:1.4.0", edges, 10, clock=FakeClock())
    for i in range(600):
        row = data[i : i + 1] + rng.normal(0, 1.5, size=(1, 64)).astype(np.float32)  # drifted, so bins spread
        agg.record(row, random_probs(rng, 1, 10), float(rng.lognormal(-8, 1)), error=i % 97 == 0)
        agg.record_feedback(int(rng.integers(10)), int(rng.integers(10)))
    window = agg.flush(now=1_700_000_060.0)

    message = {
        "v": protocol.SCHEMA_VERSION,
        "device_id": "pi-kitchen-0042",
        "boot_id": "0123456789abcdef0123456789abcdef",
        "seq": 123_456,
        "dropped": 3,
        "health": {
            "cpu_percent": 37.5,
            "rss_bytes": 91_234_304,
            "disk_free_bytes": 12_345_678_912,
            "temperature_c": 51.2,
            "load1": 0.42,
        },
        **window,
    }
    payload = protocol.encode(Kind.TELEMETRY, message)
    assert protocol.decode(Kind.TELEMETRY, payload) == message
    assert len(payload) <= 2048, len(payload)


def test_the_hot_path_for_checked_calls_counts_exactly_what_record_counts() -> None:
    rng = np.random.default_rng(5)
    edges = random_edges(rng, 9)
    inputs = random_inputs(rng, edges, 700)
    inputs[np.isnan(inputs)] = 0.0  # calls the runtime layer completed have finite inputs
    probs = random_probs(rng, 700, 6)
    answers = {row.tobytes(): p for row, p in zip(inputs, probs, strict=True)}

    def predict(x: np.ndarray) -> np.ndarray:  # stands for a model: looks the rows' outputs up
        if (x == 1e9).any():
            raise LookupError("a model failure")
        return np.array([answers[row.tobytes()] for row in x], np.float32)

    checked, served = (WindowAggregator("m", "m:1", edges, 6, clock=FakeClock()) for _ in range(2))
    measured = served.measure(predict, LookupError, lambda exc: True)
    start = 0
    for size in [1, 5, 64, 1, 300, 29, 300]:
        checked.record(inputs[start : start + size], probs[start : start + size], 0.004)
        assert np.array_equal(measured(inputs[start : start + size]), probs[start : start + size])
        start += size
    with pytest.raises(LookupError):
        measured(np.full((2, 9), 1e9, np.float32))
    checked.record(np.full((2, 9), 1e9, np.float32), None, 0.004, error=True)

    on_the_hot_path, by_record = served.flush(), checked.flush()
    assert sum(on_the_hot_path.pop("latency")) == sum(by_record.pop("latency")) == 702  # timed, not 4 ms
    assert on_the_hot_path == by_record


def test_queued_inputs_stay_bounded_in_bytes_whatever_the_batch_size() -> None:
    agg = WindowAggregator("m", "", [[0.0, 1.0]] * 64, 3)
    big = np.zeros((512, 64), np.float32)  # 128 KiB a call
    measured = agg.measure(lambda x: np.zeros((len(x), 3), np.float32), LookupError, lambda exc: True)
    for _ in range(40):
        measured(big)
        assert sum(len(blob) for blob, _, _ in agg._pending) <= 16 * big.nbytes  # peeks: the queue is private
    assert agg.flush()["count"] == 40 * 512
