"""`fleet release publish|list|show|revoke|verify`: model releases as signed TUF targets.

A publish or revoke that fails changes nothing: the repository commits by one rename, after every check. Each change
that succeeds is written to the store's hash-chained audit log, and what it left in the repository to the store's
record, which every command checks the repository against: a repository that is not the history the fleet wrote (a
metadata file copied over another, an old backup put back) is refused in one line naming the file; `fleet release
verify` lists every finding.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fleet.cli.common import (
    ReleaseRef,
    actor,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
)
from fleet.ops import releases

#: Models this large get a progress bar while they are copied and hashed (on a terminal only).
_PROGRESS_BYTES = 16 * 2**20


@click.group()
def release() -> None:
    """Publish, list, show, revoke and verify signed model releases."""


@release.command()
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name; devices run one release per name.")
@click.option("--version", "version", required=True, help="Release version; each version is published once.")
@click.option(
    "--card",
    "card_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model card JSON (I/O schema, drift reference, smoke test, provenance). [default: card.json beside the model]",
)
@click.option(
    "--machine",
    "machines",
    multiple=True,
    help="A machine (platform.machine()) the release is for; repeat for several. [default: aarch64, armv7l, x86_64]",
)
@click.option("--source-commit", help="Source commit of the model, added to the signed provenance.")
@home_option
@json_option
def publish(
    model_file: Path,
    name: str,
    version: str,
    card_path: Path | None,
    machines: tuple[str, ...],
    source_commit: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Publish MODEL_FILE (.onnx or .tflite) as release NAME:VERSION, signed with the targets key.

    The file must load with its runtime; devices see the release on their next TUF refresh. Exit 1 if refused
    (nothing is changed then).
    """
    card = releases.read_card(card_path or model_file.parent / "card.json")
    size = model_file.stat().st_size
    bar = click.progressbar(length=size, label=f"publishing {model_file.name}", file=sys.stderr)
    show = size >= _PROGRESS_BYTES and sys.stderr.isatty()
    with contextlib.closing(open_store(home, write=True)) as store, bar if show else contextlib.nullcontext():
        info, warnings = releases.publish(
            open_repository(home, store),
            store,
            model_file,
            name,
            version,
            card,
            actor=actor(),
            machines=machines,
            source_commit=source_commit,
            progress=bar.update if show else None,
        )
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        echo_json(info.as_dict())
        return
    click.echo(f"published {name}:{version} as release {info.release} of {name} ({info.runtime}, {info.length} bytes)")
    click.echo(f"  target {info.target}  sha256 {info.sha256}")


@release.command("list")
@home_option
@json_option
def list_releases(home: Path | None, as_json: bool) -> None:
    """List every release, by model then release counter; revoked ones are marked.

    Exit 1 if the repository is not the history the fleet wrote (see `fleet release verify`).
    """
    with contextlib.closing(open_store(home)) as store:
        found = open_repository(home, store).releases()
    if as_json:
        echo_json(found)
        return
    table = Table("release", "counter", "runtime", "bytes", "sha256", "revoked")
    for r in found:
        table.add_row(
            f"{r['name']}:{r['version']}",
            str(r["release"]),
            r["runtime"],
            str(r["length"]),
            r["sha256"][:16],
            "yes" if r["revoked"] else "",
        )
    Console().print(table)


@release.command()
@click.argument("ref", metavar="NAME:VERSION", type=ReleaseRef())
@home_option
@json_option
def show(ref: tuple[str, str], home: Path | None, as_json: bool) -> None:
    """Show one release: target, hash, counters, hardware and its signed model card. Exit code 3 if unknown."""
    with contextlib.closing(open_store(home)) as store:
        info = open_repository(home, store).release(*ref)
    if as_json:
        echo_json(info)
        return
    fields = Table.grid(padding=(0, 2))
    for key in ("name", "version", "release", "min_release", "revoked", "runtime", "target", "sha256", "length"):
        fields.add_row(key, str(info[key]))
    fields.add_row("machines", ", ".join(info["hardware"]["machines"]))
    card = info["card"]
    fields.add_row("summary", str(card.get("summary", "-")))
    fields.add_row("provenance", json.dumps(card.get("provenance"), sort_keys=True, separators=(",", ":")))
    Console().print(fields)


@release.command()
@click.argument("ref", metavar="NAME:VERSION", type=ReleaseRef())
@home_option
@json_option
def revoke(ref: tuple[str, str], home: Path | None, as_json: bool) -> None:
    """Revoke NAME:VERSION and every older release of the model: devices refuse them from their next refresh.

    Raises the model's signed min_release above this release. Revoking a revoked release changes nothing. Exit code
    3 if the release is unknown.
    """
    name, version = ref
    with contextlib.closing(open_store(home, write=True)) as store:
        info, changed = releases.revoke(open_repository(home, store), store, name, version, actor=actor())
    if as_json:
        echo_json({**info.as_dict(), "changed": changed})
        return
    state = "revoked" if changed else "was already revoked"
    click.echo(f"{name}:{version} {state}: {name} releases below {info.min_release} are refused by devices")


@release.command()
@home_option
@json_option
def verify(home: Path | None, as_json: bool) -> None:
    """Check the repository's whole history; print each finding. Exit 0 if consistent, 1 if not.

    Checked: the root chain (each N.root.json signed by root N-1 and by itself; root.json the newest), timestamp ->
    snapshot -> targets (length, sha256 and version as recorded, signatures), every versioned file's version against
    its name, targets versions never going down, and the versions and hashes the fleet recorded after its last
    change (a repository behind them, or a recorded file changed, is refused). Files left over from a change that
    crashed before its commit are listed, not fatal. --json prints {"ok", "versions", "recorded", "files",
    "findings": [{"reason", "file", "detail", "fatal"}]}.
    """
    with contextlib.closing(open_store(home)) as store:
        repository = open_repository(home, store)
        report = releases.verify(repository)
    if as_json:
        echo_json(report.as_dict())
    else:
        for finding in report.findings:
            click.echo(f"{'FAIL' if finding.fatal else 'note'} {finding.reason}: {finding}")
        click.echo(report.summary())
    if not report.ok:
        raise repository.refusal(report)
