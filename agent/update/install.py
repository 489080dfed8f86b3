"""Installing releases on the device: one explicit state machine per model, persisted before every step.

The states and their transitions are :data:`TRANSITIONS`, and :meth:`Installer._enter` takes no other::

    IDLE/COMMITTED -> DOWNLOADING -> VERIFYING -> STAGED -> SMOKE_TEST -> ACTIVATING -> PROBATION -> COMMITTED
    any state but REVERTING -> REVERTING -> IDLE          (a failure, a newer desired state, a damaged slot)

- DOWNLOADING: TUF refresh; the director's entry must match TUF's target (both keys agree), with release >=
  min_release, a runtime and hardware this device has, and a size within ``max_download_mb``; then the bounded,
  resumable download (a file this device already holds intact is not fetched again).
- VERIFYING: the file at rest is checked against the signed sha256 and length and put under its content name.
- STAGED: it is the ``staged`` slot, with its signed card.
- SMOKE_TEST: :mod:`agent.update.smoke` runs the card's signed samples in a child process.
- ACTIVATING: :meth:`AgentCore.activate` loads it and swaps it in; one transaction then makes it ``active``, the old
  active ``previous``, and enters PROBATION.
- PROBATION: N inferences or T seconds healthy (:class:`ProbationLimits`: error rate, p95 latency) -> COMMITTED.
- REVERTING: drop what was staged; if the failing release is active, put ``previous`` back (else the factory
  model). The outcome event is ``install_failed`` when the release never served, ``rolled_back`` when it did.

Each state is persisted (:class:`~agent.update.slots.SlotStore`) before its work
begins. After a SIGKILL at any instant the
next start does :data:`ON_RESTART`, before any model is served and without the network; each start in the middle of
an install counts as a restart (a clean stop does not), and at ``crash_loop_limit`` restarts the install is reverted
instead, so a release that crashes the agent is undone even with no network.

Desired state: :meth:`Installer.on_command` (reactor thread) verifies the director's signed state
(:func:`agent.update.desired.verify_desired`, with the last accepted seq persisted) and hands the newest accepted one to
the worker thread, which reconciles each model against it, one install at a time. A newer accepted state
supersedes the install under way at its next step (downloads and smoke tests finish or time out first).

Events: ``desired_rejected`` (reason), ``desired_accepted``, ``install_state`` on every transition, and one outcome
per install: ``install_committed``, ``install_failed`` or ``rolled_back`` (with reason and detail).

Test hook: ``EDGEFLEET_FAULT_KILL_AT=<STATE>`` makes the agent SIGKILL itself right after it persisted (and
evented) that state, to prove the restart table. Never set it in production.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from agent import runtime
from agent.config import ConfigError, ModelConfig, UpdateConfig
from agent.logs import event
from agent.protocol import Kind
from agent.targets import parse_target_path
from agent.telemetry import Totals
from agent.update.desired import DesiredModel, DesiredState, DesiredStateError, load_director_key, verify_desired
from agent.update.slots import ModelSlots, SlotRecord, SlotStore, factory_record, file_problem, slot_problem
from agent.update.smoke import run_smoke_test
from agent.update.tuf_client import ReleaseFetcher, TrustError

if TYPE_CHECKING:
    from agent.core import AgentCore, ServedModel

log = logging.getLogger(__name__)

#: The test hook's environment variable (see the module docstring).
FAULT_KILL_AT = "EDGEFLEET_FAULT_KILL_AT"
#: How often probation looks at the new release's counters.
PROBATION_POLL_S = 0.1
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DETAIL_CHARS = 300

T = TypeVar("T")


class State(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    SMOKE_TEST = "SMOKE_TEST"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    REVERTING = "REVERTING"


_S = State
#: Every transition an install may take. DOWNLOADING from a later state before ACTIVATING is the restart of an
#: install a crash interrupted; REVERTING from IDLE or COMMITTED is a damaged active slot found at start-up.
TRANSITIONS: Mapping[State, frozenset[State]] = MappingProxyType(
    {
        _S.IDLE: frozenset({_S.DOWNLOADING, _S.REVERTING}),
        _S.COMMITTED: frozenset({_S.DOWNLOADING, _S.REVERTING}),
        _S.DOWNLOADING: frozenset({_S.DOWNLOADING, _S.VERIFYING, _S.REVERTING}),
        _S.VERIFYING: frozenset({_S.DOWNLOADING, _S.STAGED, _S.REVERTING}),
        _S.STAGED: frozenset({_S.DOWNLOADING, _S.SMOKE_TEST, _S.REVERTING}),
        _S.SMOKE_TEST: frozenset({_S.DOWNLOADING, _S.ACTIVATING, _S.REVERTING}),
        _S.ACTIVATING: frozenset({_S.PROBATION, _S.REVERTING}),
        _S.PROBATION: frozenset({_S.COMMITTED, _S.REVERTING}),
        _S.REVERTING: frozenset({_S.IDLE}),
    }
)


class Restart(Enum):
    """What a start does for a model found in each state (after a SIGKILL, a power cut, or a clean stop)."""

    NOTHING = "serve the active slot"
    RESTART = "the active model was never touched: serve it; the worker restarts the install from DOWNLOADING"
    COMPLETE_ACTIVATION = "re-verify the staged release and make it active (PROBATION), or revert if it fails"
    CONTINUE_PROBATION = "serve the release on probation and start its probation over"
    COMPLETE_REVERT = "finish the revert before anything is served"


ON_RESTART: Mapping[State, Restart] = MappingProxyType(
    {
        _S.IDLE: Restart.NOTHING,
        _S.COMMITTED: Restart.NOTHING,
        _S.DOWNLOADING: Restart.RESTART,
        _S.VERIFYING: Restart.RESTART,
        _S.STAGED: Restart.RESTART,
        _S.SMOKE_TEST: Restart.RESTART,
        _S.ACTIVATING: Restart.COMPLETE_ACTIVATION,
        _S.PROBATION: Restart.CONTINUE_PROBATION,
        _S.REVERTING: Restart.COMPLETE_REVERT,
    }
)
_AT_REST = frozenset({State.IDLE, State.COMMITTED})


class InstallError(Exception):
    """An install that cannot go on. ``reason`` is short and stable (a counter key); ``detail`` explains."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _Superseded(Exception):
    """A newer desired state wants something else for this model."""


