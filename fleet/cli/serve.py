"""`fleet init` and `fleet serve`, plus the options and errors every home-reading command shares.

Exit codes scripts can rely on: 0 ok, 1 runtime failure, 2 usage error (click's), 3 not found.

While it runs, `fleet serve` records where it can be reached in ``<home>/serve.json`` (broker URL, repository URL,
topic prefix, pid), so `fleet assign` and `fleet enroll` need no flags; a clean stop removes the file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import click
from tuf.api.metadata import Metadata, Root

from agent import logs, protocol
from agent.broker_address import TlsFiles
from agent.logs import event
from fleet.broker import AmqttBroker, embedded_broker
from fleet.cli.common import echo_json, existing_file, home_option, json_option, validate_broker
from fleet.home import init_home, resolve_home, running_serve, serve_record
from fleet.ingest.mqtt import Ingest
from fleet.ingest.workers import DEFAULT_INGEST_WORKERS, TelemetryWorkers, WorkerSpec, retire
from fleet.store.sqlite import SCHEMA_VERSION, Store
from fleet.trust.repo_server import RepoServer
from fleet.trust.repository import Repository, RepositoryError

log = logging.getLogger(__name__)

#: How long `serve` waits for the ingest to subscribe before announcing the broker anyway (and retrying).
_READY_TIMEOUT_S = 10.0
#: How often `serve` checks its telemetry workers, restarting any that died.
_SUPERVISE_S = 1.0

# --------------------------------------------------------------------------------------------------------------
# Keys and repository

#: Which keys may stay on the serving machine. Root signs only root rotations. Targets would ideally be offline too,
#: but releases are published and targets metadata renewed on this machine, so it stays; snapshot, timestamp and
#: director sign continuously while the fleet runs.
_KEY_PLACEMENT = {
    "root": "offline: move to offline storage; only root rotation needs them",
    "targets": "online: `fleet release` signs releases with it, `fleet serve` re-signs targets before they expire",
    "snapshot": "online: `fleet serve` renews snapshot metadata",
    "timestamp": "online: `fleet serve` renews timestamp metadata",
    "director": "online: `fleet assign` signs desired state",
}


def _key_files(home: Path) -> dict[str, list[str]]:
    """Each role's key files (``<role>-<n>.pem``, as :class:`fleet.trust.keys.KeyStore` names them)."""
    return {role: sorted(str(p) for p in (home / "keys").glob(f"{role}-*.pem")) for role in _KEY_PLACEMENT}


