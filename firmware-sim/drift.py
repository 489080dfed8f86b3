"""Sensor drift, applied to real held-out digits as a device reads them. Pure: frames, labels and a seeded generator in.

Each kind has a ``size`` in [0, 1], so an evaluation can sweep from subtle to obvious:

- ``noise``: gaussian noise of standard deviation ``size`` on every pixel (clipped to the model's [0, 1] range);
- ``brightness``: ``size`` added to every pixel (clipped);
- ``contrast``: pixels pushed away from mid-grey by a factor ``1 + 4 * size`` (clipped);
- ``occlusion``: the top-left square of side ``ceil(8 * size)`` pixels set to 0 (a smudge on the lens);
- ``prior``: class-prior shift: with probability ``size`` a frame is replaced by one of class 0 (the scene changed);
- ``stuck``: with probability ``size`` the sensor repeats the frame before (a stuck sensor);
- ``concept``: with probability ``size`` the true label is remapped to ``(label + 1) % 10``: the inputs do not move,
  only the labels that feedback sends do (visible through feedback alone).

A drift is written ``KIND:SIZE`` or ``KIND:SIZE@START_S`` (from ``START_S`` seconds into the run), as
``firmware-sim run --drift`` takes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("noise", "brightness", "contrast", "occlusion", "prior", "stuck", "concept")
_SIDE = 8
_CLASSES = 10


@dataclass(frozen=True)
class Drift:
    kind: str
    size: float
    start_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown drift {self.kind!r}: use one of {', '.join(KINDS)}")
        if not (0.0 <= self.size <= 1.0 and math.isfinite(self.size)):
            raise ValueError(f"drift size {self.size} must be between 0 and 1")
        if not (self.start_s >= 0.0 and math.isfinite(self.start_s)):
            raise ValueError(f"drift start {self.start_s} must be 0 or more seconds")

    @classmethod
    def parse(cls, text: str) -> Drift:
        """``KIND:SIZE`` or ``KIND:SIZE@START_S``; ValueError saying what is wrong."""
        kind, sep, rest = text.partition(":")
        size, _, start = rest.partition("@")
        try:
            if not sep:
                raise ValueError
            return cls(kind, float(size), float(start) if start else 0.0)
        except ValueError as exc:
            why = f": {exc}" if str(exc) else ""
            raise ValueError(f"{text[:60]!r} is not a drift; write KIND:SIZE[@START_S]{why}") from None


class DriftingFrames:
    """Applies the drifts active at ``elapsed_s`` to one frame and its true label, with the device's own generator.

    ``pool`` and ``pool_labels`` are the held-out set the device reads from (where ``prior`` draws its class-0
    frames).
    """

    def __init__(self, drifts: Sequence[Drift], pool: np.ndarray, pool_labels: np.ndarray) -> None:
        self._drifts = tuple(drifts)
        self._class0 = pool[pool_labels == 0]
        self._last: tuple[np.ndarray, int] | None = None

    def apply(
        self, frame: np.ndarray, label: int, elapsed_s: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        out, true = frame, label
        for drift in self._drifts:
            if elapsed_s < drift.start_s or drift.size == 0.0:
                continue
            out, true = _one(drift, out, true, rng, self._class0, self._last)
        self._last = out, true
        return out, true


def _one(
    drift: Drift,
    frame: np.ndarray,
    label: int,
    rng: np.random.Generator,
    class0: np.ndarray,
    last: tuple[np.ndarray, int] | None,
) -> tuple[np.ndarray, int]:
    size = drift.size
    match drift.kind:
        case "noise":
            return np.clip(frame + rng.normal(0.0, size, frame.shape), 0.0, 1.0).astype(np.float32), label
        case "brightness":
            return np.clip(frame + size, 0.0, 1.0).astype(np.float32), label
        case "contrast":
            return np.clip(0.5 + (frame - 0.5) * (1.0 + 4.0 * size), 0.0, 1.0).astype(np.float32), label
        case "occlusion":
            side = math.ceil(_SIDE * size)
            image = frame.reshape(-1, _SIDE, _SIDE).copy()
            image[:, :side, :side] = 0.0
            return image.reshape(frame.shape), label
        case "prior":
            if len(class0) and rng.random() < size:
                return class0[rng.integers(len(class0))].reshape(frame.shape), 0
            return frame, label
        case "stuck":
            return last if last is not None and rng.random() < size else (frame, label)
        case _:  # concept
            return frame, (label + 1) % _CLASSES if rng.random() < size else label