class _Stopping(Exception):
    """The agent is shutting down: leave the install where it is; the next start resumes it."""


def release_name(entry: DesiredModel) -> str:
    """The release as the agent reports it (``name:version``), as in agent.toml and telemetry."""
    return f"{entry.name}:{entry.version}"


@dataclass(frozen=True)
class InstallRecord:
    """A model's install, as persisted beside its slots."""

    state: State = State.IDLE
    #: The desired state this model last acted on, and the director's entry for it.
    seq: int = -1
    target: DesiredModel | None = None
    reason: str = ""
    detail: str = ""
    #: Starts of the agent since the install began (not counting clean stops): the crash-loop counter.
    restarts: int = 0
    clean_stop: bool = False
    #: In REVERTING: whether the failing release is the active one (so ``previous`` must be put back).
    revert_active: bool = False
    outcome: Mapping[str, Any] | None = None

    @property
    def release(self) -> str:
        return release_name(self.target) if self.target else ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value, "outcome": dict(self.outcome or {}) or None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstallRecord:
        if not data:
            return cls()
        target = data.get("target")
        return cls(
            **{**data, "state": State(data["state"]), "target": DesiredModel(**target) if target else None},
        )


@dataclass(frozen=True)
class Verdict:
    done: bool
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class ProbationLimits:
    """What a new release must show in service before it is committed."""

    inferences: int
    seconds: float
    max_error_rate: float
    latency_p95_ms: float | None

    @classmethod
    def for_release(cls, card: Mapping[str, Any], config: UpdateConfig) -> ProbationLimits:
        """The card's signed ``probation`` section where it has one, else the device's defaults.

        ``{"inferences", "seconds", "max_error_rate", "latency_p95_ms"}``; the latency budget defaults to the smoke
        test's (a per-row budget: releases whose callers batch should sign ``latency_p95_ms``).
        """
        signed = card.get("probation")
        signed = signed if isinstance(signed, Mapping) else {}
        smoke = card.get("smoke_test")
        smoke = smoke if isinstance(smoke, Mapping) else {}

        def pick(value: Any, default: Any, low: float = 0.0) -> Any:
            fine = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            return value if fine and value >= low else default

        return cls(
            inferences=int(pick(signed.get("inferences"), config.probation_inferences, 1)),
            seconds=float(pick(signed.get("seconds"), config.probation_s)),
            max_error_rate=min(1.0, float(pick(signed.get("max_error_rate"), config.max_error_rate))),
            latency_p95_ms=pick(signed.get("latency_p95_ms"), pick(smoke.get("latency_budget_ms"), None)),
        )

    def judge(self, totals: Totals, elapsed_s: float) -> Verdict:
        """Fail as soon as the errors exceed what N inferences allow; else pass at N inferences or T seconds."""
        n, errors = totals.count, totals.errors
        if errors > self.max_error_rate * max(n, self.inferences):
            limit = f"at most {self.max_error_rate:.0%} of {max(n, self.inferences)}"
            return Verdict(True, "probation_errors", f"{errors} of {n} inferences failed ({limit} allowed)")
        if n < self.inferences and elapsed_s < self.seconds:
            return Verdict(False)
        p95 = totals.latency_quantile_ms(0.95)
        if self.latency_p95_ms is not None and p95 > self.latency_p95_ms:
            detail = f"p95 latency {p95:.3g} ms > {self.latency_p95_ms:g} ms over {n} inferences"
            return Verdict(True, "probation_latency", detail)
        return Verdict(True)


