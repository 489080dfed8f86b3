"""Simulated sensors: each device replays held-out digits (never seen in training) at its own pace."""

from __future__ import annotations

import numpy as np


def held_out_digits(seed: int = 0, fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in the models' contract (float32 [n, 64], pixels / 16) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    take = order[: int(len(order) * fraction)]
    return (data.data[take] / 16.0).astype(np.float32), data.target[take].astype(np.int64)


class DigitsSensor:
    """Cycles through the shared held-out set from a device-specific offset, one frame at a time."""

    def __init__(self, frames: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.frames = frames
        self.labels = labels
        self._pos = int(rng.integers(len(frames)))

    def read(self) -> tuple[np.ndarray, int]:
        i = self._pos
        self._pos = (i + 1) % len(self.frames)
        return self.frames[i : i + 1], int(self.labels[i])
