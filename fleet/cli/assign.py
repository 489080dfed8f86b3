"""`fleet assign` (sign and publish which release devices should run) and `fleet desired` (what they were told).

The broker, topic prefix and TLS files default to those of the `fleet serve` running on the home (its serve.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from agent import protocol
from agent.broker_address import TlsFiles
from fleet import views
from fleet.cli.common import (
    Duration,
    ReleaseRef,
    actor,
    broker_options,
    broker_settings,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
)
from fleet.errors import NotFound
from fleet.ops import assign as ops_assign


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
@click.option(
    "--allow-unknown",
    is_flag=True,
    help="Pre-provision: also sign for devices the fleet never enrolled nor heard from (their state waits retained).",
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
    allow_unknown: bool,
    as_json: bool,
) -> None:
    """Tell each DEVICE to run release NAME:VERSION: sign its desired state with the director key and publish it
    retained (QoS 1) on its desired topic.

    Other models in the device's previous desired state stay as they were; seq grows by one per device. The state
    waits on the broker for devices that are offline. Exit 3 if the release is unknown and 1 if it is revoked, does
    not fit a device, or the broker does not acknowledge; nothing is published for a refused release.
    """
    connect, prefix = broker_settings(home, broker_url, prefix, TlsFiles(ca, cert, key), timeout)
    with contextlib.closing(open_store(home, write=True)) as store:
        done = ops_assign.assign(
            store,
            open_repository(home, store),
            connect,
            device_ids,
            *ref,
            actor=actor(),
            campaign=campaign,
            ttl_s=ttl_s,
            allow_unknown=allow_unknown,
            prefix=prefix,
        )
    if as_json:
        echo_json([views.desired_json(d, recorded=False) for d in done])
        return
    for d in done:
        click.echo(f"{d.device_id}: seq {d.seq} -> {ref[0]}:{ref[1]}")


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
        raise NotFound("no_desired_state", f"no desired state published for {device_id!r}", "see `fleet assign`")
    view = views.desired_json(state)
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
