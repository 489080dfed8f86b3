"""Test hooks that make a real model crash its runtime on demand, where no honest way to build one exists.

``EDGEFLEET_FAULT_SEGV_WHEN=<sha256>``: a model whose file has this sha256 gets, at load
(:func:`agent.runtime.load_model` reads the variable once per load), a ``predict`` that segfaults (it reads address 0
in the calling thread, as a runtime's native code that crashes does) when any row's first feature is above 0.5; other
inputs run the model as they are. The digits models' first feature (a corner pixel) is 0 in every signed smoke
sample, so such a release passes its smoke test and probation and crashes later, on one request. Unset, nothing is
wrapped and nothing is paid. Never set it in production.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.runtime import Model

#: The test hook's environment variable (see the module docstring).
FAULT_SEGV_WHEN = "EDGEFLEET_FAULT_SEGV_WHEN"
#: A row whose first feature is above this crashes the wrapped model.
SEGV_ABOVE = 0.5


def segv_when(model: Model, sha256: str) -> None:
    """Make ``model`` segfault its process on rows whose first feature is above :data:`SEGV_ABOVE`, if its file
    has ``sha256``."""
    if hashlib.sha256(model.path.read_bytes()).hexdigest() != sha256:
        return
    predict = model.predict

    def crashing(x: np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.size and bool((x[:, 0] > SEGV_ABOVE).any()):
            ctypes.string_at(0)  # SIGSEGV, synchronously: nothing after this line runs, no answer is sent
        return predict(x)

    model.predict = crashing  # type: ignore[method-assign]
