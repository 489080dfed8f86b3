"""Enrolling simulated devices with a running fleet, the way a real device is: `fleet enroll`'s bundle for each one.

:func:`enroll_devices` asks the `fleet serve` running on a fleet home where its broker and repository are, writes each
device's bundle (agent.toml, the trusted TUF root, the director's public key) with the fleet's own
:func:`fleet.ops.enroll.enroll` (which records and audits the enrollment), and reads each bundle back with the agent's
own config loader: a simulated device trusts exactly what a real one enrolled by `fleet enroll` trusts, and runs the
same update path (director check, TUF, download, slots, smoke test, probation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from agent.config import UpdateConfig, load
from agent.errors import EdgefleetError


class EnrollError(EdgefleetError):
    """The fleet to enroll with cannot be used, or a tag is wrong; ``detail`` says why and what to do."""


def enroll_devices(
    home: Path | None,
    device_ids: Sequence[str],
    state_root: Path,
    tags: Sequence[str] = (),
    sites: int | None = None,
    *,
    actor: str = "firmware-sim",
) -> tuple[str, str, dict[str, UpdateConfig]]:
    """Enroll ``device_ids`` with the `fleet serve` running on ``home`` (``$EDGEFLEET_HOME`` when None).

    Every device gets ``tags`` (``KEY=VALUE``, checked as `fleet enroll --tag` checks them) and, with ``sites``, a
    ``site`` tag spreading the devices over that many sites in turn (``site-0``, ``site-1``, ...).

    Returns the broker URL, the MQTT prefix and each device's ``[update]`` as its bundle says. Bundles are written to
    ``<state_root>/<device_id>/bundle``; enrolling again replaces them.
    """
    try:
        from fleet.errors import FleetError
        from fleet.home import Home, resolve_home, running_serve
        from fleet.ops.enroll import BundleSettings, enroll, parse_tags
        from fleet.ops.releases import open_repository
        from fleet.store import open_store
    except ImportError as exc:
        raise EnrollError("no_fleet", f"--enroll needs the fleet manager ({exc.name} is missing): "
                          "pip install 'edgefleet[fleet]'") from None  # fmt: skip
    try:
        common = parse_tags(tags)
    except FleetError as exc:
        raise EnrollError(exc.reason, exc.message()) from None
    root = resolve_home(home)
    running = running_serve(root)
    if running is None:
        raise EnrollError("no_fleet", f"no `fleet serve` runs on {root}: start it, or pass --home of one that runs")
    updates: dict[str, UpdateConfig] = {}
    with contextlib.closing(open_store(Home(root).db)) as store:
        repo = open_repository(root, store)
        for i, device_id in enumerate(device_ids):
            bundle = state_root / device_id / "bundle"
            settings = BundleSettings(
                running["broker"],
                running["repo"],
                running["prefix"],
                state_dir=str(state_root / device_id),
                tags={**common, **({"site": f"site-{i % sites}"} if sites else {})},
            )
            enroll(store, repo, device_id, bundle, settings, actor=actor, force=True)
            update = load(bundle / "agent.toml").update
            assert update is not None, "fleet enroll writes an [update] table"
            updates[device_id] = update
    return running["broker"], running["prefix"], updates
