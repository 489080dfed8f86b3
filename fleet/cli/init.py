"""`fleet init`: parse, call :func:`fleet.ops.init.init_fleet`, print."""

from __future__ import annotations

from pathlib import Path

import click

from fleet.cli.common import echo_json, home_option, json_option
from fleet.home import resolve_home
from fleet.ops.init import InitResult, init_fleet


@click.command()
@home_option
@click.option(
    "--root-threshold",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many root keys must sign a new root.",
)
@click.option(
    "--root-keys", type=click.IntRange(min=1), default=1, show_default=True, help="How many root keys to make."
)
@json_option
def init(home: Path | None, root_threshold: int, root_keys: int, as_json: bool) -> None:
    """Create the fleet home: database, signing keys and the TUF repository of releases.

    Safe to run again: only what is missing is made, existing keys and repository are kept (never replaced), and
    an older database schema is migrated. Key files are owner-only (0600). Prints which keys belong offline.
    """
    if root_threshold > root_keys:
        raise click.UsageError(f"--root-threshold {root_threshold} is more than the {root_keys} --root-keys")
    # Given or not matters: a home's existing root policy is refused only when the user asked for another one.
    given = _given("root_threshold", "root_keys")
    result = init_fleet(  # its FleetError ends as one line and its exit code (fleet.cli.common.FleetGroup)
        resolve_home(home),
        root_threshold=root_threshold if given else None,
        root_keys=root_keys if given else None,
    )
    if as_json:
        echo_json(_document(result))
        return
    for path in result.created:
        click.echo(f"created {path}")
    if not result.created:
        click.echo(f"fleet home {result.home} is up to date")
    if not result.repository_created:
        click.echo(
            f"kept the existing keys and repository (root: {result.root_keys} keys, threshold {result.root_threshold})"
        )
    for role in result.keys:
        click.echo(f"{role.role:<9} {role.placement}")
        for path in role.files:
            click.echo(f"          {path}")


def _given(*params: str) -> bool:
    """True if the user typed any of these options (rather than getting their defaults)."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT for p in params)


def _document(result: InitResult) -> dict[str, object]:
    """`fleet init --json`."""
    return {
        "home": str(result.home),
        "db": str(result.db),
        "schema_version": result.schema_version,
        "created": [str(p) for p in result.created],
        "repository": {"path": str(result.repository), "created": result.repository_created},
        "root": {"threshold": result.root_threshold, "keys": result.root_keys},
        "keys": {
            role.role: {"files": [str(p) for p in role.files], "placement": role.placement} for role in result.keys
        },
    }
