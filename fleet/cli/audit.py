"""`fleet audit`: the hash-chained log of what changed releases and desired state, and who did it; with --verify, the
chain and the release repository's history (as `fleet release verify` checks it)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fleet import views
from fleet.cli.common import echo_json, home_option, json_option, open_repository, open_store
from fleet.errors import FleetError
from fleet.ops import releases


@click.command()
@click.option(
    "--verify",
    is_flag=True,
    help="Check the hash chain and the repository's history; exit 1 naming the first bad row or file.",
)
@home_option
@json_option
def audit(verify: bool, home: Path | None, as_json: bool) -> None:
    """List the audit log (publish, revoke, assign, enroll), oldest first.

    With --verify, also walk the hash chain: each row's hash covers its content and the row before, so an edited,
    removed or reordered row is found. Keep the printed head hash elsewhere to also catch rows cut off the end. The
    release repository's history is checked too (`fleet release verify` prints each finding).
    --json prints {"entries": [...], "verify": null, or the check's ok, rows, head, bad_id and problem,
    "repository": null, or `fleet release verify --json`'s report}.
    """
    with contextlib.closing(open_store(home)) as store:
        entries = store.audit()
        check = store.verify_audit() if verify else None
        repository = open_repository(home, store) if verify else None
        history = None if repository is None else releases.verify(repository)
    if as_json:
        echo_json(
            {
                "entries": [views.audit_entry_json(e) for e in entries],
                "verify": None if check is None else views.audit_check_json(check),
                "repository": None if history is None else history.as_dict(),
            }
        )
    else:
        table = Table("#", "ts (UTC)", "actor", "action", "subject", "detail")
        for e in entries:
            detail = json.dumps(e.detail, separators=(",", ":"), sort_keys=True)
            table.add_row(str(e.id), views.iso(e.ts), e.actor, e.action, e.subject, detail)
        Console().print(table)
        if check is not None and check.ok:
            click.echo(f"chain verified: {check.rows} rows, head {check.head}")
        if history is not None:
            click.echo(history.summary())
    if check is not None and not check.ok:
        raise FleetError(
            "audit_broken",
            f"audit chain broken at row {check.bad_id}: {check.problem}; the {check.rows} rows before it verify",
            "restore the database from a backup and compare",
        )
    if repository is not None and history is not None and not history.ok:
        raise repository.refusal(history)
