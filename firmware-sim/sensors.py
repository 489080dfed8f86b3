"""Simulated sensors: each device replays held-out digits (never seen in training) at its own pace."""

from __future__ import annotations

import numpy as np

from fleet.examples.modelgen import digits_split


def held_out_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split of the model built with the same seed: inputs in the model contract, and labels."""
    _, x_test, _, y_test = digits_split(seed)
    return x_test, y_test


class DigitsSensor:
    """Cycles through the shared held-out set from a device-specific offset, one frame at a time."""

    def __init__(self, frames: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.frames = frames
        self.labels = labels
        #: The run's seeded generator (the drift of what this sensor reads draws from it too).
        self.rng = rng
        self._pos = int(rng.integers(len(frames)))

    def read(self) -> tuple[np.ndarray, int]:
        i = self._pos
        self._pos = (i + 1) % len(self.frames)
        return self.frames[i : i + 1], int(self.labels[i])
