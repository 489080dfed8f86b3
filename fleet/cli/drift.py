"""`fleet drift`: which devices, sites or the whole fleet see data their model was not made for, and what moved."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from fleet.cli.common import echo_json, home_option, json_option, open_store
from fleet.drift import heatmap
from fleet.drift.detector import alarm_json
from fleet.errors import NotFound
from fleet.views import iso


@click.group()
def drift() -> None:
    """Drift alarms from the devices' telemetry: per device, per site (tag) and fleet-wide."""


def _item(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "since": iso(doc["since"]), "updated_at": iso(doc["updated_at"])}


@drift.command()
@click.option("--all", "show_all", is_flag=True, help="Also list scopes whose state is ok.")
@home_option
@json_option
def status(show_all: bool, home: Path | None, as_json: bool) -> None:
    """List the scopes in warning or drift (each: scope, device_id or group, kind, state, features, since).

    A warning is a shift seen in one round; a drift has persisted (2 of the last 3 rounds). Kinds: data (the
    inputs), prediction (the answers), concept (the feedback error rate), accuracy (estimated without labels from
    the confidence histogram, and measured where feedback exists).
    """
    with contextlib.closing(open_store(home)) as store:
        rows = store.drift_tracks(None if show_all else ["warning", "drift"])
    docs = [_item(alarm_json(r)) for r in rows]
    if as_json:
        echo_json(docs)
        return
    if not docs:
        click.echo("no drift: every judged device, site and the fleet look like their release's reference")
        return
    table = Table("scope", "where", "kind", "state", "since", "model", "what moved")
    for d in docs:
        table.add_row(d["scope"], d["key"], d["kind"], d["state"], d["since"] or "-", d["release"], d["detail"])
    Console().print(table)


@drift.command()
@click.argument("target", metavar="DEVICE|GROUP")
@click.option(
    "--png",
    "png_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the per-feature shift as a heat map PNG (image-like inputs: a square number of features).",
)
@home_option
@json_option
def show(target: str, png_path: Path | None, home: Path | None, as_json: bool) -> None:
    """Show one device's or group's (e.g. site=north, or fleet) drift: every kind, the features ranked by effect
    with their direction, the classes whose share moved, and for square inputs a heat map of the shift.

    Exit code 3 if the detector has judged nothing of that name.
    """
    with contextlib.closing(open_store(home)) as store:
        rows = [r for r in store.drift_tracks() if r.key == target]
    if not rows:
        raise NotFound("unknown_drift_scope", f"the drift detector has judged no device or group {target!r}",
                       "see `fleet drift status --all` for the names it knows")  # fmt: skip
    docs = [_item(alarm_json(r)) for r in rows]
    data = next((r for r in rows if r.kind == "data" and r.features), None)
    shift = _shift_map(data.figures) if data else None
    if png_path is not None:
        if shift is None:
            raise NotFound("no_heat_map", f"{target} has no data drift with features to draw",
                           "draw a scope whose data kind moved")  # fmt: skip
        png_path.write_bytes(heatmap.png(*shift))
    if as_json:
        echo_json({"key": target, "tracks": docs})
        return
    console = Console()
    for d in docs:
        since = d["since"] or "-"
        console.print(f"[bold]{d['kind']}[/bold] {d['state']} since {since} ({d['release']}): {d['detail']}")
        for f in d["features"]:
            way = "up" if f["direction"] > 0 else "down"
            console.print(f"  feature {f['feature']}: {way}, JS {f['effect']:.4f}, PSI {f['psi']:.3f}, "
                          f"p {f['p_value']:.2g}, {f['observed']} rows")  # fmt: skip
    if shift is not None:
        click.echo(heatmap.terminal(*shift, color=console.is_terminal))
        click.echo(heatmap.legend(shift[0]))


def _shift_map(figures: dict[str, Any]) -> tuple[list[float], tuple[int, int]] | None:
    """Every feature's signed effect against the reference (JS, + where values moved up) laid out square, or None
    for inputs that are not a square image."""
    values = [float(v) for v in figures.get("shift", [])]
    side = math.isqrt(len(values))
    if not values or side * side != len(values):
        return None
    return values, (side, side)
