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
from agent.targets import parse_target_path
from fleet.home import HOME_ENV, Home, resolve_home, running_serve
from fleet.store.sqlite import Store
from fleet.trust.repository import Repository, RepositoryError

EXIT_NOT_FOUND = 3

EXIT_NOT_FOUND = 3
F = TypeVar("F", bound=Callable[..., Any])


class NotFound(click.ClickException):
    """A device (or other named thing) that the fleet does not know: exit code 3."""

    exit_code = EXIT_NOT_FOUND


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


def open_store(home: Path | None) -> Store:
    """The store of an existing home. Read commands never create a fleet as a side effect of a typo in --home."""
    db = Home(resolve_home(home)).db
    if not db.exists():
        raise click.ClickException(f"no fleet database at {db}; run `fleet init` or `fleet serve` first")
    return Store(db)


def open_repository(home: Path | None) -> Repository:
    """The TUF repository of an existing home."""
    try:
        return Repository(resolve_home(home))
    except RepositoryError as exc:
        raise click.ClickException(f"{exc} (`fleet init`)") from None


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


def release_of(entry: dict[str, Any]) -> str:
    """A desired-state model entry as the "name:version" devices report."""
    name, version, _ = parse_target_path(entry["target"])
    return f"{name}:{version}"


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
    home: Path | None, broker_url: str | None, prefix: str | None, tls: TlsFiles
) -> tuple[str, str, TlsFiles]:
    """Broker URL, prefix and TLS files: the options given, else what the running `fleet serve` recorded."""
    running = running_serve(home) or {}
    url = broker_url or running.get("broker")
    if url is None:
        raise click.ClickException("no broker: start `fleet serve` on this home, or pass --broker URL")
    if tls == TlsFiles() and broker_url is None:
        tls = TlsFiles(**{k: Path(v) for k, v in running.get("tls", {}).items()})
    return url, prefix or running.get("prefix") or protocol.DEFAULT_PREFIX, tls


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
