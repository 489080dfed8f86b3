"""`fleet assign` (sign and publish which release devices should run) and `fleet desired` (what they were told).

The broker, topic prefix and TLS files default to those of the `fleet serve` running on the home (its serve.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent import protocol
from agent.broker_address import TlsFiles
from agent.update.desired import DesiredStateError
from fleet.assign import DesiredPublisher, PublishError, assign, desired_entry, incompatible, release_ref
from fleet.cli.common import (
    Duration,
    NotFound,
    ReleaseRef,
    actor,
    broker_options,
    broker_settings,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
    release_of,
)
from fleet.cli.release import release_error
from fleet.store.sqlite import iso
from fleet.trust.director import sign_desired
from fleet.trust.repository import ReleaseError


def _device_ids(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> Sequence[str]:
    for device_id in value:
        if not protocol.valid_device_id(device_id):
            raise click.BadParameter(f"{device_id!r} is not a device id ({protocol.DEVICE_ID_PATTERN})")
    return value


@click.command("assign")
@click.argument("device_ids", metavar="DEVICE...", nargs=-1, required=True, callback=_device_ids)
@click.option("--release", "ref", required=True, type=ReleaseRef(), help="The release to run, NAME:VERSION.")
@click.option("--campaign", help="Campaign name carried in the signed state ([A-Za-z0-9_.:+-], up to 128).")
@click.option(
    "--expires",
    "ttl_s",
    type=Duration(),
    default="7d",
    show_default=True,
    help="How long devices may act on this state; a device offline longer ignores it.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the broker to connect and to acknowledge each device's state.",
)
@broker_options
@home_option
@json_option
def assign_command(
    device_ids: Sequence[str],
    ref: tuple[str, str],
    campaign: str | None,
    ttl_s: float,
    timeout: float,
    broker_url: str | None,
    prefix: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Tell each DEVICE to run release NAME:VERSION: sign its desired state with the director key and publish it
    retained (QoS 1) on its desired topic.

    Other models in the device's previous desired state stay as they were; seq grows by one per device. The state
    waits on the broker for devices that are offline. Exit 3 if the release is unknown and 1 if it is revoked, does
    not fit a device, or the broker does not acknowledge; nothing is published for a refused release.
    """
    with contextlib.closing(open_store(home)) as store:
        repo = open_repository(home)
        try:
            release = repo.release(*ref)
        except ReleaseError as exc:
            raise release_error(exc) from None
        if release["revoked"]:
            raise click.ClickException(
                f"{release_ref(release)} is revoked (min_release {release['min_release']}): devices refuse it; "
                "publish a new version and assign that"
            )
        problems = incompatible(store, device_ids, release)
        if problems:
            raise click.ClickException("; ".join(problems) + ". Nothing was published")
        try:
            signer = repo.keys.signer("director")
        except (FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(f"{exc}: restore keys/director-1.pem from your backup") from None
        try:  # the device's own checks, before anything is recorded or published
            models = {release["name"]: desired_entry(release)}
            sign_desired(signer, device_ids[0], 1, models, campaign, 1.0, 1.0 + ttl_s)
        except DesiredStateError as exc:
            raise click.UsageError(f"this desired state would be refused by devices: {exc}") from None
        url, prefix, tls = broker_settings(home, broker_url, prefix, TlsFiles(ca, cert, key))
        done: list[dict[str, Any]] = []
        try:
            with DesiredPublisher(url, tls, timeout) as publisher:
                done.extend(
                    assign(store, signer, publisher, device_ids, release, campaign=campaign, ttl_s=ttl_s,
                           actor=actor(), prefix=prefix)
                )  # fmt: skip
        except PublishError as exc:
            assigned = ", ".join(d["device_id"] for d in done) or "none"
            raise click.ClickException(f"{exc}; devices assigned before this: {assigned}. Run assign again") from None
    if as_json:
        echo_json([_state_view(d) for d in done])
        return
    for d in done:
        click.echo(f"{d['device_id']}: seq {d['seq']} -> {release_ref(release)}")


def _state_view(state: dict[str, Any]) -> dict[str, Any]:
    """A desired state for output: ISO times, and each model's release as "name:version" beside its entry."""
    times = {k: iso(v) if isinstance(v, float) else v for k, v in state.items() if k in ("issued", "expires")}
    return {**state, **times, "releases": {name: release_of(entry) for name, entry in state["models"].items()}}


@click.command()
@click.argument("device_id", metavar="DEVICE")
@home_option
@json_option
def desired(device_id: str, home: Path | None, as_json: bool) -> None:
    """Show the last desired state published for DEVICE: seq, campaign, expiry and each model's release.

    Exit code 3 if none was ever published for it.
    """
    with contextlib.closing(open_store(home)) as store:
        state = store.desired(device_id)
    if state is None:
        raise NotFound(f"no desired state published for {device_id!r}: see `fleet assign`")
    view = _state_view(state)
    if as_json:
        echo_json(view)
        return
    fields = Table.grid(padding=(0, 2))
    for key in ("device_id", "seq", "campaign", "issued", "expires", "published_at"):
        fields.add_row(key, str(view[key] if view[key] is not None else "-"))
    console = Console()
    console.print(fields)
    models = Table("model", "release", "counter", "sha256")
    for name, entry in sorted(view["models"].items()):
        models.add_row(name, view["releases"][name], str(entry["release"]), entry["sha256"][:16])
    console.print(models)
