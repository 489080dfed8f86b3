"""What every `fleet` command shares: the --home and --json options, JSON output, parameter types, the store and
repository of an existing home, and the broker options of commands that reach devices. Command modules import this
module and nothing else of `fleet.cli`."""

from __future__ import annotations

import json
import os
import pwd
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from fleet.errors import FleetError, StoreUnavailable
from fleet.home import HOME_ENV, Home, resolve_home, running_serve
from fleet.ops import releases
from fleet.publisher import DesiredPublisher
from fleet.store import Store
from fleet.store import open_store as store_at
from fleet.trust.repository import Repository

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A library refusal as a CLI error: its one line (what was wrong; how to fix it) and its exit code."""

    def __init__(self, error: FleetError) -> None:
        super().__init__(error.message())
        self.exit_code = error.exit_code


class FleetGroup(click.Group):
    """A command group whose commands' :class:`FleetError` s end as one line and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            raise CommandError(exc) from None


def home_option(f: F) -> F:
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Fleet home folder. [default: ${HOME_ENV}, else ~/.edgefleet]",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a human view.")(f)


def echo_json(value: Any) -> None:
    """One JSON document on one line: histograms stay compact, and `jq` pretty-prints when a person reads it."""
    click.echo(json.dumps(value, sort_keys=True, separators=(",", ":")))


def open_store(home: Path | None, *, write: bool = False) -> Store:
    """The store of an existing home: a typo in --home never creates a fleet.

    Read commands (``write=False``) open the database read-only, so they work on a home they cannot write; only an
    older schema, which must be migrated first, makes them open it for writing.
    """
    db = Home(resolve_home(home)).db
    if not db.exists():
        raise FleetError("no_fleet", f"no fleet database at {db}", "run `fleet init` or `fleet serve` first")
    if not write:
        try:
            return store_at(db, read_only=True)
        except StoreUnavailable as exc:
            if exc.reason != "schema_mismatch":
                raise
    return store_at(db)


def open_repository(home: Path | None, store: Store) -> Repository:
    """The TUF repository of an existing home, checked on every load against what ``store`` recorded after the fleet's
    last change to it (an old backup put back is refused by every command, not only by some)."""
    return releases.open_repository(resolve_home(home), store)


def actor() -> str:
    """Who runs this command, for the audit log: the OS user (the fleet has no accounts of its own)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid:{os.geteuid()}"


def validate_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            BrokerAddress.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


_RELATIVE_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def span_seconds(text: str) -> float | None:
    """Seconds in a span like 30s, 10m, 2h, 1d, 1w; None if the text is not one."""
    match = _RELATIVE_RE.fullmatch(text.strip())
    return float(match[1]) * _UNIT_S[match[2]] if match else None


class Duration(click.ParamType):
    """A span of time: 30s, 10m, 2h, 1d, 1w."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        seconds = span_seconds(str(value))
        if not seconds:
            self.fail(f"{value!r} is not a span like 30m, 12h, 7d", param, ctx)
        return seconds


class TimeSpec(click.ParamType):
    """A point in time: ISO 8601 (UTC unless it names a zone) or an age like 30s, 10m, 2h, 1d, 1w."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        age = span_seconds(text)
        if age is not None:
            return time.time() - age
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither ISO 8601 nor an age like 10m, 2h, 1d", param, ctx)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class ReleaseRef(click.ParamType):
    """A release as NAME:VERSION."""

    name = "NAME:VERSION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        model, sep, version = str(value).partition(":")
        if not (model and sep and version):
            self.fail(f"{value!r} is not NAME:VERSION (for example digits:1.0.0)", param, ctx)
        return model, version


def broker_settings(
    home: Path | None, broker_url: str | None, prefix: str | None, tls: TlsFiles, timeout: float
) -> tuple[Callable[[], DesiredPublisher], str]:
    """How to reach devices: a connect function for the broker and the topic prefix, from the options given, else
    from what the running `fleet serve` recorded. Connecting, not this, fails when nothing names a broker."""
    running = running_serve(home) or {}
    url = broker_url or running.get("broker")
    if tls == TlsFiles() and broker_url is None:
        tls = TlsFiles(**{k: Path(v) for k, v in running.get("tls", {}).items()})

    def connect() -> DesiredPublisher:
        if url is None:
            raise FleetError("no_broker", "no broker", "start `fleet serve` on this home, or pass --broker URL")
        return DesiredPublisher(url, tls, timeout)

    return connect, prefix or running.get("prefix") or protocol.DEFAULT_PREFIX


def broker_options(f: F) -> F:
    """--broker, --prefix and the mqtts:// files, for commands that reach devices through the broker."""
    for option in reversed(
        (
            click.option(
                "--broker",
                "broker_url",
                metavar="URL",
                callback=validate_broker,
                help="mqtt://HOST:PORT or mqtts://HOST:PORT. [default: the broker of the running `fleet serve`]",
            ),
            click.option("--prefix", help="Topic prefix. [default: the running `fleet serve`'s, else edgefleet/v1]"),
            click.option("--ca", type=existing_file, help="CA certificate for mqtts://."),
            click.option("--cert", type=existing_file, help="Client certificate for mqtts://."),
            click.option("--key", type=existing_file, help="Client key for mqtts://."),
        )
    ):
        f = option(f)
    return f
