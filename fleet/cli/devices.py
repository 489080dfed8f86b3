"""Read commands over the ingested state: `fleet devices list|show`, `fleet telemetry`, `fleet status`.

Every command has --json for scripts; the human views are rich tables. An unknown device exits with code 3.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent import protocol
from agent.histograms import latency_quantile_ms
from fleet import views
from fleet.cli.common import TimeSpec, echo_json, home_option, json_option, open_store
from fleet.errors import NotFound


def _text(value: Any) -> str:
    """A field for a human view: structures as compact JSON, missing values as a dash."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return f"> {protocol.LATENCY_EDGES_MS[-1]:g} ms"
    return f"<= {value:g} ms"


#: Devices `fleet status` names beside its gap count (most seqs missing first).
_GAP_DEVICES_SHOWN = 10


def _unknown(device_id: str) -> NotFound:
    return NotFound("unknown_device", f"unknown device {device_id!r}", "see `fleet devices list`")


@click.group()
def devices() -> None:
    """The devices the fleet has heard from."""


@devices.command("list")
@home_option
@json_option
def list_devices(home: Path | None, as_json: bool) -> None:
    """List every device.

    Shows its online state, when it was last heard from, how many windows are stored, agent version and the release
    each model runs (as its last birth message said), and the tags it was enrolled with.
    """
    with contextlib.closing(open_store(home)) as store:
        rows = [views.device_summary_json(d) for d in store.devices()]
    if as_json:
        echo_json(rows)
        return
    table = Table("device", "online", "last seen (UTC)", "windows", "agent", "releases", "tags")
    for row in rows:
        table.add_row(
            row["device_id"],
            "yes" if row["online"] else "no",
            row["last_seen"],
            str(row["windows"]),
            row["agent_version"] or "-",
            ", ".join(release or f"{name} (no release)" for name, release in sorted(row["releases"].items())) or "-",
            " ".join(f"{key}={value}" for key, value in sorted(row["tags"].items())) or "-",
        )
    Console().print(table)


@devices.command("show")
@click.argument("device_id", metavar="DEVICE")
@home_option
@json_option
def show_device(device_id: str, home: Path | None, as_json: bool) -> None:
    """Show one device in detail.

    Birth fields (hardware, runtimes, models with the release each runs), window and event counts, the last install
    outcome the device reported, the last desired state the fleet published for it, the latest events, and its gaps:
    runs of seqs between stored windows and events that the fleet does not hold. A seq the device dropped itself
    (outbox or disk full) is a gap too, and was counted in a later window's `dropped`; a resend that arrives closes
    its gap. Exit code 3 if unknown.
    """
    with contextlib.closing(open_store(home)) as store:
        detail = store.device(device_id)
        desired = store.desired(device_id)
    if detail is None:
        raise _unknown(device_id)
    info = views.device_detail_json(detail, desired)
    if as_json:
        echo_json(info)
        return
    console = Console()
    fields = Table.grid(padding=(0, 2))
    for key in (
        "device_id",
        "online",
        "offline_reason",
        "boot_id",
        "agent_version",
        "first_seen",
        "last_seen",
        "windows",
        "events",
        "missing",
        "hardware",
        "runtimes",
        "models",
        "last_install",
        "desired",
    ):
        fields.add_row(key, _text(info[key]))
    console.print(fields)
    events = Table("type", "model", "detail", title="latest events")
    events.add_column("ts (UTC)", no_wrap=True)
    for e in info["last_events"]:
        events.add_row(e["type"], _text(e["model"]), _text(e["detail"]), e["ts"])
    console.print(events)
    if info["gaps"]:
        title = f"gaps: {info['missing']} seqs missing (the latest runs)"
        gaps = Table("seqs", "missing", "boot before", "boot after", title=title)
        for g in info["gaps"]:
            seqs = str(g["first"]) if g["first"] == g["last"] else f"{g['first']}-{g['last']}"
            gaps.add_row(seqs, str(g["missing"]), g["prev_boot_id"], g["boot_id"])
        console.print(gaps)


@click.command()
@click.argument("device_id", metavar="DEVICE")
@click.option("--model", help="Only this model's windows.")
@click.option("--since", type=TimeSpec(), help="Windows starting at or after T (ISO 8601 or an age: 10m, 2h, 1d).")
@click.option("--until", type=TimeSpec(), help="Windows starting before T (ISO 8601 or an age).")
@home_option
@json_option
def telemetry(
    device_id: str, model: str | None, since: float | None, until: float | None, home: Path | None, as_json: bool
) -> None:
    """Show a device's telemetry windows.

    Windows are merged per model release: totals, error rate, latency p50/p95, predicted classes. Exit code 3 if
    the device is unknown.
    """
    with contextlib.closing(open_store(home)) as store:
        if store.device(device_id) is None:
            raise _unknown(device_id)
        data = views.telemetry_json(store.telemetry(device_id, model=model, since=since, until=until))
    if as_json:
        echo_json(data)
        return
    console = Console()
    if not data["merged"]:
        console.print(f"no telemetry windows for {device_id} in this range")
    for group in data["merged"]:
        console.print(_merged_view(group))


def _merged_view(group: dict[str, Any]) -> Table:
    count = group["count"]
    rate = f"{group['errors'] / count:.2%}" if count else "-"
    title = f"{group['model']} {group['release'] or '(no release)'}: {group['windows']} windows"
    table = Table.grid(padding=(0, 2))
    table.title = title
    table.add_row("span (UTC)", f"{group['window_start']} .. {group['window_end']}")
    table.add_row("inferences", str(count))
    table.add_row("errors", f"{group['errors']} ({rate})")
    table.add_row("dropped", str(group["dropped"]))
    table.add_row("latency p50", _ms(latency_quantile_ms(group["latency"], 0.5)))
    table.add_row("latency p95", _ms(latency_quantile_ms(group["latency"], 0.95)))
    classes = ", ".join(f"{i}: {n}" for i, n in enumerate(group["classes"]) if n)
    table.add_row("predicted classes", classes or "-")
    return table


@click.command()
@home_option
@json_option
def status(home: Path | None, as_json: bool) -> None:
    """Show fleet-wide counts.

    Devices online and offline, windows and events stored, rejected messages by reason (`conflict`: a copy of a
    stored window or event that differs from it), and gaps: seqs missing between a device's stored windows and
    events, fleet-wide and per device (`fleet devices show DEVICE` lists them).
    """
    with contextlib.closing(open_store(home)) as store:
        summary = views.summary_json(store.summary())
    if as_json:
        echo_json(summary)
        return
    d = summary["devices"]
    table = Table.grid(padding=(0, 2))
    table.add_row("devices", f"{d['total']} ({d['online']} online, {d['offline']} offline)")
    table.add_row("windows", str(summary["windows"]))
    table.add_row("events", str(summary["events"]))
    rejects = ", ".join(f"{reason}: {n}" for reason, n in summary["rejects"].items())
    table.add_row("rejected", rejects or "none")
    gaps = summary["gaps"]
    if gaps["devices"]:
        worst = sorted(gaps["devices"].items(), key=lambda item: (-item[1], item[0]))
        named = ", ".join(f"{device}: {n}" for device, n in worst[:_GAP_DEVICES_SHOWN])
        more = f", {len(worst) - _GAP_DEVICES_SHOWN} more" if len(worst) > _GAP_DEVICES_SHOWN else ""
        table.add_row("gaps", f"{gaps['missing']} seqs missing on {len(worst)} devices ({named}{more})")
    else:
        table.add_row("gaps", "none")
    Console().print(table)
