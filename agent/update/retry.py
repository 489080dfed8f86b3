"""When a failed install is tried again, and after how long. Pure: a failure and a count in, a verdict out.

An install that failed for a cause that passes by itself (a full disk that is cleared, metadata that expired while the
device clock was wrong, a network or server error) is tried again, with exponential back-off, without waiting for the
operator to assign the release again. A release that failed a check of the release itself (a signature, a hash, a
length, a revocation, the smoke test or probation) is never tried again: only a new desired state retries it.

The schedule, from ``[update] retry_min_s`` and ``retry_max_s``: attempt 1 waits ``min``, each next one twice as long,
up to ``max``, each with up to 20 % jitter taken off so a fleet that failed together does not retry together.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Reasons whose cause passes by itself, whatever the error that carried them. The TUF client's errors say it for
#: themselves (``TrustError.retryable``: a 503 is worth another try, a 404 is not, though both fail the download).
RETRYABLE_REASONS = frozenset({"disk_full", "io_error"})
#: The share of a delay that jitter may take off.
JITTER = 0.2


def is_retryable(reason: str, transient: bool = False) -> bool:
    """Whether an install that failed for ``reason`` is tried again; ``transient`` is the error's own verdict (a TUF
    refresh that failed on the network or on expired metadata is; one that failed a signature check is not)."""
    return transient or reason in RETRYABLE_REASONS


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off between ``min_s`` and ``max_s`` seconds."""

    min_s: float
    max_s: float

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``attempt`` failures; ``jitter`` is a fraction in
        [0, 1) (random in the agent, fixed in tests)."""
        if attempt < 1:
            raise ValueError(f"attempt counts failures from 1, not {attempt}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), not {jitter}")
        full = min(self.max_s, self.min_s * 2.0 ** min(attempt - 1, 60))
        return full * (1.0 - JITTER * jitter)
