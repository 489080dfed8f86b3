"""What the installer persists beside a model's slots (its install record), and how status output shows both.

The record is stored as JSON in the slot store (:class:`agent.update.slots.SlotStore`), in the same transaction as
any slot change, and read back as it was written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agent.update.desired import DesiredModel
from agent.update.slots import ModelSlots, SlotRecord
from agent.update.states import State


def release_name(entry: DesiredModel) -> str:
    """The release as the agent reports it (``name:version``), as in agent.toml and telemetry."""
    return f"{entry.name}:{entry.version}"


@dataclass(frozen=True)
class InstallRecord:
    """A model's install, as persisted beside its slots."""

    state: State = State.IDLE
    #: The desired state this model last acted on, and the director's entry for it.
    seq: int = -1
    target: DesiredModel | None = None
    reason: str = ""
    detail: str = ""
    #: Starts of the agent since the install began (not counting clean stops): the crash-loop counter. In COMMITTED
    #: it goes on counting while the commit watch lasts (:meth:`agent.update.install.Installer._watch_commit`).
    restarts: int = 0
    clean_stop: bool = False
    #: The commit watch: the commit it watches (its outcome's ``ts``), the agent's starts since, and whether it is over.
    watched_commit: float | None = None
    starts_since_commit: int = 0
    watch_over: bool = False
    #: In REVERTING: whether the failing release is the active one (so ``previous`` must be put back).
    revert_active: bool = False
    outcome: Mapping[str, Any] | None = None
    #: Failed attempts at this target for passing causes (:mod:`agent.update.retry`), and the wait chosen after the
    #: last one (None: no retry is scheduled).
    retries: int = 0
    retry_in_s: float | None = None

    @property
    def release(self) -> str:
        return release_name(self.target) if self.target else ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value, "outcome": dict(self.outcome or {}) or None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstallRecord:
        if not data:
            return cls()
        target = data.get("target")
        return cls(
            **{**data, "state": State(data["state"]), "target": DesiredModel(**target) if target else None},
        )


def install_status(
    rec: InstallRecord, slots: ModelSlots, factory: SlotRecord, retry_at: float | None = None
) -> dict[str, Any]:
    """A model's slots (release, sha256 prefix) and install state with its last outcome, as status output shows them.

    An empty ``active`` or ``previous`` slot is the factory model; ``previous`` is shown only once a release is active.
    ``retry_at`` (device clock) is when the failed install is tried again, if it is.
    """
    return {
        "slots": {
            "active": (slots.active or factory).summary(),
            "previous": (slots.previous or factory).summary() if slots.active else None,
            "staged": slots.staged.summary() if slots.staged else None,
        },
        "install": {
            "state": rec.state.value,
            "release": rec.release,
            "seq": rec.seq,
            "reason": rec.reason,
            "detail": rec.detail,
            "restarts": rec.restarts,
            "last_outcome": dict(rec.outcome) if rec.outcome else None,
            "next_retry": None
            if retry_at is None
            else {"at": round(retry_at, 3), "attempt": rec.retries + 1, "after": rec.reason, "release": rec.release},
        },
    }
