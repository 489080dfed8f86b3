"""Assigning a release to devices: the director's half of the two-key rule, published where each device listens.

Every check runs before anything is recorded or published: the release exists and is not revoked, every device is
known (enrolled or heard from) unless pre-provisioning is asked for, no known device says it cannot run the release
(its machine or runtimes), the director key is there, and a trial signature passes the device's own field checks.
Then, per device, the store records the next desired state (seq never reused), the director signs it, it is published
retained with QoS 1, and only once the broker acknowledged it is it marked published and audited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from securesystemslib.signer import Signer

from agent import protocol
from agent.update.desired import DesiredStateError
from fleet.errors import FleetError, Invalid
from fleet.publisher import PublishError
from fleet.store.api import Store
from fleet.store.rows import DesiredRecord, Device
from fleet.trust.director import sign_desired
from fleet.trust.repository import Repository
from fleet.views import release_ref

#: The fields of a release (``Repository.release()``'s view) that go into a desired state.
_ENTRY_FIELDS = ("target", "release", "sha256", "length")


class Publisher(Protocol):
    """Publishes one retained QoS 1 message and returns once the broker acknowledged it (:mod:`fleet.publisher`)."""

    def publish(self, topic: str, payload: bytes) -> None: ...


def desired_entry(release: Mapping[str, Any]) -> dict[str, Any]:
    """A release (``Repository.release()``'s view) as one model of a desired state."""
    return {field: release[field] for field in _ENTRY_FIELDS}


def incompatible(device: Device, release: Mapping[str, Any]) -> list[str]:
    """Why a device could not run the release, from what its birth said (empty if nothing says it cannot)."""
    ref = release_ref(release["name"], release["version"])
    machines = release["hardware"]["machines"]
    problems = []
    if device.machine is not None and device.machine not in machines:
        problems.append(f"{device.device_id} is {device.machine}; {ref} is signed for {', '.join(machines)}")
    if device.runtimes is not None and release["runtime"] not in device.runtimes:
        have = ", ".join(device.runtimes) or "none"
        problems.append(f"{device.device_id} has no {release['runtime']} runtime (it has {have})")
    return problems


@dataclass(frozen=True)
class Assignment:
    """A checked request: every device may be told to run ``release``; nothing is recorded or published yet."""

    release: Mapping[str, Any]
    device_ids: tuple[str, ...]
    campaign: str | None
    ttl_s: float
    signer: Signer

    @property
    def ref(self) -> str:
        return release_ref(self.release["name"], self.release["version"])


def check(
    store: Store,
    repo: Repository,
    device_ids: Sequence[str],
    name: str,
    version: str,
    *,
    campaign: str | None = None,
    ttl_s: float = 7 * 86400,
    allow_unknown: bool = False,
) -> Assignment:
    """Run every rule of an assignment; raise the first :class:`FleetError` that refuses it (nothing changes then)."""
    bad_ids = [d for d in device_ids if not protocol.valid_device_id(d)]
    if not device_ids or bad_ids:
        raise Invalid("bad_device_id", f"{bad_ids[0]!r} is not a device id" if bad_ids else "no device given",
                      f"device ids match {protocol.DEVICE_ID_PATTERN}")  # fmt: skip
    release = repo.release(name, version)
    ref = release_ref(name, version)
    if release["revoked"]:
        raise FleetError(
            "revoked",
            f"{ref} is revoked (min_release {release['min_release']}): devices refuse it",
            "publish a new version and assign that",
        )
    unknown = sorted(set(device_ids) - store.known(device_ids))
    if unknown and not allow_unknown:
        raise FleetError(
            "unknown_device",
            f"the fleet never enrolled nor heard from {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
            "check the device ids (`fleet devices list`), enroll them first (`fleet enroll`), or pass "
            "--allow-unknown to pre-provision. Nothing was published",
        )
    # One read of the registry for the whole list: `device()` would also work out each device's events and gaps.
    registered = {d.device_id: d for d in store.devices()}
    problems = [p for d in device_ids if (device := registered.get(d)) for p in incompatible(device, release)]
    if problems:
        raise FleetError("incompatible", "; ".join(problems), "assign a release built for them. Nothing was published")
    try:
        signer = repo.keys.signer("director")
    except (FileNotFoundError, PermissionError) as exc:
        raise FleetError("key_missing", str(exc), "restore keys/director-1.pem from your backup") from None
    try:  # the device's own checks, before anything is recorded or published
        sign_desired(signer, device_ids[0], 1, {name: desired_entry(release)}, campaign, 1.0, 1.0 + ttl_s)
    except DesiredStateError as exc:
        raise Invalid("bad_desired_state", f"this desired state would be refused by devices: {exc}",
                      "fix --campaign or --expires") from None  # fmt: skip
    return Assignment(release, tuple(device_ids), campaign, ttl_s, signer)


def publish(
    store: Store, assignment: Assignment, publisher: Publisher, *, actor: str, prefix: str = protocol.DEFAULT_PREFIX
) -> Iterator[DesiredRecord]:
    """Give each device of a checked assignment its new desired state and publish it, one device at a time.

    Each state is yielded once the broker acknowledged it; a failure stops there and raises
    :class:`~fleet.publisher.PublishError` (the devices yielded before keep their new state).
    """
    issued = time.time()
    expires = issued + assignment.ttl_s
    release = assignment.release
    update = {release["name"]: desired_entry(release)}
    detail = {"release": assignment.ref, "campaign": assignment.campaign, "expires": expires}
    for device_id in assignment.device_ids:

        def sign(seq: int, models: dict[str, Any], device_id: str = device_id) -> bytes:
            return sign_desired(assignment.signer, device_id, seq, models, assignment.campaign, issued, expires)

        state, payload = store.add_desired(device_id, update, issued, expires, assignment.campaign, sign)
        publisher.publish(protocol.topic(prefix, device_id, protocol.Kind.DESIRED), payload)
        store.mark_desired_published(device_id, state.seq, actor, detail)
        yield state


def assign(
    store: Store,
    repo: Repository,
    connect: Callable[[], AbstractContextManager[Publisher]],
    device_ids: Sequence[str],
    name: str,
    version: str,
    *,
    actor: str,
    campaign: str | None = None,
    ttl_s: float = 7 * 86400,
    allow_unknown: bool = False,
    prefix: str = protocol.DEFAULT_PREFIX,
) -> list[DesiredRecord]:
    """Check, then tell each device to run ``name:version``; returns the published states, in device order.

    ``connect()`` opens the broker connection (a :class:`~fleet.publisher.DesiredPublisher`), only after every check
    passed. A broker failure part way raises :class:`~fleet.publisher.PublishError` naming the devices already done.
    """
    assignment = check(
        store, repo, device_ids, name, version, campaign=campaign, ttl_s=ttl_s, allow_unknown=allow_unknown
    )
    done: list[DesiredRecord] = []
    try:
        with connect() as publisher:
            done.extend(publish(store, assignment, publisher, actor=actor, prefix=prefix))
    except PublishError as exc:
        assigned = ", ".join(d.device_id for d in done) or "none"
        raise PublishError(f"{exc.detail}; devices assigned before this: {assigned}") from None
    return done
