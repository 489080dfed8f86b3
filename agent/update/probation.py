"""Probation: what a new release must show in service before the device commits it. Pure: counts in, verdict out.

The installer serves the release and polls its counters (:meth:`agent.update.host.InstallHost.totals`, since the
release was activated); :meth:`ProbationLimits.judge` decides. The limits come from the release's signed card where it
has a ``probation`` section, else from the device's ``[update]`` defaults; so does the watch after commit
(:func:`commit_watch_s`), in which crashes of the agent still roll the release back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from agent.config import UpdateConfig
from agent.histograms import latency_quantile_ms
from agent.telemetry import Totals
from agent.update.record import InstallRecord


@dataclass(frozen=True)
class Verdict:
    """``done`` False: keep watching. Done with a ``reason``: roll back for it. Done without one: commit."""

    done: bool
    reason: str = ""
    detail: str = ""


#: Rows from which a p95 is more than the slowest row (nearest rank: the 19th of 20).
P95_MIN_ROWS = 20


@dataclass(frozen=True)
class ProbationLimits:
    """What a new release must show in service before it is committed."""

    inferences: int
    seconds: float
    max_error_rate: float
    latency_p95_ms: float | None

    @classmethod
    def for_release(cls, card: Mapping[str, Any], config: UpdateConfig) -> ProbationLimits:
        """The card's signed ``probation`` section where it has one, else the device's defaults.

        ``{"inferences", "seconds", "max_error_rate", "latency_p95_ms"}``; the latency budget defaults to the smoke
        test's (a per-row budget: releases whose callers batch should sign ``latency_p95_ms``).
        """
        signed, smoke = _section(card, "probation"), _section(card, "smoke_test")
        return cls(
            inferences=int(_pick(signed.get("inferences"), config.probation_inferences, 1)),
            seconds=float(_pick(signed.get("seconds"), config.probation_s)),
            max_error_rate=min(1.0, float(_pick(signed.get("max_error_rate"), config.max_error_rate))),
            latency_p95_ms=_pick(signed.get("latency_p95_ms"), _pick(smoke.get("latency_budget_ms"), None)),
        )

    def judge(self, totals: Totals, elapsed_s: float) -> Verdict:
        """Fail as soon as the errors exceed what N inferences allow; else pass at N inferences or T seconds.

        Latency is held against the budget at the end: the p95 from :data:`P95_MIN_ROWS` rows on, the median below
        that (a p95 of fewer rows is their slowest one: one pause of a busy machine failed a release on 1 to 4
        inferences when 1,000 simulated devices installed at once, docs/performance.md). A release that served
        nothing in T seconds passes: with no rows there is no latency to hold against it.
        """
        n, errors = totals.count, totals.errors
        if errors > self.max_error_rate * max(n, self.inferences):
            limit = f"at most {self.max_error_rate:.0%} of {max(n, self.inferences)}"
            return Verdict(True, "probation_errors", f"{errors} of {n} inferences failed ({limit} allowed)")
        if n < self.inferences and elapsed_s < self.seconds:
            return Verdict(False)
        q, name = (0.95, "p95") if n >= P95_MIN_ROWS else (0.5, "median")
        latency = latency_quantile_ms(totals.latency, q)
        if self.latency_p95_ms is not None and latency is not None and latency > self.latency_p95_ms:
            detail = f"{name} latency {latency:.3g} ms > {self.latency_p95_ms:g} ms over {n} inferences"
            return Verdict(True, "probation_latency", detail)
        return Verdict(True)


def commit_watch_s(card: Mapping[str, Any], config: UpdateConfig) -> float:
    """For how long after its commit unclean restarts of the agent still count as the release's crash loop: the
    card's signed ``probation.watch_s`` where it has one, else ``[update] commit_watch_s``; 0 ends the watch at
    commit."""
    return float(_pick(_section(card, "probation").get("watch_s"), config.commit_watch_s))


class Watch(Enum):
    """What a start in COMMITTED found of the commit watch (:func:`watch_start`)."""

    #: No watch: no commit since the last one ended, or it is over.
    OFF = "off"
    #: The watch ended at this start (the window passed, or the clock is outside it); the start was not counted.
    ENDED = "ended"
    #: The start was counted (an unclean one in ``restarts``) and the watch goes on.
    ON = "on"
    #: The start was counted and it was the last the watch allows: it ends, the release stays.
    LAST = "last"
    #: Counted, and the unclean starts reached the limit: roll the release back.
    CRASH_LOOP = "crash_loop"


def watch_start(
    rec: InstallRecord, *, now: float, window_s: float, limit: int, unclean: bool
) -> tuple[Watch, InstallRecord]:
    """A start in COMMITTED: the verdict, and the record to persist (it carries the watch across restarts).

    The watch of a commit starts at the first start after it: an unclean start (no clean stop recorded) counts in
    ``restarts`` as during an install, and at ``limit`` the committed release is rolled back. It lasts ``window_s``
    from the commit by the device clock (``now``), and at most ``2 * limit`` starts, so a clock set back (or stuck)
    cannot make it last for ever; a start that finds the clock outside the window ends it, and once over it stays
    over until the next commit.
    """
    last = rec.outcome or {}
    committed = last.get("outcome") == "install_committed" and not last.get("unchanged")
    if committed and last["ts"] != rec.watched_commit:  # the first start since this commit: a new watch
        rec = replace(rec, watched_commit=last["ts"], starts_since_commit=0, watch_over=False, restarts=0)
    if rec.watched_commit is None or rec.watch_over:
        return Watch.OFF, rec
    if not 0 <= now - rec.watched_commit < window_s:
        return Watch.ENDED, replace(rec, watch_over=True, restarts=0)
    rec = replace(rec, starts_since_commit=rec.starts_since_commit + 1, restarts=rec.restarts + (1 if unclean else 0))
    if rec.restarts >= limit:
        return Watch.CRASH_LOOP, rec
    if rec.starts_since_commit >= 2 * limit:
        return Watch.LAST, replace(rec, watch_over=True, restarts=0)
    return Watch.ON, rec


def _section(card: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    section = card.get(key)
    return section if isinstance(section, Mapping) else {}


def _pick(value: Any, default: Any, low: float = 0.0) -> Any:
    """A signed number if it is one (finite, not a bool, at least ``low``), else the default."""
    fine = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if fine and value >= low else default