def ensure_repository(home: Path, root_threshold: int, root_keys: int) -> bool:
    """Create the keys and TUF repository unless they exist; True if they were made now.

    An existing repository is kept as it is: init never replaces keys devices already trust.
    """
    repo_dir, keys_dir = home / "repo", home / "keys"
    has_repo = (repo_dir / "metadata" / "root.json").exists()
    has_keys = keys_dir.is_dir() and any(keys_dir.iterdir())
    if has_repo and has_keys:
        return False
    if has_repo or has_keys:
        there, missing = (repo_dir, keys_dir) if has_repo else (keys_dir, repo_dir)
        raise click.ClickException(
            f"{there} exists but {missing} does not: restore {missing} from your backup, or move {there} away and "
            "run `fleet init` again (devices enrolled with the old root must then be enrolled again)"
        )
    try:
        Repository.init(home, root_threshold=root_threshold, root_keys=root_keys)
    except (RepositoryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    return True


def _root_policy(home: Path) -> tuple[int, int]:
    """The (threshold, key count) of the root role devices trust."""
    root = Metadata[Root].from_bytes((home / "repo" / "metadata" / "root.json").read_bytes()).signed
    return root.roles["root"].threshold, len(root.roles["root"].keyids)


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
    root = resolve_home(home)
    made = init_home(root)
    created = ensure_repository(root, root_threshold, root_keys)
    policy = _root_policy(root)
    if not created and policy != (root_threshold, root_keys) and _given(("root_threshold", "root_keys")):
        raise click.ClickException(
            f"the repository exists with {policy[1]} root keys and threshold {policy[0]}; init does not rotate root "
            "keys (drop --root-threshold/--root-keys to keep them)"
        )
    paths = [*made.created, *((root / "keys", root / "repo") if created else ())]
    keys = _key_files(root)
    if as_json:
        echo_json(
            {
                "home": str(made.root),
                "db": str(made.db),
                "schema_version": SCHEMA_VERSION,
                "created": [str(p) for p in paths],
                "repository": {"path": str(root / "repo"), "created": created},
                "root": {"threshold": policy[0], "keys": policy[1]},
                "keys": {role: {"files": keys[role], "placement": _KEY_PLACEMENT[role]} for role in keys},
            }
        )
        return
    for path in paths:
        click.echo(f"created {path}")
    if not paths:
        click.echo(f"fleet home {made.root} is up to date")
    if not created:
        click.echo(f"kept the existing keys and repository (root: {policy[1]} keys, threshold {policy[0]})")
    for role, files in keys.items():
        click.echo(f"{role:<9} {_KEY_PLACEMENT[role]}")
        for path in files:
            click.echo(f"          {path}")


def _given(params: tuple[str, ...]) -> bool:
    """True if the user typed any of these options (rather than getting their defaults)."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT for p in params)


# --------------------------------------------------------------------------------------------------------------
# What `fleet serve` leaves in the home while it runs


# --------------------------------------------------------------------------------------------------------------
# Keeping the online metadata fresh


def renewal_schedule(repo: Repository) -> tuple[timedelta, float]:
    """(margin, period in seconds) for renewing online metadata.

    Metadata is re-signed when it expires within half a timestamp lifetime, checked four times per margin (at most
    every 5 minutes), so a device never sees expired metadata while serve runs, even if one check fails.
    """
    margin = repo.expiry.timestamp / 2
    return margin, min(max(margin.total_seconds() / 4, 0.2), 300.0)


def _renew_loop(repo: Repository, stop: threading.Event) -> None:
    margin, period = renewal_schedule(repo)
    while True:
        try:
            repo.renew_online(margin=margin)
        except Exception as exc:  # a missing key or a full disk must not stop ingest; retried next period
            event(log, "metadata_renewal_failed", logging.ERROR, error=repr(exc)[:300])
        if stop.wait(period):
            return


@click.command()
@home_option
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    callback=validate_broker,
    help="mqtt://HOST:PORT or mqtts://HOST:PORT. [default: start an embedded broker in the home]",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port of the embedded broker, so devices find it again after a restart. [default: a free port]",
)
@click.option(
    "--repo-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the release repository's HTTP server listens on. With 0.0.0.0, give devices a reachable URL "
    "through `fleet enroll --repo-url`.",
)
@click.option(
    "--repo-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the release repository's HTTP server; 0 picks a free one.",
)
@click.option("--prefix", default=protocol.DEFAULT_PREFIX, show_default=True, help="Topic prefix of the fleet.")
@click.option("--client-id", default="edgefleet-ingest", show_default=True, help="MQTT client id of the ingest.")
@click.option("--ca", type=existing_file, help="CA certificate for mqtts://.")
@click.option("--cert", type=existing_file, help="Client certificate for mqtts://.")
@click.option("--key", type=existing_file, help="Client key for mqtts://.")
@click.option(
    "--ingest-workers",
    type=click.IntRange(0, 16),
    default=DEFAULT_INGEST_WORKERS,
    show_default=True,
    help="Processes that store telemetry, sharing one MQTT shared subscription ($share/...): more windows/s on "
    "more cores. 0 keeps everything in this process (forced with the amqtt fallback broker, which lacks shared "
    "subscriptions). When lowered, the retired workers' sessions are drained and removed at start.",
)
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
    repo_host: str,
    repo_port: int,
    prefix: str,
    client_id: str,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    ingest_workers: int,
    stats_interval: float,
    log_level: str,
) -> None:
    """Run the fleet manager until SIGTERM or SIGINT.

    Ingests device status, telemetry and events into the home's database, serves the release repository over
    HTTP and re-signs its timestamp and snapshot metadata before they expire. Creates the home, keys and repository
    first if they are missing (as `fleet init` does). Prints `broker: URL` then `repo: URL` on stdout once the
    ingest is subscribed, and records both in <home>/serve.json until it stops; logs are JSON lines on stderr.
    """
    if port is not None and broker_url is not None:
        raise click.UsageError("--port sets the embedded broker's port; it does not go with --broker")
    if (ca or cert or key) and not (broker_url or "").startswith("mqtts://"):
        raise click.UsageError("--ca, --cert and --key are for an mqtts:// --broker")
    if ingest_workers and any(c in client_id for c in "/+#"):
        raise click.UsageError("--client-id names the workers' shared subscription: it may not hold '/', '+' or '#'")
    root = resolve_home(home)
    running = running_serve(root)
    if running is not None:
        raise click.ClickException(f"`fleet serve` already runs for {root} (pid {running['pid']}): stop it first")
    logs.setup(log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    made = init_home(root)
    if ensure_repository(root, root_threshold=1, root_keys=1):
        event(log, "repository_created", logging.WARNING, home=str(root), hint="run `fleet init` to see key placement")
    repo = Repository(root)
    with contextlib.ExitStack() as running_parts:  # closed in reverse: ingest first, the broker and store last
        store = Store(made.db)
        running_parts.callback(store.close)
        shared_subscriptions = True
        if broker_url is None:
            try:
                broker = embedded_broker(made.broker_dir, port)
            except (RuntimeError, OSError) as exc:
                raise click.ClickException(f"the embedded broker did not start: {exc}") from None
            running_parts.callback(broker.stop)
            broker_url = broker.url
            if isinstance(broker, AmqttBroker):
                shared_subscriptions = False
                if ingest_workers:
                    event(log, "ingest_workers_off", logging.WARNING, reason="amqtt has no shared subscriptions")
                    ingest_workers = 0
        try:
            repo_server = RepoServer(repo.dir, host=repo_host, port=repo_port).start()
        except OSError as exc:
            raise click.ClickException(
                f"the repository server cannot listen on {repo_host}:{repo_port}: {exc}"
            ) from None
        running_parts.callback(repo_server.stop)
        renewer = threading.Thread(target=_renew_loop, args=(repo, stop), name="metadata-renewal", daemon=True)
        renewer.start()
        running_parts.callback(renewer.join)
        running_parts.callback(stop.set)
        tls_files = TlsFiles(ca, cert, key)
        spec = WorkerSpec(made.db, broker_url, prefix, client_id, client_id, tls_files, log_level)
        workers = None
        if ingest_workers:
            workers = TelemetryWorkers(spec, ingest_workers)
            workers.start()
            running_parts.callback(workers.stop)  # after the main ingest's stop: closed in reverse
        elif shared_subscriptions:
            retire(spec, 0)  # an earlier run's workers left sessions holding windows: store those first
        kinds = (protocol.Kind.STATUS, protocol.Kind.EVENTS) if workers else protocol.DEVICE_PUBLISHED
        ingest = Ingest(store, broker_url, prefix=prefix, client_id=client_id, tls=tls_files, kinds=kinds)
        ingest.start()
        gc.freeze()  # start-up objects leave the collector's generations: +13% ingest throughput, measured
        running_parts.callback(ingest.stop)  # final commit and acks
        ready = ingest.wait_ready(_READY_TIMEOUT_S)
        if not ready or (workers is not None and not workers.wait_ready(_READY_TIMEOUT_S)):
            event(log, "broker_unreachable", logging.WARNING, broker=broker_url, retrying=True)
        tls = {name: str(path.resolve()) for name, path in (("ca", ca), ("cert", cert), ("key", key)) if path}
        info = {"pid": os.getpid(), "broker": broker_url, "repo": repo_server.url, "prefix": prefix, "tls": tls}
        running_parts.enter_context(serve_record(root, info))
        click.echo(f"broker: {broker_url}")  # click.echo flushes: a script can read the line right away
        click.echo(f"repo: {repo_server.url}")
        event(log, "serve_started", home=str(made.root), broker=broker_url, repo=repo_server.url, prefix=prefix)
        next_stats = time.monotonic() + stats_interval
        while not stop.wait(_SUPERVISE_S if workers else stats_interval):
            if workers is not None:
                workers.supervise()
            if time.monotonic() >= next_stats:
                next_stats += stats_interval
                telemetry = {"telemetry_workers": workers.stats()} if workers is not None else {}
                event(log, "ingest_stats", **ingest.stats(), **telemetry)
    event(log, "serve_stopped")
