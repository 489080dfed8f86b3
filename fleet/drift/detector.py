"""The drift detector: inside `fleet serve`, a round every ``round_s`` judges the windows stored since the last.

A round reads the windows stored since its reading place (by rowid), adds each to its device's pile for its
(model, release), and judges every release whose signed card holds a drift reference, with the devices whose pile
has reached the engine's minimum sample (:data:`fleet.drift.stats.MIN_SAMPLES` rows; a device at a low rate is judged
once its rows add up). The engine (:mod:`fleet.drift.engine`) gives findings per scope; :func:`engine.advance`
turns them into tracks; each change of state is an audit entry (``drift_alarm``, ``drift_cleared``) and, for a
``drift``, a call of the retrain hook (:class:`DriftHooks`). Tracks, each device's DDM and the reading place are
written in one transaction per round, so a restart continues where the last round ended.

Times are the fleet's (``received_at``): a device's clock may be wrong. A device's pile that has not reached the
minimum sample when `fleet serve` stops is not kept: after a restart it starts again from the windows that follow.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.histograms import merge_windows
from agent.logs import event
from agent.targets import parse_target_path
from fleet.drift import engine
from fleet.drift.stats import MIN_SAMPLES, FeatureShift
from fleet.errors import NotFound
from fleet.rounds import Rounds
from fleet.store.api import Store
from fleet.store.rows import DriftTrack
from fleet.trust.repository import Repository

log = logging.getLogger(__name__)

ACTOR = "drift-detector"
#: Windows a round reads at most (the rest waits for the next round).
WINDOWS_PER_ROUND = 50_000


@dataclass
class DriftHooks:
    """The retrain trigger: for a scope that turns to ``drift``, run ``command`` with the alarm as JSON on its
    standard input and/or POST it to ``url``, at most once per ``backoff_s`` per (model, scope, key, kind), so one
    alarm does not start a hundred jobs. Calls run on their own threads: a slow hook never holds a round."""

    command: str | None = None
    url: str | None = None
    backoff_s: float = 3600.0
    clock: Callable[[], float] = time.time
    _last: dict[tuple[str, ...], float] = field(default_factory=dict, init=False, repr=False)

    def fire(self, alarm: Mapping[str, Any]) -> bool:
        """Hand ``alarm`` to the hooks unless its key fired within the back-off; whether it was handed over."""
        if self.command is None and self.url is None:
            return False
        key = (alarm["model"], alarm["scope"], alarm["key"], alarm["kind"])
        now = self.clock()
        if now - self._last.get(key, float("-inf")) < self.backoff_s:
            event(
                log, "drift_hook_backoff", key="/".join(key), next_in_s=round(self.backoff_s - (now - self._last[key]))
            )
            return False
        self._last[key] = now
        body = json.dumps(alarm, sort_keys=True).encode()
        threading.Thread(target=self._call, args=(body, "/".join(key)), daemon=True).start()
        return True

    def _call(self, body: bytes, key: str) -> None:
        if self.command is not None:
            try:
                done = subprocess.run(shlex.split(self.command), input=body, capture_output=True, timeout=600)
                event(log, "drift_hook_ran", key=key, exit_code=done.returncode,
                      stderr=done.stderr.decode(errors="replace")[-300:])  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                event(log, "drift_hook_failed", logging.WARNING, key=key, error=str(exc)[:300])
        if self.url is not None:
            request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:  # the operator's own URL
                    event(log, "drift_hook_posted", key=key, status=answer.status)
            except OSError as exc:
                event(log, "drift_hook_failed", logging.WARNING, key=key, url=self.url, error=str(exc)[:300])


def track_row(model: str, release: str, track: engine.Track, at: float) -> DriftTrack:
    """An engine track as the store keeps it."""
    return DriftTrack(
        model=model, scope=track.scope, key=track.key, kind=track.kind, release=release, state=track.state,
        history=list(track.history), since=track.since, features=[asdict(s) for s in track.features],
        classes=[list(c) for c in track.classes], figures=dict(track.figures), detail=track.detail, updated_at=at,
    )  # fmt: skip


def engine_track(row: DriftTrack) -> engine.Track:
    return engine.Track(
        row.scope, row.key, row.kind, tuple(row.history), row.state, row.since,
        tuple(FeatureShift(**f) for f in row.features), tuple((int(c[0]), c[1], c[2]) for c in row.classes),
        row.figures, row.detail,
    )  # fmt: skip


def alarm_json(row: DriftTrack) -> dict[str, Any]:
    """A track as `fleet drift status --json` lists it, and as the hooks receive it."""
    where = {"device_id": row.key} if row.scope == "device" else {"group": row.key}
    return {
        "model": row.model, "release": row.release, "scope": row.scope, "key": row.key, **where,
        "kind": row.kind, "state": row.state, "since": row.since, "features": row.features,
        "classes": [{"class": int(c[0]), "share": c[1], "others": c[2]} for c in row.classes],
        "figures": row.figures, "detail": row.detail, "updated_at": row.updated_at,
    }  # fmt: skip


class DriftDetector(Rounds):
    """Runs :meth:`tick` every ``round_s`` on a thread from :meth:`start` until :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        repo: Repository,
        *,
        round_s: float = 60.0,
        group_tag: str | None = "site",
        hooks: DriftHooks | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store, self._repo = store, repo
        super().__init__("drift", round_s)
        self._group_tag, self._hooks, self._clock = group_tag, hooks or DriftHooks(), clock
        self._piles: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
        self._tracks: dict[str, dict[tuple[str, str, str], engine.Track]] | None = None
        self._state: dict[str, Any] = {}
        self._references: dict[str, engine.Reference | None] = {}

    def _load(self) -> dict[str, dict[tuple[str, str, str], engine.Track]]:
        if self._tracks is None:
            self._tracks = {}
            for row in self._store.drift_tracks():
                self._tracks.setdefault(row.model, {})[(row.scope, row.key, row.kind)] = engine_track(row)
            self._state = self._store.drift_state()
        return self._tracks

    def _reference(self, release: str) -> engine.Reference | None:
        """The release's signed drift reference and calibration, or None (a factory model, a card without one)."""
        if release not in self._references:
            name, _, version = release.partition(":")
            try:
                info = self._repo.release(name, version)
                file = parse_target_path(info["target"])[2]
                card = info["card"]
                self._references[release] = engine.Reference.from_card(card, file) if "drift" in card else None
            except (NotFound, ValueError, KeyError):
                self._references[release] = None
        return self._references[release]

    def tick(self) -> list[DriftTrack]:
        """One round; returns the tracks whose state changed."""
        tracks = self._load()
        now = self._clock()
        cursor = int(self._state.get("cursor", 0))
        read = 0
        while read < WINDOWS_PER_ROUND:
            found, cursor = self._store.windows_since(cursor)
            for w in found:
                window = w.window
                pile = self._piles.setdefault((window["model"], window["release"]), {})
                pile.setdefault(window["device_id"], []).append(window)
            read += len(found)
            if not found:
                break
        tags = self._store.tags() if self._piles else {}
        changed_rows: list[DriftTrack] = []
        rows: list[DriftTrack] = []
        audit: list[tuple[str, str, str, dict[str, Any]]] = []
        for (model, release), pile in list(self._piles.items()):
            reference = self._reference(release)
            if reference is None:
                del self._piles[(model, release)]
                continue
            ready = {d: ws for d, ws in pile.items() if sum(int(w["count"]) for w in ws) >= MIN_SAMPLES}
            if not ready:
                continue
            batches = []
            for device_id, windows in ready.items():
                merged = merge_windows(windows)
                batches.append(engine.DeviceBatch(device_id, merged, tags.get(device_id, {})))
                del pile[device_id]
            findings = engine.assess(batches, reference, group_tag=self._group_tag)
            findings += self._concept(model, batches)
            model_tracks, changed = engine.advance(tracks.get(model, {}), findings, now)
            tracks[model] = model_tracks
            touched = {(f.scope, f.key, f.kind) for f in findings}
            rows += [track_row(model, release, t, now) for k, t in model_tracks.items() if k in touched]
            for t in changed:
                row = track_row(model, release, t, now)
                changed_rows.append(row)
                action = "drift_cleared" if t.state == "ok" else "drift_alarm"
                summary = {k: v for k, v in alarm_json(row).items() if k not in ("figures", "updated_at")}
                audit.append((ACTOR, action, f"{t.scope}:{t.key}", summary))
        self._state["cursor"] = cursor
        self._store.save_drift(rows, self._state, audit)
        for row in changed_rows:
            event(log, "drift_state", model=row.model, scope=row.scope, key=row.key, kind=row.kind, state=row.state,
                  detail=row.detail[:300])  # fmt: skip
            if row.state == "drift":
                self._hooks.fire(alarm_json(row))
        return changed_rows

    def _concept(self, model: str, batches: Sequence[engine.DeviceBatch]) -> list[engine.Finding]:
        """Each device's DDM over its feedback this round (kept in the detector's state)."""
        findings = []
        for b in batches:
            name = f"ddm:{model}:{b.device_id}"
            self._state[name], verdict = engine.concept(self._state.get(name), b.window)
            detail = f"feedback error rate rising (DDM {verdict})" if verdict != "ok" else ""
            findings.append(engine.Finding("device", b.device_id, "concept", verdict != "ok", detail=detail))
        return findings
