"""Installing releases on the device: the installer, one install at a time, each step persisted before it runs.

The order of the steps is the table of :mod:`agent.update.states`: :meth:`Installer._drive` enters a state, runs
that state's step (one method each, from :meth:`Installer._fetch` to :meth:`Installer._probation`), and moves on
with ``Event.DONE``; every move goes through :func:`~agent.update.states.next_state`. A failure anywhere
(``Event.FAIL``) reverts: what was staged is dropped; if the failing release is active, ``previous`` is put back
(else the factory model). The outcome event is ``install_failed`` when the release never served, ``rolled_back``
when it did. The installer knows the agent only as an :class:`~agent.update.host.InstallHost`.

Each state is persisted (:class:`~agent.update.journal.Journal`) before its work begins. After a SIGKILL at any
instant the next start does :data:`~agent.update.states.ON_RESTART`, before any model is served and without the
network; each start in the middle of an install counts as a restart (a clean stop does not), and at
``crash_loop_limit`` restarts the install is reverted instead, so a release that crashes the agent is undone even
with no network. The counting goes on after the commit while the commit watch lasts (:meth:`Installer._watch_commit`):
a committed release that crashes the agent that often is rolled back too (``crash_loop_after_commit``).

Desired state: :class:`~agent.update.intake.DesiredIntake` (reactor thread) hands the newest accepted one to the
worker thread (through its :class:`~agent.update.inbox.Inbox`), which reconciles each model against it, one install
at a time. A newer accepted state supersedes the
install under way at its next step (downloads and smoke tests finish or time out first).

Retries: an install that failed for a passing cause (a full disk, the network, metadata expired by a wrong clock: see
:mod:`agent.update.retry`) is tried again with back-off, for as long as the desired state asks for it; status shows
when (``next_retry``). A full disk that cannot even persist the revert leaves the install in its last persisted state,
which the retry resumes.

Events: ``desired_rejected`` (reason), ``desired_deferred``, ``desired_accepted``, ``install_state`` on every
transition, one outcome per install: ``install_committed``, ``install_failed`` or ``rolled_back`` (with reason and
detail), and ``install_retry_scheduled`` (reason, attempt, in_s) after a failure that will be tried again.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from agent import runtime
from agent.config import ConfigError, ModelConfig, UpdateConfig
from agent.errors import EdgefleetError
from agent.files import is_disk_full
from agent.logs import event
from agent.protocol import Kind
from agent.targets import parse_target_path
from agent.update.desired import DesiredModel, DesiredState, DesiredStateError, load_director_key
from agent.update.host import InstallHost
from agent.update.inbox import DEFERRED_STATE, Inbox
from agent.update.intake import DesiredIntake
from agent.update.journal import Journal
from agent.update.probation import ProbationLimits, Watch, commit_watch_s, watch_start
from agent.update.record import release_name
from agent.update.retry import Backoff, is_retryable
from agent.update.slots import ModelSlots, SlotRecord, SlotStore, factory_record, file_problem, slot_problem
from agent.update.smoke import run_smoke_test
from agent.update.states import AT_REST, ON_RESTART, Event, IllegalTransition, Restart, State
from agent.update.tuf_client import ReleaseFetcher, TrustError, VerifiedTarget

log = logging.getLogger(__name__)

#: How often probation looks at the new release's counters.
PROBATION_POLL_S = 0.1

T = TypeVar("T")


class InstallError(EdgefleetError):
    """An install that cannot go on. ``reason`` is short and stable (a counter key); ``detail`` explains."""


class _Superseded(Exception):
    """A newer desired state wants something else for this model."""


class _Stopping(Exception):
    """The agent is shutting down: leave the install where it is; the next start resumes it."""


@dataclass
class _Job:
    """What one run of the steps learns and hands to the next steps (a resumed install starts from DOWNLOADING)."""

    target: VerifiedTarget | None = None
    path: Path | None = None
    staged: SlotRecord | None = None


@dataclass(frozen=True)
class _Entry:
    """What a step's success persists together with the next state, in the same transaction."""

    slots: ModelSlots | None = None
    outcome: Mapping[str, Any] | None = None


