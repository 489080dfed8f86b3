"""`fleet init` and `fleet serve`, plus the options and errors every home-reading command shares.

Exit codes scripts can rely on: 0 ok, 1 runtime failure, 2 usage error (click's), 3 not found.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import logs, protocol
from agent.link import BrokerAddress, TlsFiles
from agent.logs import event
from fleet.broker import Broker, embedded_broker
from fleet.home import HOME_ENV, Home, init_home, resolve_home
from fleet.ingest import Ingest
from fleet.store import SCHEMA_VERSION, Store

log = logging.getLogger(__name__)

EXIT_NOT_FOUND = 3
#: How long `serve` waits for the ingest to subscribe before announcing the broker anyway (and retrying).
_READY_TIMEOUT_S = 10.0

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


@click.command()
@home_option
@json_option
def init(home: Path | None, as_json: bool) -> None:
    """Create the fleet home and its database.

    Safe to run again: only what is missing is made, and an older database schema is migrated.
    """
    made = init_home(resolve_home(home))
    if as_json:
        echo_json(
            {
                "home": str(made.root),
                "db": str(made.db),
                "schema_version": SCHEMA_VERSION,
                "created": [str(p) for p in made.created],
            }
        )
        return
    for path in made.created:
        click.echo(f"created {path}")
    if not made.created:
        click.echo(f"fleet home {made.root} is up to date")


def _validate_broker(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            BrokerAddress.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@home_option
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    callback=_validate_broker,
    help="mqtt://HOST:PORT or mqtts://HOST:PORT. [default: start an embedded broker in the home]",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port of the embedded broker, so devices find it again after a restart. [default: a free port]",
)
@click.option("--prefix", default=protocol.DEFAULT_PREFIX, show_default=True, help="Topic prefix of the fleet.")
@click.option("--client-id", default="edgefleet-ingest", show_default=True, help="MQTT client id of the ingest.")
@click.option("--ca", type=_existing_file, help="CA certificate for mqtts://.")
@click.option("--cert", type=_existing_file, help="Client certificate for mqtts://.")
@click.option("--key", type=_existing_file, help="Client key for mqtts://.")
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds between ingest stats log lines.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def serve(
    home: Path | None,
    broker_url: str | None,
    port: int | None,
    prefix: str,
    client_id: str,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    stats_interval: float,
    log_level: str,
) -> None:
    """Run the fleet manager until SIGTERM or SIGINT.

    Ingests device status, telemetry and events into the home's database. Prints one line `broker: URL` on
    stdout once the ingest is subscribed; logs are JSON lines on stderr.
    """
    if port is not None and broker_url is not None:
        raise click.UsageError("--port sets the embedded broker's port; it does not go with --broker")
    if (ca or cert or key) and not (broker_url or "").startswith("mqtts://"):
        raise click.UsageError("--ca, --cert and --key are for an mqtts:// --broker")
    logs.setup(log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    made = init_home(resolve_home(home))
    broker: Broker | None = None
    store = Store(made.db)
    try:
        if broker_url is None:
            try:
                broker = embedded_broker(made.broker_dir, port)
            except (RuntimeError, OSError) as exc:
                raise click.ClickException(f"the embedded broker did not start: {exc}") from None
            broker_url = broker.url
        ingest = Ingest(store, broker_url, prefix=prefix, client_id=client_id, tls=TlsFiles(ca, cert, key))
        ingest.start()
        try:
            if not ingest.wait_ready(_READY_TIMEOUT_S):
                event(log, "broker_unreachable", logging.WARNING, broker=broker_url, retrying=True)
            click.echo(f"broker: {broker_url}")  # click.echo flushes: a script can read the line right away
            event(log, "serve_started", home=str(made.root), broker=broker_url, prefix=prefix)
            while not stop.wait(stats_interval):
                event(log, "ingest_stats", **ingest.stats())
        finally:
            ingest.stop()  # final commit and acks
    finally:
        if broker is not None:
            broker.stop()
        store.close()
    event(log, "serve_stopped")
