"""Keeping the online metadata fresh: timestamp and snapshot (and targets) re-signed before they expire.

While `fleet serve` runs, a :class:`MetadataRenewal` thread re-signs what expires within half a timestamp lifetime,
so a device never fetches expired metadata, even if one check fails.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from agent.logs import event
from fleet.trust.repository import Repository

log = logging.getLogger(__name__)

#: The longest wait between two checks.
_PERIOD_MAX_S = 300.0
#: The shortest (for repositories with very short lifetimes, as tests make).
_PERIOD_MIN_S = 0.2


def renewal_schedule(repo: Repository) -> tuple[timedelta, float]:
    """(margin, period in seconds) for renewing online metadata.

    Metadata is re-signed when it expires within half a timestamp lifetime, checked four times per margin (at most
    every 5 minutes), so a device never sees expired metadata while serve runs, even if one check fails.
    """
    margin = repo.expiry.timestamp / 2
    return margin, min(max(margin.total_seconds() / 4, _PERIOD_MIN_S), _PERIOD_MAX_S)


class MetadataRenewal:
    """Re-sign the repository's online metadata on :func:`renewal_schedule`, in a daemon thread, until stopped.

    A failed renewal (a missing key, a full disk) is logged (``metadata_renewal_failed``) and tried again next period:
    it must not stop the rest of the fleet.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.margin, self.period = renewal_schedule(repo)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MetadataRenewal:
        """Renew once now, then every period, in the background."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="metadata-renewal", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the renewal in progress, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def renew(self) -> None:
        """One check: re-sign what expires within the margin; a failure is logged, never raised."""
        try:
            self.repo.renew_online(margin=self.margin)
        except Exception as exc:  # a missing key or a full disk must not stop ingest; retried next period
            event(log, "metadata_renewal_failed", logging.ERROR, error=repr(exc)[:300])

    def _loop(self) -> None:
        while True:
            self.renew()
            if self._stop.wait(self.period):
                return
