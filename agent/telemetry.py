"""Per-model telemetry windows, aggregated on the device so raw inputs never leave it.

The hot path (:meth:`WindowAggregator.measure`, about 0.25 µs a call) only queues the call's bytes; the queue is
histogrammed in one vectorized pass by :meth:`WindowAggregator.drain` (the agent calls it from its reactor, off the
hot path), when the queue fills, or at :meth:`WindowAggregator.flush`.
Everything a window holds is an integer count with fixed bins, so windows merge exactly by summing
(:func:`agent.histograms.merge_windows`), across time and across devices.

Conventions (the fleet relies on them):

* ``count`` is the number of input rows (inferences). Each row of a batch is counted once everywhere: the latency
  of a ``record`` call is added once per row of its batch, so ``sum(latency) == count`` always.
* ``errors`` counts rows whose inference failed. Failed rows are in ``count``, ``latency`` and ``features`` (the
  input distribution is what drift watches, and a failing input may be the drifted one), not in ``confidence`` or
  ``classes``, so ``sum(confidence) == sum(classes) == count - errors``.
* ``latency``: bucket ``i`` counts latencies in ``(LATENCY_EDGES_MS[i-1], LATENCY_EDGES_MS[i]]``; the last bucket
  is the overflow.
* ``confidence``: top-1 probability ``p`` lands in bin ``min(floor(clip(p, 0, 1) * CONFIDENCE_BINS), bins - 1)``;
  a NaN probability counts as 0 (no confidence).
* ``features``: one row per feature, all rows ``W = max bins + FEATURE_EXTRA_BINS`` wide. Column 0 is the
  underflow (``x < edges[0]``), columns ``1..bins_i`` the feature's own bins (``[e_k, e_k+1)``, the last one closed
  ``[e_-2, e_-1]``, as ``numpy.histogram``), then zero padding for features with fewer bins than the widest, then
  column ``W-2`` the overflow (``x > edges[-1]``, including +inf) and column ``W-1`` NaN. Overflow and NaN therefore
  sit at fixed columns. Values are binned as float32 (the model's input dtype); comparisons against the float64
  edges are exact.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.histograms import FEEDBACK
from agent.protocol import CONFIDENCE_BINS, FEATURE_EXTRA_BINS, LATENCY_EDGES_MS

#: Each feature value is binned by counting the thresholds it passes: its feature's ``edges[:-1]`` as ">=" and
#: ``edges[-1]`` as ">" (both rounded up to float32, which keeps float32-vs-float64 comparisons exact). Up to this
#: many thresholds per feature, that count is one vectorized comparison of the whole block per threshold rank; it
#: beat the search below up to ~130 thresholds (x86, 256 x 64 block: 126 vs 436 µs at 9, 1.9 vs 1.1 ms at 256).
#: Wider cards use one np.searchsorted over all features at once.
_LINEAR_MAX_THRESHOLDS = 128
#: For the search, each value becomes an order-preserving integer key of its float32 bits, shifted by
#: ``feature index * _KEY_SPAN`` so that features occupy disjoint key ranges. Keys of one feature stay within
#: +-2**31, so a span of 2**33 leaves room for a per-feature sentinel at +2**32 that keeps one feature's overflow
#: apart from the next feature's underflow.
_KEY_SPAN = 1 << 33
#: Bytes of inputs queued before the caller of record() drains the queue itself (unless buffer_rows says otherwise):
#: 1,024 rows of a 64-feature model, over which a drain's fixed cost is spread thin (0.1 µs per row against 0.35 at
#: 64 rows), yet little memory for a small device.
_QUEUE_BYTES = 1 << 18
#: Rows x features x thresholds compared per step of the linear binning: 1 MB of float32 stays in cache.
_CHUNK_CELLS = 1 << 18
_SENTINEL = 1 << 32

_LATENCY_EDGES = np.asarray(LATENCY_EDGES_MS, np.float64)


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to int64 keys with the same order (NaN excluded); -0.0 and +0.0 get the same key."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _f32_at_or_above(edges: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 edge: for float32 x, ``x >= edge`` iff ``x >= result``."""
    rounded = edges.astype(np.float32)
    return np.where(rounded.astype(np.float64) < edges, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _f32_above(edges: np.ndarray) -> np.ndarray:
    """The smallest float32 > each float64 edge: for float32 x, ``x > edge`` iff ``x >= result``."""
    ceil = _f32_at_or_above(edges)
    return np.where(ceil.astype(np.float64) == edges, np.nextafter(ceil, np.float32(np.inf)), ceil)


@dataclass(frozen=True)
class Totals:
    """A model's counts since its aggregator was built (for the agent: since the model was activated)."""

    count: int
    errors: int
    #: Rows per latency bucket, over ``LATENCY_EDGES_MS`` plus the overflow, as in a window
    #: (:func:`agent.histograms.latency_quantile_ms` reads it).
    latency: tuple[int, ...]


class WindowAggregator:
    """Aggregates one model's inferences into telemetry windows. Thread-safe; ``record`` costs a few µs."""

    def __init__(
        self,
        model: str,
        release: str,
        feature_edges: Sequence[Sequence[float]],
        n_classes: int,
        *,
        clock: Callable[[], float] = time.time,
        buffer_rows: int | None = None,
    ) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if buffer_rows is not None and buffer_rows < 1:
            raise ValueError(f"buffer_rows must be >= 1, got {buffer_rows}")
        edges = [np.asarray(e, dtype=np.float64) for e in feature_edges]
        if not edges:
            raise ValueError("feature_edges is empty: a model needs at least one input feature")
        for i, e in enumerate(edges):
            if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
                raise ValueError(f"feature {i}: bin edges must be >= 2 finite, strictly increasing numbers")
        self.model = model
        self.release = release
        self.n_classes = n_classes
        self.n_features = len(edges)
        self.width = max((e.size - 1 for e in edges), default=0) + FEATURE_EXTRA_BINS
        self._clock = clock
        self._lock = threading.Lock()

        thresholds = [np.concatenate([_f32_at_or_above(e[:-1]), _f32_above(e[-1:])]) for e in edges]
        n_thresholds = self.width - 2
        self._cell_offsets = np.arange(self.n_features, dtype=np.intp) * self.width
        if n_thresholds <= _LINEAR_MAX_THRESHOLDS:
            # [thresholds, features]; a feature's missing thresholds repeat its last one, so an overflowing value
            # passes all of them and lands in column width - 2, and every other value in its own column.
            padded = [np.pad(t, (0, n_thresholds - t.size), mode="edge") for t in thresholds]
            self._thresholds: np.ndarray | None = np.array(padded, np.float32).reshape(-1, n_thresholds).T.copy()
        else:
            # Feature i's keys sit at positions s_i .. s_i + m_i - 1, its sentinel at s_i + m_i. A value's position
            # is s_i + (thresholds passed); ``_position_cell`` maps it to its cell in the [features, width] matrix.
            self._thresholds = None
            self._key_offsets = np.arange(self.n_features, dtype=np.int64) * _KEY_SPAN
            self._edge_keys = np.concatenate(
                [np.append(_sort_keys(t), _SENTINEL) + i * _KEY_SPAN for i, t in enumerate(thresholds)]
            )
            columns = [np.append(np.arange(t.size), n_thresholds) for t in thresholds]
            self._position_cell = np.concatenate(columns) + np.repeat(
                self._cell_offsets, [t.size + 1 for t in thresholds]
            )

        #: Queued calls: (input rows, float32 bytes; outputs, float32 bytes, None if the call failed; latency in s).
        self._pending: list[tuple[bytes, bytes | None, float]] = []
        self._row_bytes = 4 * self.n_features
        self._chunk_rows = max(1, _CHUNK_CELLS // (n_thresholds * self.n_features))
        self._queued = 0  # bytes of inputs queued; updated without a lock, so approximate under threads
        self._max_queued = self._row_bytes * (buffer_rows or max(1, _QUEUE_BYTES // self._row_bytes))
        self._total_count = 0
        self._total_errors = 0
        self._total_latency = np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)
        self._reset(clock())

    def _reset(self, start: float) -> None:
        self._window_start = start
        self._count = 0
        self._errors = 0
        self._latency = np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)
        self._confidence = np.zeros(CONFIDENCE_BINS, np.int64)
        self._classes = np.zeros(self.n_classes, np.int64)
        self._cells = np.zeros(self.n_features * self.width, np.int64)
        self._nan = np.zeros(self.n_features, np.int64)
        self._feedback: np.ndarray | None = None

    def record(self, inputs: np.ndarray, probs: np.ndarray | None, latency_s: float, error: bool = False) -> None:
        """Account one inference call on a batch: ``inputs`` [batch, features], ``probs`` [batch, classes].

        Checks and converts what it is given: ``probs`` None, ``error`` True, or ``probs`` of the wrong shape mark
        every row of the batch as failed; inputs that are not [batch, features] numbers raise ValueError. For calls
        the runtime layer checks, :meth:`measure` is the cheaper way in.
        """
        try:
            rows = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"inputs must be numbers [batch, {self.n_features}]: {exc}") from None
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"inputs must be [batch, {self.n_features}], got {rows.shape}")
        outputs = None
        if not error and probs is not None and np.shape(probs) == (len(rows), self.n_classes):
            outputs = np.asarray(probs, dtype=np.float32).tobytes()
        self._queue(rows.tobytes(), outputs, latency_s)

    def measure(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        errors: type[Exception],
        counted: Callable[[Exception], bool],
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``predict`` with every call timed and accounted here: the agent's hot path.

        ``predict`` must be a checked runtime call (float32 [batch, features] in, float32 [batch, classes] out, as
        :meth:`agent.runtime.Model.predict` guarantees), so nothing is checked again: a call costs two clock reads,
        copying the rows to bytes and a list append (no lock; a GIL-atomic append), about 0.25 µs, and the
        histograms wait for :meth:`drain`. A call that raises one of ``errors`` counts as failed rows when
        ``counted(exc)`` (the runtime layer also raises for the caller's own mistakes, which are not the model's).
        """
        pending, max_queued, clock = self._pending, self._max_queued, time.perf_counter

        def measured(inputs: np.ndarray) -> np.ndarray:
            start = clock()
            try:
                outputs = predict(inputs)
            except errors as exc:
                if counted(exc):
                    with contextlib.suppress(ValueError):  # inputs it cannot count must not hide the model's error
                        self.record(inputs, None, clock() - start, error=True)
                raise
            latency = clock() - start
            blob = inputs.tobytes()
            pending.append((blob, outputs.tobytes(), latency))
            self._queued += len(blob)
            if self._queued >= max_queued:
                self.drain()
            return outputs

        return measured

    def _queue(self, inputs: bytes, outputs: bytes | None, latency_s: float) -> None:
        self._pending.append((inputs, outputs, latency_s))
        self._queued += len(inputs)
        if self._queued >= self._max_queued:
            self.drain()

    def drain(self) -> None:
        """Histogram everything :meth:`record` queued, in one vectorized pass. Cheap when nothing is queued."""
        if self._pending:
            with self._lock:
                self._drain()

    def record_feedback(self, true_label: int, predicted_label: int) -> None:
        """Count one labelled outcome in the window's confusion matrix (rows: true label, columns: predicted)."""
        if not (0 <= true_label < self.n_classes and 0 <= predicted_label < self.n_classes):
            raise ValueError(f"labels must be in [0, {self.n_classes}), got {true_label}, {predicted_label}")
        with self._lock:
            if self._feedback is None:
                self._feedback = np.zeros((self.n_classes, self.n_classes), np.int64)
            self._feedback[true_label, predicted_label] += 1

    def totals(self) -> Totals:
        """Counts since construction, never reset by :meth:`flush`: what a new release's probation is judged on."""
        with self._lock:
            self._drain()
            return Totals(self._total_count, self._total_errors, tuple(self._total_latency.tolist()))

    def flush(self, now: float | None = None) -> dict[str, Any]:
        """Close the window at ``now`` (default: the clock) and start the next one there.

        Returns the window's fields without the envelope (v, device_id, boot_id, seq, dropped, health), which the
        caller adds. An empty window comes back with zero counts; whether to send it is the caller's decision.
        ``window_end`` is clamped to ``window_start`` if the clock stepped backwards, so the window stays valid.
        """
        end = self._clock() if now is None else now
        with self._lock:
            self._drain()
            features = self._cells.reshape(self.n_features, self.width)
            features[:, -2] -= self._nan  # NaN was binned as overflow by _absorb_features
            features[:, -1] = self._nan
            window: dict[str, Any] = {
                "model": self.model,
                "release": self.release,
                "window_start": self._window_start,
                "window_end": max(end, self._window_start),
                "count": self._count,
                "errors": self._errors,
                "latency": self._latency.tolist(),
                "confidence": self._confidence.tolist(),
                "classes": self._classes.tolist(),
                "features": features.tolist(),
            }
            if self._feedback is not None:
                window[FEEDBACK] = self._feedback.tolist()
            self._reset(end)
        return window

    def _drain(self) -> None:
        """Fold the queued calls into the counts. Caller holds the lock, so it is the only one taking items out."""
        pending = self._pending
        n = len(pending)
        if not n:
            return
        taken = pending[:n]
        del pending[:n]  # record() only appends, so the first n items are exactly those taken
        blobs, outputs, latencies = zip(*taken, strict=True)
        self._queued = 0
        inputs = np.frombuffer(b"".join(blobs), np.float32).reshape(-1, self.n_features)
        rows = np.ones(n, np.int64) if len(inputs) == n else np.array([len(b) for b in blobs]) // self._row_bytes
        buckets = np.searchsorted(_LATENCY_EDGES, np.array(latencies) * 1000.0, side="left")  # (edge[i-1], edge[i]]
        latency = np.bincount(buckets, weights=rows, minlength=self._latency.size).astype(np.int64)
        ok = b"".join(outputs) if None not in outputs else b"".join(o for o in outputs if o is not None)
        probs = np.frombuffer(ok, np.float32).reshape(-1, self.n_classes)
        failed = len(inputs) - len(probs)
        self._latency += latency
        self._total_latency += latency
        self._count += len(inputs)
        self._total_count += len(inputs)
        self._errors += failed
        self._total_errors += failed
        for start in range(0, len(inputs), self._chunk_rows):  # chunks keep the comparison block in cache
            self._absorb_features(inputs[start : start + self._chunk_rows])
        if len(probs):
            self._absorb_outputs(probs)

    def _absorb_features(self, inputs: np.ndarray) -> None:
        """Add a block of rows to the feature histograms, vectorized over rows and features. Caller holds the lock."""
        nan = np.isnan(inputs)
        if nan.any():
            self._nan += nan.sum(axis=0)
            inputs = np.where(nan, np.float32(np.inf), inputs)  # counted as overflow here, moved by flush()
        if self._thresholds is not None:
            # passed[r, f]: rows whose feature f reaches threshold rank r, counted by one BLAS product (exact: a
            # chunk has far fewer than 2**24 rows). A feature's histogram is the differences of its column.
            reached = np.greater_equal(inputs[None, :, :], self._thresholds[:, None, :]).astype(np.float32)
            passed = (np.ones(len(inputs), np.float32) @ reached).astype(np.int64)
            cells = self._cells.reshape(self.n_features, self.width)
            cells[:, 0] += len(inputs) - passed[0]
            cells[:, 1 : self.width - 2] += (passed[:-1] - passed[1:]).T
            cells[:, self.width - 2] += passed[-1]
        else:
            keys = _sort_keys(inputs) + self._key_offsets
            cells = self._position_cell[np.searchsorted(self._edge_keys, keys, side="right")]
            self._cells += np.bincount(cells.ravel(), minlength=self._cells.size)

    def _absorb_outputs(self, probs: np.ndarray) -> None:
        """Add the successful rows' top-1 confidence and predicted class. Caller holds the lock."""
        predicted = probs.argmax(axis=1)
        scaled = probs[np.arange(len(probs)), predicted] * CONFIDENCE_BINS  # top-1 probability, cheaper than max
        scaled[~(scaled >= 0)] = 0  # NaN and negatives: no confidence
        np.minimum(scaled, CONFIDENCE_BINS - 1, out=scaled)
        self._confidence += np.bincount(scaled.astype(np.intp), minlength=CONFIDENCE_BINS)
        self._classes += np.bincount(predicted, minlength=self.n_classes)
