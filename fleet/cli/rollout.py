"""`fleet rollout`: create a campaign, list them, watch one, and the operator's actions on it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleet import views
from fleet.cli.common import ReleaseRef, actor, echo_json, home_option, json_option, open_repository, open_store
from fleet.errors import Invalid
from fleet.home import resolve_home, running_serve
from fleet.ops import rollout as ops
from fleet.rollout.spec import parse_spec

#: Campaign states after which `status --watch` stops.
_ENDS = ("succeeded", "rolled_back", "aborted")


@click.group()
def rollout() -> None:
    """Ship a release to devices in gated waves, and stop it, pause it or roll it back."""


@rollout.command()
@click.option("--release", "ref", type=ReleaseRef(), required=True, help="The release to ship, NAME:VERSION.")
@click.option(
    "--select",
    metavar="EXPR",
    help="Devices to target: KEY=VALUE terms, e.g. site=north,release=digits:1 "
    "(tags, hardware=MACHINE, release=NAME:VERSION-PREFIX; alternatives with |). [default: every device]",
)
@click.option(
    "--waves",
    metavar="LIST",
    help="Cumulative wave sizes: percents (10,50,100) or counts (5d,50%,100%). [default: 10,50,100]",
)
@click.option("--soak", metavar="DURATION", help="Time a finished wave holds its gates before the next. [default: 10m]")
@click.option(
    "--max-failed",
    type=float,
    metavar="PCT",
    help="Failed share of finished devices that stops the campaign. [default: 10]",
)
@click.option("--max-timed-out", type=float, metavar="PCT", help="Timed-out share that stops it. [default: 20]")
@click.option("--min-devices", type=int, metavar="K", help="Finished devices before the shares decide. [default: 3]")
@click.option(
    "--kpi",
    "kpis",
    multiple=True,
    metavar="EXPR",
    help="A KPI gate, e.g. 'latency_p95 <= 1.5x', "
    "'error_rate <= +0.02', 'confidence >= -0.1', 'accuracy >= -0.05', 'drift' (the drift detector's verdict on "
    "the release); repeat for more; 'none' for no "
    "KPI gate. [default: those four]",
)
@click.option(
    "--kpi-min-count",
    type=int,
    metavar="N",
    help="Inferences (labelled rows for accuracy) a KPI gate needs on each side before it decides. [default: 200]",
)
@click.option(
    "--on-failure", type=click.Choice(["rollback", "pause"]), help="What a failed gate does. [default: rollback]"
)
@click.option(
    "--device-timeout",
    metavar="DURATION",
    help="Silence mid-update after which a device is retried, then timed out. [default: 30m]",
)
@click.option(
    "--retries",
    type=int,
    metavar="N",
    help="Sends again after a timeout or a passing failure "
    "(never after a failed signature, smoke test or probation). [default: 2]",
)
@click.option(
    "--window",
    metavar='"CRON DURATION"',
    help="Maintenance window in each device's local time (its tz "
    "tag, else UTC), e.g. '0 2 * * * 4h'. [default: any time]",
)
@click.option("--spread-by", metavar="TAG", help="Spread each wave across the values of this tag (e.g. site).")
@click.option("--seed", type=int, help="Seed of the wave order. [default: drawn, and kept with the campaign]")
@home_option
@json_option
def create(ref: tuple[str, str], select: str | None, waves: str | None, soak: str | None, max_failed: float | None,
           max_timed_out: float | None, min_devices: int | None, kpis: Sequence[str], kpi_min_count: int | None,
           on_failure: str | None, device_timeout: str | None, retries: int | None, window: str | None,
           spread_by: str | None, seed: int | None, home: Path | None, as_json: bool) -> None:  # fmt: skip
    """Create a campaign that ships a release in waves; prints its id. `fleet serve` runs it.

    Each wave starts after the one before has finished, soaked and passed its gates. A device counts as succeeded
    only once it committed the release after its probation. Exit code 2 for options that do not parse, 3 for an
    unknown release, 2 when no device fits, 1 when another active campaign of the model holds some of them.
    """
    try:
        spec = parse_spec(select=select, waves=waves, soak=soak, max_failed=max_failed, max_timed_out=max_timed_out,
                          min_devices=min_devices, kpis=kpis, kpi_min_count=kpi_min_count, on_failure=on_failure,
                          device_timeout=device_timeout, retries=retries, window=window, spread_by=spread_by,
                          seed=seed)  # fmt: skip
    except ValueError as exc:
        raise Invalid("bad_option", str(exc), "see `fleet rollout create --help`") from None
    with contextlib.closing(open_store(home, write=True)) as store:
        made = ops.create(store, open_repository(home, store), *ref, spec, actor=actor())
        executions = store.executions(made.campaign.id)
    if as_json:
        echo_json({"id": made.campaign.id, "skipped": made.skipped, "cannot_roll_back": made.cannot_roll_back})
        return
    click.echo(made.campaign.id)
    sizes = ", ".join(str(sum(e.wave == w for e in executions)) for w in range(made.campaign.waves))
    click.echo(f"{made.campaign.release} to {len(executions)} devices in {made.campaign.waves} waves ({sizes}); "
               f"seed {spec.seed}", err=True)  # fmt: skip
    if made.skipped:
        some = "; ".join(f"{d} ({why})" for d, why in list(made.skipped.items())[:5])
        click.echo(f"left out {len(made.skipped)}: {some}", err=True)
    if made.cannot_roll_back:
        device_id, why = next(iter(made.cannot_roll_back.items()))
        click.echo(f"{len(made.cannot_roll_back)} devices could not be rolled back ({device_id}: {why}); assign them a "
                   "published release first to make them returnable", err=True)  # fmt: skip
    if not _serving(home):
        click.echo("`fleet serve` is not running on this home: the campaign starts when it does", err=True)


def _serving(home: Path | None) -> bool:
    return running_serve(resolve_home(home)) is not None


@rollout.command(name="list")
@home_option
@json_option
def list_command(home: Path | None, as_json: bool) -> None:
    """List campaigns, oldest first, with their state and progress."""
    with contextlib.closing(open_store(home)) as store:
        docs = [views.campaign_json(c, store.executions(c.id)) for c in store.campaigns()]
    if as_json:
        echo_json(docs)
        return
    table = Table("id", "release", "state", "wave", "devices", "succeeded", "failed", "timed out", "reason")
    for d in docs:
        counts = d["counts"]
        table.add_row(d["id"], d["release"], d["state"], f"{d['wave']}/{len(d['waves'])}", str(d["device_count"]),
                      str(counts.get("succeeded", 0)), str(counts.get("failed", 0)), str(counts.get("timed_out", 0)),
                      d["reason"] or "")  # fmt: skip
    Console().print(table)


@rollout.command()
@click.argument("campaign_id", metavar="ID")
@click.option("--watch", is_flag=True, help="Keep the view up to date until the campaign ends (Ctrl-C stops).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes of --watch.")
@home_option
@json_option
def status(campaign_id: str, watch: bool, interval: float, home: Path | None, as_json: bool) -> None:
    """Show a campaign: each wave's progress, the gates with their current values, every device, and why it stopped.

    With --json, one document (--watch: one per line, each time it changes). Exit code 3 for an unknown campaign.
    """
    doc = _read(home, campaign_id)
    if not watch:
        if as_json:
            echo_json(doc)
        else:
            Console().print(_render(doc))
        return
    if as_json:
        last = None
        while True:
            if doc != last:
                echo_json(doc)
                last = doc
            if doc["state"] in _ENDS:
                return
            time.sleep(interval)
            doc = _read(home, campaign_id)
    with Live(_render(doc), refresh_per_second=4) as live:
        while doc["state"] not in _ENDS:
            time.sleep(interval)
            doc = _read(home, campaign_id)
            live.update(_render(doc))


def _read(home: Path | None, campaign_id: str) -> dict[str, Any]:
    with contextlib.closing(open_store(home)) as store:
        return views.campaign_json(*ops.status(store, campaign_id))


def _render(doc: dict[str, Any]) -> Group:
    head = Text.assemble((doc["id"], "bold"), f"  {doc['release']}  ", (doc["state"], _STYLE.get(doc["state"], "")))
    parts: list[Any] = [head]
    if doc["reason"]:
        parts.append(Text(f"why: {doc['reason']}"))
    waves = Table("wave", "progress", "devices", "succeeded", "failed", "timed out", "in flight", "state", box=None)
    for w in doc["waves"]:
        c = w["counts"]
        done = sum(c.get(s, 0) for s in ("succeeded", "failed", "timed_out", "rolled_back"))
        flight = w["devices"] - done - c.get("queued", 0)
        waves.add_row(str(w["wave"]), ProgressBar(total=max(w["devices"], 1), completed=done, width=30),
                      str(w["devices"]), str(c.get("succeeded", 0)), str(c.get("failed", 0)),
                      str(c.get("timed_out", 0)), str(flight), w["state"])  # fmt: skip
    parts.append(waves)
    if doc["gates"]:
        gates = Table("gate", "verdict", "now", box=None)
        for g in doc["gates"]:
            gates.add_row(g["gate"], Text(g["verdict"], _STYLE.get(g["verdict"], "")), g["detail"])
        parts.append(gates)
    stuck = [d for d in doc["devices"] if d["state"] in ("failed", "timed_out")][:10]
    if stuck:
        devices = Table("device", "wave", "state", "reason", box=None)
        for d in stuck:
            devices.add_row(d["device_id"], str(d["wave"]), d["state"], d["reason"] or "")
        parts.append(devices)
    return Group(*parts)


_STYLE = {"succeeded": "green", "pass": "green", "running": "cyan", "fail": "red", "rolled_back": "red",
          "rolling_back": "yellow", "paused": "yellow", "aborted": "red", "pending": "dim"}  # fmt: skip


def _action(name: str, summary: str) -> click.Command:
    @click.command(name=name, help=summary)
    @click.argument("campaign_id", metavar="ID")
    @click.option("--reason", help="Why, for the audit log.")
    @home_option
    @json_option
    def command(campaign_id: str, reason: str | None, home: Path | None, as_json: bool) -> None:
        with contextlib.closing(open_store(home, write=True)) as store:
            moved = ops.act(store, campaign_id, name, actor=actor(), reason=reason)
        if as_json:
            echo_json({"id": moved.id, "state": moved.state})
        else:
            click.echo(f"{moved.id}: {moved.state}")

    return command


for _name, _summary in (
    ("pause", "Pause a campaign: no more devices are sent the release until `resume`. Devices under way go on."),
    ("resume", "Resume a paused campaign; its gates are checked again first."),
    ("abort", "Stop a campaign for good: nothing more is sent, nothing is undone (see `rollback`)."),
    ("rollback", "Roll a campaign back: every device it touched is sent its last committed release; the devices it "
                 "never reached are sent nothing."),
):  # fmt: skip
    rollout.add_command(_action(_name, _summary))