class Installer:
    """Updates of one agent's models: desired state in, verified releases out, one install at a time.

    Threads: :meth:`on_command` runs on the reactor thread; installs (TUF, downloads, smoke tests, probation) on
    the installer's own worker thread; :meth:`recover` runs in the host's constructor, before anything is served.
    ``models`` are agent.toml's ``[[models]]``: the models it updates, and each one's factory fallback.
    ``fault_point`` is a fault-injection hook for tests and the simulator, never set in production (see
    :mod:`agent.update.journal`).
    """

    def __init__(
        self,
        host: InstallHost,
        config: UpdateConfig,
        models: Sequence[ModelConfig],
        state_dir: Path,
        *,
        fault_point: Callable[[State], None] | None = None,
    ) -> None:
        self._host = host
        self._config = config
        self._factory = {m.name: m for m in models}
        try:
            director_key = load_director_key(config.director_key.read_bytes())
            trusted_root = config.trusted_root.read_bytes()
            Metadata[Root].from_bytes(trusted_root)
        except OSError as exc:
            raise ConfigError(f"[update]: cannot read {exc.filename} ({exc.strerror})") from None
        except DesiredStateError as exc:
            raise ConfigError(f"[update] director_key {config.director_key}: not a director key ({exc})") from None
        except DeserializationError as exc:
            raise ConfigError(f"[update] trusted_root {config.trusted_root}: not a TUF root ({exc})") from None
        self._store = SlotStore(state_dir)
        self._fetcher = ReleaseFetcher(
            state_dir,
            config.repo_url,
            trusted_root,
            config.max_download_bytes,
            config.download_deadline_s,
            runtimes=runtime.runtime_names(),
            clock=host.clock,
        )
        self._factory_records = {m.name: factory_record(m) for m in models}
        self._inbox = Inbox()
        self._journal = Journal(
            host, self._store, self._factory, self._factory_records, self._inbox.due_in, fault_point
        )
        self._records, self._slots = self._journal.records, self._journal.slots  # what was last persisted
        self._steps: Mapping[State, Callable[[str, _Job], _Entry]] = {
            State.DOWNLOADING: self._fetch,
            State.VERIFYING: self._verify,
            State.STAGED: self._hold,
            State.SMOKE_TEST: self._smoke_test,
            State.ACTIVATING: self._activate,
            State.PROBATION: self._probation,
        }
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(config.retry_min_s, config.retry_max_s)
        self._rng = random.Random()
        self._deferred_attempts = 0
        self._intake = DesiredIntake(host, self._store, director_key, self._factory, self._inbox.put, self._deferred)

    # -- start-up (host constructor) ----------------------------------------------------------------------------

    def recover(self, build: Callable[[ModelConfig], T]) -> dict[str, T]:
        """Settle every model after whatever ended the last run, then build what to serve: a verified model."""
        served = {}
        for name in self._factory:
            self._restart(name)
            served[name] = self._serve_active(name, build)
        return served

    def _restart(self, name: str) -> None:
        rec = self._records[name]
        action = ON_RESTART[rec.state]
        if action in (Restart.NOTHING, Restart.WATCH_COMMIT):
            self._journal.save(name, replace(rec, clean_stop=False))  # this run's own stop is still to come
            if rec.outcome and not rec.outcome.get("reported"):
                self._journal.report(name)  # the last run stopped between persisting an outcome and eventing it
            if action is Restart.WATCH_COMMIT:
                self._watch_commit(name, unclean=not rec.clean_stop)
            return
        if action is Restart.COMPLETE_REVERT:
            self._finish_revert(name)
            return
        rec = replace(rec, restarts=rec.restarts + (0 if rec.clean_stop else 1), clean_stop=False)
        self._host.emit("install_resumed", model=name, state=rec.state.value, release=rec.release, seq=rec.seq,
                        restarts=rec.restarts, action=action.name)  # fmt: skip
        if rec.restarts >= self._config.crash_loop_limit:
            self._records[name] = rec
            detail = f"{rec.restarts} agent restarts in {rec.state.value}"
            self._revert(name, "crash_loop", detail, revert_active=rec.state is State.PROBATION)
            return
        self._journal.save(name, rec)
        self._journal.fault_point(rec.state)
        if action is Restart.COMPLETE_ACTIVATION:
            slots = self._slots[name]
            problem = slot_problem(slots.staged) if slots.staged else "missing"
            if problem:
                self._revert(name, "staged_damaged", problem, revert_active=False)
            else:
                self._journal.enter(name, Event.DONE, slots=ModelSlots(active=slots.staged, previous=slots.active))

    def _watch_commit(self, name: str, *, unclean: bool) -> None:
        """A start in COMMITTED while the commit watch lasts (:func:`~agent.update.probation.watch_start`): a release
        that crashes the runtime only on some inputs passes its smoke test and probation, then takes the agent down
        at every such request; at ``crash_loop_limit`` unclean starts it is rolled back to ``previous``
        (``crash_loop_after_commit``) before anything is served."""
        active = self._slots[name].active
        if active is None:
            return
        window_s, limit = commit_watch_s(_signed_card(active), self._config), self._config.crash_loop_limit
        now = self._host.clock()
        watch, rec = watch_start(self._records[name], now=now, window_s=window_s, limit=limit, unclean=unclean)
        if watch is Watch.OFF:
            return
        elapsed = now - (rec.watched_commit or now)
        if unclean and watch is not Watch.ENDED:
            self._host.emit("unclean_restart", model=name, release=rec.release, restarts=rec.restarts, limit=limit,
                            since_commit_s=round(elapsed, 3))  # fmt: skip
        if watch is Watch.CRASH_LOOP:
            self._records[name] = rec
            detail = f"{rec.restarts} unclean agent restarts within {elapsed:.0f} s of its commit"
            self._revert(name, "crash_loop_after_commit", detail, revert_active=True)
        else:
            self._journal.save(name, rec)

    def _serve_active(self, name: str, load: Callable[[ModelConfig], T]) -> T:
        """Load the active slot if it verifies and loads; else revert to the next fallback, down to the factory."""
        while (record := self._slots[name].active) is not None:
            reason, problem = "slot_damaged", slot_problem(record)
            if problem is None:
                try:
                    return load(record.model_config(name, self._factory[name].threads))
                except runtime.RuntimeLayerError as exc:
                    reason, problem = "load_failed", str(exc)
            self._revert(name, reason, f"active {record.release}: {problem}", revert_active=True)
        return load(self._factory[name])

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker; it first reconciles the last accepted desired state (resuming what a crash cut)."""
        if self._intake.accepted is not None:
            self._inbox.put(self._intake.accepted)
        for name, rec in self._records.items():  # a retry the last run scheduled waits the back-off's first step
            if rec.retry_in_s is not None:
                self._inbox.retry(name, min(rec.retry_in_s, self._backoff.min_s))
        self._thread = threading.Thread(target=self._run, name=f"install-{self._host.device_id}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker at its next step; an install under way stays persisted and resumes at the next start."""
        self._inbox.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # blocked in a download or a smoke test: it dies with the process
                event(log, "install_worker_busy_at_exit", logging.WARNING, device_id=self._host.device_id)
                return
        for name in self._records:  # the worker is done: a committed release's watch must not count this stop
            try:
                self._stopped(name)
            except (OSError, sqlite3.Error) as exc:  # a full disk, say: the next start counts this stop as a crash
                event(log, "clean_stop_unrecorded", logging.WARNING, model=name, reason=str(exc))
        self._store.close()

    def lose_power(self) -> None:
        """What a process death leaves of the installer (the simulator's power cut, firmware_sim.power): its store
        closed first, so nothing more is persisted (not even a clean stop), then the worker told to stop. A worker
        caught in a download or a smoke test runs on to the end of that step and can then persist nothing; the next
        start finds what was persisted before. The fetcher keeps no connection open between requests."""
        self._store.close()
        self._inbox.stop()

    # -- desired state (reactor thread) -------------------------------------------------------------------------

    def on_command(self, kind: Kind, payload: bytes) -> None:
        """A message on the device's desired or cmd topic (see :class:`~agent.update.intake.DesiredIntake`)."""
        self._intake.on_command(kind, payload)

    def _deferred(self) -> None:
        """A full disk kept a desired state from being persisted: try it again with back-off."""
        self._deferred_attempts += 1
        self._inbox.retry(DEFERRED_STATE, self._backoff.delay(self._deferred_attempts, self._rng.random()))

    # -- the worker ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while (work := self._inbox.take()) is not None:
            if DEFERRED_STATE in work.due and not self._intake.retry_deferred():
                self._deferred_attempts = 0
            desired = work.desired or self._intake.accepted
            if desired is None:
                continue
            try:
                self._reconcile(desired, retry=work.due)
            except _Stopping:
                return
            except Exception:  # a bug must not end updates for good: report it, wait for the next desired state
                event(log, "install_worker_failed", logging.ERROR, device_id=self._host.device_id, exc_info=True)

    def _reconcile(self, desired: DesiredState, retry: frozenset[str] = frozenset()) -> None:
        """Bring each model to what ``desired`` says, one at a time; return early when a newer state is waiting.

        A model in ``retry`` tries its failed install again; the others act only on a new seq or target."""
        for name in sorted(self._factory):
            if self._inbox.newest is not None:
                return
            entry = desired.models.get(name)
            rec = self._records[name]
            if rec.state not in AT_REST:
                if entry == rec.target:  # resume: the outcome answers the newest state that asks for it
                    self._records[name] = replace(rec, seq=desired.seq)
                    self._attempt(name, None if rec.state is State.PROBATION else Event.RESUME)
                    continue
                wanted = release_name(entry) if entry else "no release"
                self._fail(name, "superseded", f"desired state {desired.seq} wants {wanted}")
                rec = self._records[name]
            again = rec.seq == desired.seq and rec.target == entry
            if entry is None or (again and name not in retry):
                continue  # not asked for, or already acted on (whatever the outcome): a new seq or a due retry
            self._inbox.cancel(name)
            if self._is_active(name, entry):
                outcome = self._journal.committed(entry, desired.seq, unchanged=True)
                self._journal.save(name, replace(rec, seq=desired.seq, target=entry, outcome=outcome))
                self._journal.report(name)
                continue
            self._records[name] = replace(rec, seq=desired.seq, target=entry, restarts=0,
                                          retries=rec.retries if again else 0, retry_in_s=None)  # fmt: skip
            self._attempt(name, Event.START)

    def _is_active(self, name: str, entry: DesiredModel) -> bool:
        active = self._slots[name].active or self._factory_records[name]
        return active.sha256 == entry.sha256 and active.release == release_name(entry)

    def _attempt(self, name: str, begin: Event | None) -> None:
        """Drive the install (see :meth:`_drive`); turn any failure into a revert with its reason, and a failure for a
        passing cause into a retry."""
        try:
            self._drive(name, begin)
            return
        except _Stopping:
            self._stopped(name)
            raise
        except Exception as exc:
            reason, detail, transient = self._failure(name, exc)
        try:
            self._fail(name, reason, detail, retrying=is_retryable(reason, transient))
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise
            # Not even the revert can be persisted: the record stays in its last persisted state, which the retry
            # resumes (the active model was not touched, or is the one that serves).
            event(log, "install_stalled", logging.WARNING, model=name, reason="disk_full", detail=str(exc)[:200])
            self._schedule_retry(name, "disk_full")
            return
        if is_retryable(reason, transient):
            self._schedule_retry(name, reason)

    def _failure(self, name: str, exc: Exception) -> tuple[str, str, bool]:
        """(reason, detail, transient) of what ended an install."""
        if isinstance(exc, InstallError | TrustError | IllegalTransition):
            return exc.reason, exc.detail, isinstance(exc, TrustError) and exc.retryable
        if isinstance(exc, _Superseded):
            return "superseded", str(exc), False
        detail = f"{type(exc).__name__}: {exc}"
        if is_disk_full(exc):
            return "disk_full", detail, True
        if isinstance(exc, OSError):
            return "io_error", detail, True
        if self._inbox.stopping:  # e.g. the outbox closed under an emit during shutdown
            self._stopped(name)
            raise _Stopping from exc
        event(log, "install_internal_error", logging.ERROR, model=name, exc_info=exc)
        return "internal_error", detail, False

    def _schedule_retry(self, name: str, reason: str) -> None:
        """Try the install again after the back-off's next wait; persisted, so a restart keeps it (disk permitting)."""
        rec = self._records[name]
        attempt = rec.retries + 1
        delay = round(self._backoff.delay(attempt, self._rng.random()), 3)
        self._inbox.retry(name, delay)
        scheduled = replace(rec, retries=attempt, retry_in_s=delay)
        try:
            self._journal.save(name, scheduled)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise
            self._records[name] = scheduled  # kept in memory only: a restart retries at once
            self._journal.status_changed(name)
        self._host.emit("install_retry_scheduled", model=name, release=rec.release, seq=rec.seq, reason=reason,
                        attempt=attempt, in_s=delay)  # fmt: skip

    def _drive(self, name: str, begin: Event | None) -> None:
        """Take ``begin`` (START a new install, RESUME one a restart cut before activation, or None to go on in the
        state it is in), then run each state's step and move on by the table until the install is at rest."""
        if begin is not None:
            self._journal.enter(name, begin)
        job = _Job()
        while (state := self._records[name].state) not in AT_REST:
            done = self._steps[state](name, job)
            self._journal.enter(name, Event.DONE, slots=done.slots, outcome=done.outcome)
        self._store.collect_garbage(name, self._slots[name])

    # -- the steps: each runs in its persisted state and returns what to persist with the next --------------------

    def _fetch(self, name: str, job: _Job) -> _Entry:
        """DOWNLOADING: both keys must agree on the target; then the file, unless it is here intact already."""
        entry = self._records[name].target
        assert entry is not None
        self._fetcher.refresh()
        job.target = target = self._fetcher.resolve(entry)
        self._check(name)
        job.path = self._store.cached(name, target.sha256, target.length, target.runtime)
        if job.path is None:
            job.path = self._fetcher.download(target, self._store.incoming_dir(name))
        self._check(name)
        return _Entry()

    def _verify(self, name: str, job: _Job) -> _Entry:
        """VERIFYING: the file at rest against the signed hash and length, then under its content name, staged."""
        entry, target, path = self._records[name].target, job.target, job.path
        assert entry is not None and target is not None and path is not None
        problem = file_problem(path, target.sha256, target.length)
        if problem:
            raise InstallError(problem.split(":")[0], f"{path.name} at rest: {problem}")
        fields = {"release": release_name(entry), "counter": target.release, "sha256": target.sha256,
                  "length": target.length, "runtime": target.runtime, "target": target.path}  # fmt: skip
        job.staged = self._store.stage(name, path, fields, target.card)
        return _Entry(slots=replace(self._slots[name], staged=job.staged))

    def _hold(self, name: str, _job: _Job) -> _Entry:
        """STAGED: nothing to do but give way to a newer desired state before the smoke test starts."""
        self._check(name)
        return _Entry()

    def _smoke_test(self, name: str, job: _Job) -> _Entry:
        """SMOKE_TEST: the card's signed samples through the staged file, in a child process."""
        target, staged = job.target, job.staged
        assert target is not None and staged is not None
        _, _, file_name = parse_target_path(target.path)
        result = run_smoke_test(staged.path, staged.runtime, target.card, file_name, self._config.smoke_timeout_s)
        if not result.passed:
            raise InstallError(result.reason, result.detail)
        self._check(name)
        return _Entry()

    def _activate(self, name: str, job: _Job) -> _Entry:
        """ACTIVATING: the host serves the staged release; it becomes active and the old active previous."""
        staged = job.staged
        assert staged is not None
        try:
            self._host.activate(staged.model_config(name, self._factory[name].threads))
        except runtime.RuntimeLayerError as exc:
            raise InstallError("activation_failed", str(exc)) from exc
        return _Entry(slots=ModelSlots(active=staged, previous=self._slots[name].active))

    def _probation(self, name: str, _job: _Job) -> _Entry:
        """PROBATION: watch the served release from zero until it is healthy for N inferences or T seconds."""
        active = self._slots[name].active
        assert active is not None
        limits = ProbationLimits.for_release(_signed_card(active), self._config)
        started = time.monotonic()  # not the device clock: setting it back must not stretch or cut probation
        while True:
            totals = self._host.totals(name)
            verdict = limits.judge(totals, time.monotonic() - started)
            if verdict.done:
                break
            self._pause(name)
        if verdict.reason:
            raise InstallError(verdict.reason, verdict.detail)
        rec = self._records[name]
        assert rec.target is not None
        seconds = round(time.monotonic() - started, 3)
        outcome = self._journal.committed(rec.target, rec.seq, inferences=totals.count, errors=totals.errors,
                                          seconds=seconds)  # fmt: skip
        return _Entry(outcome=outcome)

    def _check(self, name: str) -> None:
        newest = self._inbox.newest
        if self._inbox.stopping:
            raise _Stopping
        if newest is not None and newest.models.get(name) != self._records[name].target:
            raise _Superseded(f"desired state {newest.seq} wants another release")

    def _pause(self, name: str) -> None:
        self._inbox.pause(PROBATION_POLL_S)
        self._check(name)

    def _stopped(self, name: str) -> None:
        """Record a clean stop: the next start neither counts it as a crash of an install nor of a committed release
        that is still watched (:meth:`_watch_commit`)."""
        rec = self._records[name]
        if rec.state is not State.IDLE and not rec.clean_stop:
            self._journal.save(name, replace(rec, clean_stop=True))

    # -- failure and revert -------------------------------------------------------------------------------------

    def _fail(self, name: str, reason: str, detail: str, *, retrying: bool = False) -> None:
        """Revert an install that failed in its current state, then serve whatever is active now. ``retrying``: the
        outcome says the install will be tried again (its cause passes), so the fleet waits instead of counting it
        failed."""
        revert_active = self._records[name].state is State.PROBATION
        self._revert(name, reason, detail, revert_active=revert_active, retrying=retrying)
        serving = self._host.serving(name)
        active = self._slots[name].active
        wanted = active.model_config(name, None) if active else self._factory[name]
        if serving is None or (serving.path, serving.release) != (wanted.path, wanted.release):
            self._serve_active(name, self._host.activate)

    def _revert(self, name: str, reason: str, detail: str, *, revert_active: bool, retrying: bool = False) -> None:
        self._journal.enter(name, Event.FAIL, reason=reason, detail=detail, revert_active=revert_active)
        self._finish_revert(name, retrying)

    def _finish_revert(self, name: str, retrying: bool = False) -> None:
        """REVERTING -> IDLE in one transaction: staged dropped; if the active release failed, previous back."""
        rec, slots = self._records[name], self._slots[name]
        if rec.revert_active:
            failed = (slots.active or self._factory_records[name]).release
            fallback = slots.previous
            if fallback is not None and (problem := slot_problem(fallback)):
                event(log, "slot_damaged", logging.ERROR, model=name, slot="previous", release=fallback.release,
                      problem=problem)  # fmt: skip
                fallback = None
            slots = ModelSlots(active=fallback)
            kind, extra = "rolled_back", {"to": (fallback or self._factory_records[name]).release}
        else:
            failed, kind, extra = rec.release, "install_failed", {"retrying": retrying}
            slots = replace(slots, staged=None)
        outcome = self._journal.outcome(kind, failed, rec.seq, reason=rec.reason, detail=rec.detail, **extra)
        self._journal.enter(name, Event.DONE, slots=slots, reason=rec.reason, detail=rec.detail, outcome=outcome)
        self._store.collect_garbage(name, slots)

    def model_status(self, name: str) -> dict[str, Any]:
        """Slots (release, sha256 prefix) and the install state with its last outcome, for status output."""
        return self._journal.status(name)


def _signed_card(record: SlotRecord) -> dict[str, Any]:
    """A slot's signed model card ({} if it cannot be read: the slot's verification, before it is served, says why)."""
    try:
        card = json.loads(record.card.read_text()) if record.card else {}
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}
