"""The telemetry a campaign's KPI gates weigh, split per device into before and after its upgrade.

Each window of the campaign's model that a targeted device sends lands in one of three piles of that device:

* ``pre``: on its old release, received before the campaign began (its own baseline from before);
* ``before``: on its old release, received after the campaign began and before the device was sent the release
  (still its baseline; and, while the device waits its turn, part of the control group);
* ``after``: on the campaign's release.

A window on the old release received after the device was sent the release (while it downloads, or after a revert)
is neither, and so is a window on any third release (one a rolled-back campaign left in the last hour). Times are the
fleet's (``received_at``): a device's clock may be skewed. The piles are integer counts
(:class:`~fleet.rollout.kpi.Sample`), so the controller builds them incrementally as windows arrive, and builds them
again from the store after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleet.rollout.kpi import Sample
from fleet.rollout.states import TOUCHED, ExecState
from fleet.store.rows import Execution


@dataclass
class _Piles:
    pre: Sample
    before: Sample
    after: Sample


@dataclass(frozen=True)
class Groups:
    """The three samples a KPI gate compares: the upgraded devices now, the same devices before, and the devices not
    yet sent the release over the campaign's time."""

    upgraded: Sample
    baseline: Sample
    control: Sample


class Evidence:
    """One campaign's piles, per device."""

    def __init__(self, release: str, started_at: float) -> None:
        self.release = release
        self.started_at = started_at
        self._piles: dict[str, _Piles] = {}

    def add(self, window: Mapping[str, Any], received_at: float, execution: Execution) -> None:
        """File one window of ``execution``'s device (see the module docstring)."""
        piles = self._piles.get(execution.device_id)
        if piles is None:
            piles = self._piles[execution.device_id] = _Piles(Sample(), Sample(), Sample())
        if window["release"] == self.release:
            if execution.notified_at is not None:
                piles.after = piles.after.add(window)
        elif window["release"] != execution.from_release:
            return  # another release it ran (before the one it runs now, or a campaign's that was rolled back)
        elif execution.notified_at is None or received_at < execution.notified_at:
            if received_at < self.started_at:
                piles.pre = piles.pre.add(window)
            else:
                piles.before = piles.before.add(window)

    def groups(self, executions: Iterable[Execution]) -> Groups:
        """The upgraded devices (touched, with windows on the release), their baseline, and the control group
        (devices still queued)."""
        upgraded, baseline, control = Sample(), Sample(), Sample()
        for e in executions:
            piles = self._piles.get(e.device_id)
            if piles is None:
                continue
            state = ExecState(e.state)
            if state in TOUCHED and piles.after.count:
                upgraded += piles.after
                baseline += piles.pre + piles.before
            elif state is ExecState.QUEUED:
                control += piles.before
        return Groups(upgraded, baseline, control)
