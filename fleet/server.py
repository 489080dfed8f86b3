"""The fleet service as one object: :class:`FleetServer` starts and stops everything `fleet serve` runs.

Parts, in start order: the home (database, keys and repository, made if missing; a repository whose history is not the
one the fleet wrote is refused: :meth:`~fleet.trust.repository.Repository.ensure_consistent`), the broker (embedded, or
an external one named by URL), the repository server (HTTP), metadata renewal, the telemetry workers (N processes on a
shared subscription, see :mod:`fleet.ingest.workers`; a probe checks that they receive, else they are stopped and
telemetry stays in this process), the main ``Ingest`` (status and events; everything when there are no workers) and,
once ready, ``<home>/serve.json``. The embedded broker's and the repository server's ports are kept in
``<home>/addresses.json`` and taken again at the next start, so devices find the fleet where they left it.
:meth:`FleetServer.stop` takes them down in reverse: the record first, then the main ingest (final commit and acks), the
workers, renewal, the repository server, the broker and the store last.

    >>> with FleetServer(ServerSettings(home=Path("/tmp/fleet"), ingest_workers=0)) as server:
    ...     print(server.broker_url, server.repo_url)   # started and ready
    ...     server.run_until(stop)                      # supervises until stop (a threading.Event) is set

`fleet serve`, the tests and `fleet demo` all start the fleet this way. Every refusal is a :class:`FleetError` that
names its fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.logs import event
from fleet.broker import AmqttBroker, Broker, embedded_broker, port_free
from fleet.drift.detector import DriftDetector, DriftHooks
from fleet.errors import FleetError
from fleet.home import Home, addresses_file, init_home, remember_ports, remembered_ports, running_serve, serve_record
from fleet.ingest.mqtt import Ingest
from fleet.ingest.workers import DEFAULT_INGEST_WORKERS, PROBE_TIMEOUT_S, TelemetryWorkers, WorkerSpec, retire
from fleet.ops.init import ensure_repository
from fleet.publisher import DesiredPublisher
from fleet.rollout.controller import CampaignController
from fleet.store import open_store
from fleet.trust.renewal import MetadataRenewal
from fleet.trust.repo_server import RepoServer
from fleet.trust.repository import Repository

log = logging.getLogger(__name__)

#: How often the telemetry workers are checked (and any that died restarted).
SUPERVISE_S = 1.0
#: Characters an MQTT shared subscription's group name (the client id, with workers) may not hold.
_SHARE_FORBIDDEN = "/+#"


class SettingsError(FleetError):
    """Settings that do not go together; nothing was started."""


class AlreadyRunning(FleetError):
    """Another `fleet serve` runs on this home."""


class StartFailed(FleetError):
    """A part of the fleet service could not start; what had started was stopped again."""


@dataclass(frozen=True)
class ServerSettings:
    """What the fleet service runs with (`fleet serve`'s options). Checked when made: :class:`SettingsError`.

    ``broker_url`` None starts an embedded broker in the home on ``port``; ``port`` None takes the port the last
    start used (remembered in ``<home>/addresses.json``), else a free one. ``repo_port`` likewise: None is the
    remembered port, else a free one; 0 picks a new free port. Ports in use are remembered, so enrolled devices find
    the fleet where they left it after a restart. ``ingest_workers`` 0 keeps telemetry in this process (forced with
    the amqtt fallback broker, which has no shared subscriptions, and when a probe shows that the broker does not
    deliver on them). ``log_level`` is the workers' (the caller sets up its own process's logging).
    ``ready_timeout`` is how long :meth:`FleetServer.start` waits for the ingest to subscribe before it returns
    anyway (logging ``broker_unreachable``; the ingest keeps retrying). ``probe_timeout`` is how long it waits for a
    telemetry worker to receive its probe.
    """

    home: Path
    broker_url: str | None = None
    port: int | None = None
    repo_host: str = "127.0.0.1"
    repo_port: int | None = None
    prefix: str = protocol.DEFAULT_PREFIX
    client_id: str = "edgefleet-ingest"
    tls: TlsFiles = field(default_factory=TlsFiles)
    ingest_workers: int = DEFAULT_INGEST_WORKERS
    stats_interval: float = 60.0
    log_level: str = "INFO"
    ready_timeout: float = 10.0
    probe_timeout: float = PROBE_TIMEOUT_S
    rollout_tick_s: float = 1.0
    drift_round_s: float = 60.0
    on_drift: str | None = None
    on_drift_url: str | None = None

    def __post_init__(self) -> None:
        if self.port is not None and self.broker_url is not None:
            raise SettingsError(
                "port_with_broker",
                "port sets the embedded broker's port; it does not go with an external broker URL",
                "drop one of the two",
            )
        if self.broker_url is not None:
            try:
                BrokerAddress.parse(self.broker_url)
            except ValueError as exc:
                raise SettingsError("bad_broker_url", str(exc), "use mqtt://HOST:PORT or mqtts://HOST:PORT") from None
        if self.tls != TlsFiles() and not (self.broker_url or "").startswith("mqtts://"):
            raise SettingsError(
                "tls_without_mqtts", "TLS files are for an mqtts:// broker", "name an mqtts:// broker, or drop them"
            )
        if self.ingest_workers and any(c in self.client_id for c in _SHARE_FORBIDDEN):
            raise SettingsError(
                "bad_client_id",
                f"the client id names the workers' shared subscription: it may not hold '/', '+' or '#' "
                f"({self.client_id!r})",
                "choose a client id of letters, digits, '-' and '_'",
            )
        if (self.ingest_workers < 0 or self.stats_interval <= 0 or self.ready_timeout < 0 or self.probe_timeout <= 0
                or self.rollout_tick_s <= 0 or self.drift_round_s <= 0):  # fmt: skip
            raise SettingsError(
                "bad_settings",
                f"ingest_workers {self.ingest_workers}, stats_interval {self.stats_interval}, "
                f"ready_timeout {self.ready_timeout}, probe_timeout {self.probe_timeout}",
                "use workers >= 0 and positive intervals",
            )


class FleetServer:
    """The fleet service: broker, ingest and workers, repository server, metadata renewal and serve.json.

    :meth:`start` returns once it is ready (:attr:`broker_url` and :attr:`repo_url` set); :meth:`run_until`
    supervises (restarts dead workers, logs ``ingest_stats``); :meth:`stop` takes it all down. Also a context
    manager (start on enter, stop on exit). One start per object.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.home = Home(Path(settings.home).expanduser().absolute())
        #: Set by :meth:`start`: where devices reach the broker, and the release repository's URL.
        self.broker_url: str | None = None
        self.repo_url: str | None = None
        #: The embedded broker (None with an external one), the main ingest, and the telemetry workers (None when
        #: everything runs in this process).
        self.broker: Broker | None = None
        self.ingest: Ingest | None = None
        self.workers: TelemetryWorkers | None = None
        #: The campaign controller (:mod:`fleet.rollout.controller`), running once started.
        self.controller: CampaignController | None = None
        #: The drift detector (:mod:`fleet.drift.detector`), running once started.
        self.drift: DriftDetector | None = None
        #: Telemetry workers actually running: the settings' number, or 0 with the amqtt fallback broker.
        self.ingest_workers = settings.ingest_workers
        self._parts = contextlib.ExitStack()
        self._started = False
        self._next_stats = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> FleetServer:
        """Start every part and return once the ingest is subscribed (or ``ready_timeout`` passed).

        Raises :class:`AlreadyRunning` if a `fleet serve` runs on the home, :class:`StartFailed` if the broker or
        the repository server cannot start (whatever had started is stopped again), or the store's and the
        repository's own errors (``repository_inconsistent`` when its history is not the one the fleet wrote).
        """
        if self._started:
            raise RuntimeError("a FleetServer starts once")
        self._started = True
        root = self.home.root
        running = running_serve(root)
        if running is not None:
            raise AlreadyRunning("already_running", f"`fleet serve` already runs for {root} (pid {running['pid']})",
                                 "stop it first")  # fmt: skip
        try:
            self._start(root)
        except BaseException:
            self._parts.close()
            raise
        return self

    def _start(self, root: Path) -> None:
        settings = self.settings
        self.home = made = init_home(root)
        store = open_store(made.db)
        self._parts.callback(store.close)  # closed in reverse: the store last
        if ensure_repository(root, root_threshold=1, root_keys=1, ledger=store):
            event(
                log, "repository_created", logging.WARNING, home=str(root), hint="run `fleet init` to see key placement"
            )
        repo = Repository(root, ledger=store)
        repo.ensure_consistent()  # the whole history: nothing is served or re-signed on top of an inconsistent one
        broker_url, shared_subscriptions = self._start_broker(made)
        self._start_repo_server(repo)
        renewal = MetadataRenewal(repo).start()
        self._parts.callback(renewal.stop)
        spec = WorkerSpec(made.db, broker_url, settings.prefix, settings.client_id, settings.client_id,
                          settings.tls, settings.log_level)  # fmt: skip
        workers_ready = True
        if self.ingest_workers:
            self.workers = TelemetryWorkers(spec, self.ingest_workers)
            self.workers.start()
            self._parts.callback(self._stop_workers)  # after the main ingest's stop: closed in reverse
            workers_ready = self._check_workers(spec)
        elif shared_subscriptions:
            retire(spec, 0)  # an earlier run's workers left sessions holding windows: store those first
        kinds = (protocol.Kind.STATUS, protocol.Kind.EVENTS) if self.workers else protocol.DEVICE_PUBLISHED
        self.ingest = Ingest(store, broker_url, prefix=settings.prefix, client_id=settings.client_id,
                             tls=settings.tls, kinds=kinds)  # fmt: skip
        self.ingest.start()
        self._parts.callback(self.ingest.stop)  # final commit and acks
        ready = self.ingest.wait_ready(settings.ready_timeout)
        if not ready or not workers_ready:
            event(log, "broker_unreachable", logging.WARNING, broker=broker_url, retrying=True)
        self.controller = CampaignController(
            store, repo, lambda: DesiredPublisher(broker_url, settings.tls), prefix=settings.prefix,
            tick_s=settings.rollout_tick_s,
        ).start()  # fmt: skip
        self._parts.callback(self.controller.stop)  # before the ingest: its last round may still read events
        hooks = DriftHooks(settings.on_drift, settings.on_drift_url)
        self.drift = DriftDetector(store, repo, round_s=settings.drift_round_s, hooks=hooks).start()
        self._parts.callback(self.drift.stop)
        files = (("ca", settings.tls.ca), ("cert", settings.tls.cert), ("key", settings.tls.key))
        tls = {name: str(path.resolve()) for name, path in files if path}
        info = {"pid": os.getpid(), "broker": broker_url, "repo": self.repo_url, "prefix": settings.prefix, "tls": tls}
        self._parts.enter_context(serve_record(root, info))
        self.broker_url = broker_url
        self._next_stats = time.monotonic() + settings.stats_interval
        event(log, "serve_started", home=str(root), broker=broker_url, repo=self.repo_url, prefix=settings.prefix)

    def _check_workers(self, spec: WorkerSpec) -> bool:
        """Probe the workers' shared subscription; without delivery, stop them and keep telemetry in this process.
        False if the workers did not subscribe in time (the broker is unreachable: nothing probed)."""
        assert self.workers is not None
        if not self.workers.wait_ready(self.settings.ready_timeout):
            event(log, "ingest_workers_unchecked", logging.WARNING, reason="the workers did not subscribe in time")
            return False
        why = self.workers.probe(self.settings.probe_timeout)
        if why is None:
            event(log, "ingest_workers_checked", workers=self.ingest_workers)
            return True
        event(log, "ingest_workers_off", logging.WARNING, workers=self.ingest_workers,
              reason=f"the broker does not deliver on shared subscriptions ($share/...): {why}; "
                     "one ingest in this process takes all telemetry")  # fmt: skip
        self._stop_workers()
        self.workers = None
        self.ingest_workers = 0
        retire(spec, 0)  # the workers' sessions hold their $share subscriptions: remove them
        return True

    def _stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.stop()

    def _start_broker(self, made: Home) -> tuple[str, bool]:
        """The broker's URL, and whether it has shared subscriptions (the amqtt fallback has none)."""
        if self.settings.broker_url is not None:
            return self.settings.broker_url, True
        port = self.settings.port or remembered_ports(made.root).get("broker")
        if port is not None and not port_free("127.0.0.1", port):
            where = "" if self.settings.port else f" (the last start's, remembered in {addresses_file(made.root)})"
            raise StartFailed(
                "broker_port_taken",
                f"the embedded broker's port 127.0.0.1:{port}{where} is taken by another program",
                "stop what listens there, or give the broker another port with --port (devices enrolled with the "
                "old one then need a new bundle: `fleet enroll --force`)",
            )
        try:
            broker = embedded_broker(made.broker_dir, port)
        except (RuntimeError, OSError) as exc:
            raise StartFailed(
                "broker_failed",
                f"the embedded broker did not start: {exc}",
                "free or change its port (--port; none picks a free one), or name a running broker with --broker",
            ) from None
        self.broker = broker
        self._parts.callback(broker.stop)
        remember_ports(made.root, broker=broker.port)
        if not isinstance(broker, AmqttBroker):
            return broker.url, True
        if self.ingest_workers:
            event(log, "ingest_workers_off", logging.WARNING, reason="amqtt has no shared subscriptions")
            self.ingest_workers = 0
        return broker.url, False

    def _start_repo_server(self, repo: Repository) -> None:
        root = self.home.root
        host, port = self.settings.repo_host, self.settings.repo_port
        remembered = port is None
        if port is None:
            port = remembered_ports(root).get("repo", 0)
        try:
            repo_server = RepoServer(repo.dir, host=host, port=port).start()
        except OSError as exc:
            where = f" (the last start's, remembered in {addresses_file(root)})" if remembered else ""
            raise StartFailed(
                "repo_server_failed",
                f"the repository server cannot listen on {host}:{port}{where}: {exc}",
                "stop what listens there, or name a free port with --repo-port (0 picks one; devices enrolled "
                "with the old one then need a new bundle), or an address of this machine with --repo-host",
            ) from None
        self._parts.callback(repo_server.stop)
        self.repo_url = repo_server.url
        remember_ports(root, repo=urlsplit(repo_server.url).port)

    def stop(self) -> None:
        """Stop everything, in reverse order of start: serve.json, ingest (final commit and acks), workers, renewal,
        repository server, broker, store. Safe to call twice, and after a failed start."""
        if not self._started:
            return
        was_running = self.broker_url is not None
        self._parts.close()
        self.broker_url = None
        if was_running:
            event(log, "serve_stopped")

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- while it runs ------------------------------------------------------------------------------------------

    def run_until(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set: restart dead telemetry workers (every second) and log ``ingest_stats``
        every ``stats_interval``. Does not stop the server: call :meth:`stop` (or leave the ``with`` block)."""
        wait = SUPERVISE_S if self.workers is not None else self.settings.stats_interval
        while not stop.wait(wait):
            self.supervise()

    def supervise(self) -> None:
        """One round of :meth:`run_until`, for callers that drive their own loop."""
        if self.workers is not None:
            self.workers.supervise()
        if time.monotonic() >= self._next_stats:
            self._next_stats += self.settings.stats_interval
            event(log, "ingest_stats", **self.stats())

    def stats(self) -> dict[str, Any]:
        """The main ingest's counters, with the telemetry workers' summed under ``telemetry_workers``."""
        if self.ingest is None:
            return {}
        telemetry = {"telemetry_workers": self.workers.stats()} if self.workers is not None else {}
        return {**self.ingest.stats(), **telemetry}
