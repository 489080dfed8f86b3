"""`fleet enroll`: the folder a device needs to join the fleet (:mod:`fleet.ops.enroll` writes it)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import click

from agent import protocol
from fleet.cli.common import (
    actor,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
    running_serve,
    validate_broker,
)
from fleet.errors import FleetError
from fleet.ops.enroll import DEFAULT_STATE_DIR, BundleSettings, parse_tags
from fleet.ops.enroll import enroll as enroll_device


def _device_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not protocol.valid_device_id(value):
        raise click.BadParameter(f"{value!r} is not a device id ({protocol.DEVICE_ID_PATTERN})")
    return value


def _repo_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    parts = urlsplit(value or "")
    if value is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


@click.command()
@click.argument("device_id", metavar="DEVICE", callback=_device_id)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    callback=validate_broker,
    help="Broker the device connects to. [default: the running `fleet serve`'s]",
)
@click.option(
    "--repo-url",
    metavar="URL",
    callback=_repo_url,
    help="Release repository the device downloads from. [default: the running `fleet serve`'s]",
)
@click.option("--prefix", help="Topic prefix. [default: the running `fleet serve`'s, else edgefleet/v1]")
@click.option(
    "--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="The agent's state folder on the device."
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with a factory model and its card.json, copied into the bundle so the device starts with a model.",
)
@click.option("--model-file", default="int8.onnx", show_default=True, help="Which file of --model-dir is the model.")
@click.option(
    "--listen",
    metavar="ADDRESS",
    help="Where the device's local inference API listens: HOST:PORT or unix:/absolute/path. [default: the agent's, "
    "127.0.0.1:8321]",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    help="A tag to select the device by (site=berlin, hw=pi4, ...); repeat for more. `fleet devices list` shows them.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing bundle in --out.")
@home_option
@json_option
def enroll(
    device_id: str,
    out_dir: Path,
    broker_url: str | None,
    repo_url: str | None,
    prefix: str | None,
    state_dir: str,
    model_dir: Path | None,
    model_file: str,
    listen: str | None,
    tags: tuple[str, ...],
    force: bool,
    home: Path | None,
    as_json: bool,
) -> None:
    """Write the bundle DEVICE needs to join the fleet into --out: agent.toml, root.json and director.pub.json.

    The broker and repository URLs default to those of the running `fleet serve`; give reachable addresses when
    the device is another machine. Exit 1 if --out already holds a bundle (unless --force) or nothing says where the
    broker or repository is.
    """
    running = running_serve(home) or {}
    broker_url = broker_url or running.get("broker")
    repo_url = repo_url or running.get("repo")
    if broker_url is None or repo_url is None:
        raise FleetError(
            "no_broker", "no broker or repository URL", "start `fleet serve`, or pass --broker and --repo-url"
        )
    settings = BundleSettings(
        broker_url=broker_url,
        repo_url=repo_url,
        prefix=prefix or running.get("prefix") or protocol.DEFAULT_PREFIX,
        state_dir=state_dir,
        listen=listen,
        model_dir=model_dir,
        model_file=model_file,
        tags=parse_tags(tags),
    )
    with contextlib.closing(open_store(home, write=True)) as store:
        repository = open_repository(home, store)
        done = enroll_device(store, repository, device_id, out_dir, settings, actor=actor(), force=force)
    for warning in done.warnings:
        click.echo(f"warning: {warning}", err=True)
    summary = done.summary
    if as_json:
        echo_json({**summary, "files": done.files})
        return
    click.echo(f"enrolled {device_id} in {out_dir}: agent.toml, root.json, director.pub.json")
    click.echo(f"  broker {summary['broker']}  repo {repo_url}")
    click.echo("  copy the folder to the device (e.g. /etc/edge-agent/) and run `edge-agent run --config agent.toml`")