def _desired_to_dict(state: DesiredState, sha256: str) -> dict[str, Any]:
    return {
        "seq": state.seq,
        "sha256": sha256,
        "issued": state.issued,
        "expires": state.expires,
        "campaign": state.campaign,
        "models": {name: asdict(entry) for name, entry in state.models.items()},
    }


def _desired_from_dict(data: Mapping[str, Any], device_id: str) -> DesiredState:
    """The desired state this device accepted (verified then, so read back from its own durable state as is)."""
    models = {name: DesiredModel(**entry) for name, entry in data["models"].items()}
    return DesiredState(
        device_id, data["seq"], data["issued"], data["expires"], data["campaign"], MappingProxyType(models)
    )


class Installer:
    """Updates of one agent's models: desired state in, verified releases out, one install at a time.

    Threads: :meth:`on_command` runs on the reactor thread; installs (TUF, downloads, smoke tests, probation) on
    the installer's own worker thread; :meth:`recover` runs in the core's constructor, before anything is served.
    """

    def __init__(self, core: AgentCore, config: UpdateConfig) -> None:
        self._core = core
        self._config = config
        self._factory = {m.name: m for m in core.config.models}
        self._factory_records: dict[str, SlotRecord] = {}
        try:
            self._director_key = load_director_key(config.director_key.read_bytes())
            trusted_root = config.trusted_root.read_bytes()
            Metadata[Root].from_bytes(trusted_root)
        except OSError as exc:
            raise ConfigError(f"[update]: cannot read {exc.filename} ({exc.strerror})") from None
        except DesiredStateError as exc:
            raise ConfigError(f"[update] director_key {config.director_key}: not a director key ({exc})") from None
        except DeserializationError as exc:
            raise ConfigError(f"[update] trusted_root {config.trusted_root}: not a TUF root ({exc})") from None
        state_dir = core.config.state_dir
        self._store = SlotStore(state_dir)
        self._fetcher = ReleaseFetcher(
            state_dir,
            config.repo_url,
            trusted_root,
            config.max_download_bytes,
            config.download_deadline_s,
            runtimes=runtime.runtime_names(),
            clock=core.clock,
        )
        self._records: dict[str, InstallRecord] = {}
        self._slots: dict[str, ModelSlots] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._status_lock = threading.Lock()
        self._wake = threading.Condition()
        self._todo: DesiredState | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._kill_at = os.environ.get(FAULT_KILL_AT)
        accepted = self._store.get("desired") or {}
        self._accepted = accepted
        self._last_seq: int = accepted.get("seq", -1)
        self._accepted_sha256: str = accepted.get("sha256", "")
        self._rejected = ("", "")

    # -- start-up (core constructor) ----------------------------------------------------------------------------

    def recover(self, build: Callable[[ModelConfig], ServedModel]) -> dict[str, ServedModel]:
        """Settle every model after whatever ended the last run, then build what to serve: a verified model."""
        served = {}
        for cfg in self._core.config.models:
            self._factory_records[cfg.name] = factory_record(cfg)
            slots, stored = self._store.load(cfg.name)
            self._slots[cfg.name], self._records[cfg.name] = slots, InstallRecord.from_dict(stored)
            self._restart(cfg.name)
            served[cfg.name] = self._serve_active(cfg.name, build)
        return served

    def _restart(self, name: str) -> None:
        rec = self._records[name]
        action = ON_RESTART[rec.state]
        if action is Restart.NOTHING:
            self._save(name, rec)
            if rec.outcome and not rec.outcome.get("reported"):
                self._report(name)  # the last run stopped between persisting an outcome and eventing it
            return
        if action is Restart.COMPLETE_REVERT:
            self._finish_revert(name)
            return
        rec = replace(rec, restarts=rec.restarts + (0 if rec.clean_stop else 1), clean_stop=False)
        self._core.emit("install_resumed", model=name, state=rec.state.value, release=rec.release, seq=rec.seq,
                        restarts=rec.restarts, action=action.name)  # fmt: skip
        if rec.restarts >= self._config.crash_loop_limit:
            self._records[name] = rec
            detail = f"{rec.restarts} agent restarts in {rec.state.value}"
            self._revert(name, "crash_loop", detail, revert_active=rec.state is State.PROBATION)
            return
        self._save(name, rec)
        self._fault_point(rec.state)
        if action is Restart.COMPLETE_ACTIVATION:
            slots = self._slots[name]
            problem = slot_problem(slots.staged) if slots.staged else "missing"
            if problem:
                self._revert(name, "staged_damaged", problem, revert_active=False)
            else:
                self._enter(name, State.PROBATION, slots=ModelSlots(active=slots.staged, previous=slots.active))

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
        if self._accepted:
            self._todo = _desired_from_dict(self._accepted, self._core.device_id)
        self._thread = threading.Thread(target=self._run, name=f"install-{self._core.device_id}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker at its next step; an install under way stays persisted and resumes at the next start."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # blocked in a download or a smoke test: it dies with the process
                event(log, "install_worker_busy_at_exit", logging.WARNING, device_id=self._core.device_id)
                return
        self._store.close()

    # -- desired state (reactor thread) -------------------------------------------------------------------------

    def on_command(self, kind: Kind, payload: bytes) -> None:
        """A message on the device's desired or cmd topic: verify, persist the seq, hand the state to the worker."""
        if kind is not Kind.DESIRED:
            event(log, "command_ignored", logging.WARNING, device_id=self._core.device_id, kind=kind.value)
            return
        digest = hashlib.sha256(payload).hexdigest()
        if digest == self._accepted_sha256:
            return  # the retained state, delivered again on reconnect: already acted on
        try:
            core = self._core
            state = verify_desired(payload, self._director_key, core.device_id, self._last_seq, core.clock())
        except DesiredStateError as exc:
            # Checked again on every delivery (a clock set right makes it valid), reported once per payload and reason.
            if (digest, exc.reason) != self._rejected:
                self._rejected = (digest, exc.reason)
                self._core.emit("desired_rejected", reason=exc.reason, detail=exc.detail[:_DETAIL_CHARS])
            return
        self._store.put("desired", _desired_to_dict(state, digest))
        self._last_seq, self._accepted_sha256 = state.seq, digest
        releases = {name: release_name(entry) for name, entry in state.models.items()}
        self._core.emit("desired_accepted", seq=state.seq, campaign=state.campaign, models=releases)
        for name in sorted(set(state.models) - set(self._factory)):
            self._core.emit("install_failed", model=name, release=releases[name], seq=state.seq,
                            reason="unknown_model", detail="not a [[models]] entry of agent.toml")  # fmt: skip
        with self._wake:
            self._todo = state
            self._wake.notify_all()

    # -- the worker ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._todo is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                desired, self._todo = self._todo, None
            try:
                self._reconcile(desired)
            except _Stopping:
                return
            except Exception:  # a bug must not end updates for good: report it, wait for the next desired state
                event(log, "install_worker_failed", logging.ERROR, device_id=self._core.device_id, exc_info=True)

    def _reconcile(self, desired: DesiredState) -> None:
        """Bring each model to what ``desired`` says, one at a time; return early when a newer state is waiting."""
        for name in sorted(self._factory):
            with self._wake:
                if self._todo is not None:
                    return
            entry = desired.models.get(name)
            rec = self._records[name]
            if rec.state not in _AT_REST:
                if entry == rec.target:  # resume: the outcome answers the newest state that asks for it
                    self._records[name] = replace(rec, seq=desired.seq)
                    self._attempt(name, self._probation if rec.state is State.PROBATION else self._download)
                    continue
                wanted = release_name(entry) if entry else "no release"
                self._fail(name, "superseded", f"desired state {desired.seq} wants {wanted}")
                rec = self._records[name]
            if entry is None or (rec.seq == desired.seq and rec.target == entry):
                continue  # not asked for, or already acted on (whatever the outcome): only a new seq retries
            if self._is_active(name, entry):
                outcome = self._outcome("install_committed", entry, desired.seq, unchanged=True)
                self._save(name, replace(rec, seq=desired.seq, target=entry, outcome=outcome))
                self._report(name)
                continue
            self._records[name] = replace(rec, seq=desired.seq, target=entry, restarts=0)
            self._attempt(name, self._download)

    def _is_active(self, name: str, entry: DesiredModel) -> bool:
        active = self._slots[name].active or self._factory_records[name]
        return active.sha256 == entry.sha256 and active.release == release_name(entry)

    def _attempt(self, name: str, steps: Callable[[str], None]) -> None:
        """Run install steps; turn any failure into a revert with its reason."""
        try:
            steps(name)
        except (InstallError, TrustError) as exc:
            self._fail(name, exc.reason, exc.detail)
        except _Superseded as exc:
            self._fail(name, "superseded", str(exc))
        except _Stopping:
            self._stopped(name)
            raise
        except OSError as exc:
            self._fail(name, "disk_full" if exc.errno in _DISK_FULL else "io_error", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            if self._stopping:  # e.g. the outbox closed under an emit during shutdown
                self._stopped(name)
                raise _Stopping from exc
            event(log, "install_internal_error", logging.ERROR, model=name, exc_info=True)
            self._fail(name, "internal_error", f"{type(exc).__name__}: {exc}")

    def _download(self, name: str) -> None:
        """DOWNLOADING through PROBATION for the record's target."""
        entry = self._records[name].target
        assert entry is not None
        self._enter(name, State.DOWNLOADING)
        self._fetcher.refresh()
        target = self._fetcher.resolve(entry)
        self._check(name)
        path = self._store.cached(name, target.sha256, target.length, target.runtime)
        if path is None:
            path = self._fetcher.download(target, self._store.incoming_dir(name))
        self._check(name)

        self._enter(name, State.VERIFYING)
        problem = file_problem(path, target.sha256, target.length)
        if problem:
            raise InstallError(problem.split(":")[0], f"{path.name} at rest: {problem}")
        fields = {"release": release_name(entry), "counter": target.release, "sha256": target.sha256,
                  "length": target.length, "runtime": target.runtime, "target": target.path}  # fmt: skip
        staged = self._store.stage(name, path, fields, target.card)
        self._enter(name, State.STAGED, slots=replace(self._slots[name], staged=staged))
        self._check(name)

        self._enter(name, State.SMOKE_TEST)
        _, _, file_name = parse_target_path(target.path)
        result = run_smoke_test(staged.path, staged.runtime, target.card, file_name, self._config.smoke_timeout_s)
        if not result.passed:
            raise InstallError(result.reason, result.detail)
        self._check(name)

        self._enter(name, State.ACTIVATING)
        try:
            self._core.activate(staged.model_config(name, self._factory[name].threads))
        except runtime.RuntimeLayerError as exc:
            raise InstallError("activation_failed", str(exc)) from exc
        slots = self._slots[name]
        self._enter(name, State.PROBATION, slots=ModelSlots(active=staged, previous=slots.active))
        self._probation(name)

    def _probation(self, name: str) -> None:
        """Watch the served release from zero until it is healthy for N inferences or T seconds; then commit."""
        active = self._slots[name].active
        assert active is not None and active.card is not None
        try:
            card = json.loads(active.card.read_text())
        except (OSError, ValueError):
            card = {}
        limits = ProbationLimits.for_release(card, self._config)
        served = self._core.models[name]
        started = time.monotonic()  # not the device clock: setting it back must not stretch or cut probation
        while True:
            totals = served.telemetry.totals()
            verdict = limits.judge(totals, time.monotonic() - started)
            if verdict.done:
                break
            self._pause(name)
        if verdict.reason:
            raise InstallError(verdict.reason, verdict.detail)
        rec = self._records[name]
        assert rec.target is not None
        seconds = round(time.monotonic() - started, 3)
        outcome = self._outcome("install_committed", rec.target, rec.seq, inferences=totals.count,
                                errors=totals.errors, seconds=seconds)  # fmt: skip
        self._enter(name, State.COMMITTED, outcome=outcome)
        self._store.collect_garbage(name, self._slots[name])

    def _check(self, name: str) -> None:
        with self._wake:
            stopping, newest = self._stopping, self._todo
        if stopping:
            raise _Stopping
        if newest is not None and newest.models.get(name) != self._records[name].target:
            raise _Superseded(f"desired state {newest.seq} wants another release")

    def _pause(self, name: str) -> None:
        with self._wake:
            if not self._stopping:
                self._wake.wait(PROBATION_POLL_S)
        self._check(name)

    def _stopped(self, name: str) -> None:
        rec = self._records[name]
        if rec.state not in _AT_REST:
            self._save(name, replace(rec, clean_stop=True))

    # -- failure and revert -------------------------------------------------------------------------------------

    def _fail(self, name: str, reason: str, detail: str) -> None:
        """Revert an install that failed in its current state, then serve whatever is active now."""
        self._revert(name, reason, detail, revert_active=self._records[name].state is State.PROBATION)
        served = self._core.models.get(name)
        active = self._slots[name].active
        wanted = active.model_config(name, None) if active else self._factory[name]
        if served is None or (served.config.path, served.config.release) != (wanted.path, wanted.release):
            self._serve_active(name, self._core.activate)

    def _revert(self, name: str, reason: str, detail: str, *, revert_active: bool) -> None:
        self._enter(name, State.REVERTING, reason=reason, detail=detail, revert_active=revert_active)
        self._finish_revert(name)

    def _finish_revert(self, name: str) -> None:
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
            failed, kind, extra = rec.release, "install_failed", {}
            slots = replace(slots, staged=None)
        outcome = {"outcome": kind, "release": failed, "seq": rec.seq, "reason": rec.reason, "detail": rec.detail,
                   "ts": self._core.clock(), "reported": False, **extra}  # fmt: skip
        self._enter(name, State.IDLE, slots=slots, reason=rec.reason, detail=rec.detail, outcome=outcome)
        self._store.collect_garbage(name, slots)

    def _outcome(self, kind: str, entry: DesiredModel, seq: int, **extra: Any) -> dict[str, Any]:
        return {"outcome": kind, "release": release_name(entry), "seq": seq, "reason": "", "detail": "",
                "ts": self._core.clock(), "reported": False, **extra}  # fmt: skip

    def _report(self, name: str) -> None:
        """Event the record's outcome, then mark it reported: a crash in between reports it again at the next start."""
        rec = self._records[name]
        assert rec.outcome is not None
        fields = {k: v for k, v in rec.outcome.items() if k not in ("outcome", "ts", "reported")}
        self._core.emit(rec.outcome["outcome"], model=name, **fields)
        self._save(name, replace(rec, outcome={**rec.outcome, "reported": True}))

    # -- persistence --------------------------------------------------------------------------------------------

    def _enter(
        self,
        name: str,
        state: State,
        *,
        slots: ModelSlots | None = None,
        reason: str = "",
        detail: str = "",
        revert_active: bool | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> None:
        """Take one transition of :data:`TRANSITIONS`: persist it (with any slot change, atomically), then event it."""
        rec = self._records[name]
        if state not in TRANSITIONS[rec.state]:
            raise InstallError("internal_error", f"{rec.state.value} -> {state.value} is not a transition")
        detail = detail[:_DETAIL_CHARS]
        rec = replace(
            rec,
            state=state,
            reason=reason,
            detail=detail,
            restarts=0 if state in _AT_REST else rec.restarts,
            revert_active=rec.revert_active if revert_active is None else revert_active,
            outcome=outcome or rec.outcome,
        )
        self._save(name, rec, slots)
        self._core.emit("install_state", model=name, state=state.value, release=rec.release, seq=rec.seq,
                        reason=reason, **({"detail": detail} if detail else {}))  # fmt: skip
        if outcome is not None:
            self._report(name)
        self._fault_point(state)

    def _save(self, name: str, rec: InstallRecord, slots: ModelSlots | None = None) -> None:
        """Persist first; only then does the in-memory state (and what status shows) move."""
        slots = slots or self._slots[name]
        self._store.save(name, slots, rec.to_dict())
        self._records[name], self._slots[name] = rec, slots
        factory = self._factory_records[name]
        status = {
            "slots": {
                "active": (slots.active or factory).summary(),
                "previous": (slots.previous or factory).summary() if slots.active else None,
                "staged": slots.staged.summary() if slots.staged else None,
            },
            "install": {
                "state": rec.state.value,
                "release": rec.release,
                "seq": rec.seq,
                "reason": rec.reason,
                "detail": rec.detail,
                "restarts": rec.restarts,
                "last_outcome": dict(rec.outcome) if rec.outcome else None,
            },
        }
        with self._status_lock:
            self._status[name] = status
        self._core.reactor.call_soon_threadsafe(self._core.write_status)

    def _fault_point(self, state: State) -> None:
        if self._kill_at == state.value:
            event(log, "fault_injected", logging.WARNING, hook=FAULT_KILL_AT, state=state.value)
            os.kill(os.getpid(), signal.SIGKILL)

    def model_status(self, name: str) -> dict[str, Any]:
        """Slots (release, sha256 prefix) and the install state with its last outcome, for status output."""
        with self._status_lock:
            return dict(self._status.get(name, {}))
