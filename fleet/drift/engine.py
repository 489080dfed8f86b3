"""The drift engine: one round's windows of a release, merged per device, in; findings per scope out. Pure.

Each round the detector hands over, per device on one release, its windows merged into one :class:`DeviceBatch`.
:func:`assess` judges three scopes, so that a shift is reported once, where it lives:

* **fleet**: every device's rows merged, against the release's signed reference. A fleet finding also needs more
  than :data:`SHARE` of the devices to drift on their own: one very drifted device with many rows does not make the
  world change.
* **group** (a tag's value, ``site=north``): the group's rows merged, against the reference AND against the rest of
  the fleet (two-sample). A shift the whole fleet shares is not the group's, so it makes no group finding; again more
  than :data:`SHARE` of the group's devices must drift on their own.
* **device**: the device against the reference AND against the devices it is compared with: the rest of its group
  when its group has a finding (a device that drifted with its site is explained by it), else the rest of the
  fleet (leave one out).

Kinds: ``data`` (the features, as above); ``prediction`` (predicted classes and top-1 confidence against the rest:
the card holds no reference for them, so a fleet-wide prediction shift shows only through ``accuracy``);
``accuracy`` (the label-free estimate from the confidence histogram and the card's calibration,
:mod:`fleet.drift.accuracy`, and where feedback exists the measured accuracy, each against the card's held-out
accuracy). ``concept`` (the error rate of feedback, :class:`~fleet.drift.stats.Ddm`) is stateful: :func:`advance`.

A finding's test is the G-test, Benjamini-Hochberg across every device and feature of the round (per scope level),
with an effect floor and a minimum sample (:func:`fleet.drift.stats.decide`). :func:`advance` adds persistence (2 of
the last 3 rounds) and turns findings into states: ``warning`` at the first hit, ``drift`` once it persists, back to
``ok`` when it has not hit in a full persistence window. Each state says since when, and what moved: the features
ranked by effect with their direction, and the classes whose predicted share moved most.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fleet.drift import stats
from fleet.drift.accuracy import Calibration, accuracy_drop, estimated_accuracy, measured_accuracy

#: The share of a scope's devices that must drift on their own for the scope (fleet or group) to be the finding.
SHARE = 0.5
#: Devices a group needs to be judged as a group.
MIN_GROUP_DEVICES = 3
#: Features and classes an explanation lists, largest effect first.
TOP = 5
SCOPES = ("device", "group", "fleet")
KINDS = ("data", "prediction", "concept", "accuracy")
STATES = ("ok", "warning", "drift")
#: 2 of the last 3 rounds: a drift alarms on its second round, one noisy round never does.
PERSISTENCE = stats.Persistence()


@dataclass(frozen=True)
class DeviceBatch:
    """One device's windows of one round, merged (``agent.histograms.merge_windows``' fields), with its tags and the
    fleet's times of its first and last window."""

    device_id: str
    window: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)
    since: float = 0.0
    until: float = 0.0


@dataclass(frozen=True)
class Reference:
    """What a release's card says its data and answers look like: per-feature reference counts, held-out accuracy
    and the confidence calibration of the file devices run."""

    rows: tuple[tuple[int, ...], ...]
    accuracy: float | None = None
    calibration: Calibration | None = None

    @classmethod
    def from_card(cls, card: Mapping[str, Any], file: str) -> Reference:
        drift = card["drift"]
        accuracy = (card.get("files", {}).get(file) or {}).get("accuracy")
        return cls(tuple(tuple(r) for r in drift["reference_counts"]), accuracy, Calibration.from_card(card, file))


@dataclass(frozen=True)
class Finding:
    """One scope's verdict in one round: ``hit`` (drifted now), with what moved."""

    scope: str
    key: str
    kind: str
    hit: bool
    features: tuple[stats.FeatureShift, ...] = ()
    classes: tuple[tuple[int, float, float], ...] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""


def _rows(window: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(window["features"], dtype=np.int64)


def _sum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.sum(np.stack(arrays), axis=0)


def _two_sample(observed: Sequence[np.ndarray], rest: Sequence[np.ndarray]) -> list[stats.FeatureShift]:
    """Per row (a feature, or a histogram), ``observed`` against ``rest``: rows of unequal width (classes and
    confidence) are padded with empty columns before the NaN-free end, which no statistic counts."""
    width = max(len(r) for r in observed)
    pad = [np.concatenate([np.zeros(width - len(r), np.int64), r]) for r in observed]
    pad_rest = [np.concatenate([np.zeros(width - len(r), np.int64), r]) for r in rest]
    return stats.two_sample_shifts(np.stack(pad), np.stack(pad_rest))


def _vs_reference(observed: np.ndarray, reference: Reference) -> list[stats.FeatureShift]:
    """Per feature, the observed rows against the card's reference counts as what they are: a sample (1,347 training
    rows for the digits), by the two-sample test. Taking them as exact probabilities (the one-sample G-test) gave
    p-values too small for data that only differs from the training rows by sampling: 4 of 11 clean devices were
    flagged in a round where one occluded device relaxed Benjamini-Hochberg's threshold (p down to 2e-6, JS 0.009)."""
    width = observed.shape[1]
    padded = []
    for row in reference.rows:
        if len(row) > width:
            raise ValueError(f"a reference row of {len(row)} columns does not fit windows of {width}")
        padded.append([*row[:-2], *([0] * (width - len(row))), *row[-2:]])
    return stats.two_sample_shifts(observed, np.asarray(padded, dtype=np.int64))


def _decide_many(families: Mapping[str, list[stats.FeatureShift]]) -> dict[str, list[stats.FeatureShift]]:
    """:func:`stats.decide` over every key's shifts together (one BH family), split back by key."""
    flat = [(key, s) for key, shifts in families.items() for s in shifts]
    kept = {id(s) for s in stats.decide([s for _, s in flat])}
    return {key: [s for s in shifts if id(s) in kept] for key, shifts in families.items()}


def _ranked(shifts: Sequence[stats.FeatureShift]) -> tuple[stats.FeatureShift, ...]:
    return tuple(sorted(shifts, key=lambda s: -s.effect)[:TOP])


def _signed(shifts: Sequence[stats.FeatureShift]) -> list[float]:
    """Every feature's effect, signed by its direction: what `fleet drift show` draws as a heat map."""
    return [round(s.effect if s.direction >= 0 else -s.effect, 6) for s in shifts]


def _explain(shifts: Sequence[stats.FeatureShift]) -> str:
    return ", ".join(f"feature {s.feature} {'up' if s.direction > 0 else 'down'} (JS {s.effect:.3f})" for s in shifts)


def assess_data(batches: Sequence[DeviceBatch], reference: Reference, group_tag: str | None) -> list[Finding]:
    """The ``data`` findings of one round (see the module docstring)."""
    if not batches:
        return []
    rows = {b.device_id: _rows(b.window) for b in batches}
    total = _sum(list(rows.values()))
    own_shifts = {d: _vs_reference(r, reference) for d, r in rows.items()}
    on_own = _decide_many(own_shifts)
    # Whether a shift is shared is counted on each device judged alone (BH over its own features): in the pooled
    # family a site's many true rejections relax the threshold for every other device, whose marginal features
    # would then count as drifted too.
    drifted = {d: {s.feature for s in stats.decide(shifts)} for d, shifts in own_shifts.items()}
    findings: list[Finding] = []

    def shared(shifts: Sequence[stats.FeatureShift], members: Sequence[str]) -> list[stats.FeatureShift]:
        """The features that drifted on more than :data:`SHARE` of ``members`` on their own: a scope's shift, not
        one member's (a single occluded device moves its site's merged rows too)."""
        return [s for s in shifts if sum(s.feature in drifted[d] for d in members) > SHARE * len(members)]

    fleet_shifts = _vs_reference(total, reference)
    fleet_vs_ref = shared(stats.decide(fleet_shifts), list(rows))
    fleet_hit = bool(fleet_vs_ref)
    findings.append(Finding("fleet", "fleet", "data", fleet_hit, _ranked(fleet_vs_ref),
                            figures={"devices": len(batches), "drifting": sum(bool(f) for f in drifted.values()),
                                     "shift": _signed(fleet_shifts)},
                            detail=_explain(_ranked(fleet_vs_ref))))  # fmt: skip

    groups: dict[str, list[str]] = {}
    if group_tag:
        for b in batches:
            if group_tag in b.tags:
                groups.setdefault(f"{group_tag}={b.tags[group_tag]}", []).append(b.device_id)
    judged = {g: ids for g, ids in groups.items() if len(ids) >= MIN_GROUP_DEVICES and len(ids) < len(batches)}
    group_rows = {g: _sum([rows[d] for d in ids]) for g, ids in judged.items()}
    group_shifts = {g: _vs_reference(r, reference) for g, r in group_rows.items()}
    vs_ref = _decide_many(group_shifts)
    vs_rest = _decide_many({g: _two_sample(list(r), list(total - r)) for g, r in group_rows.items()})
    hit_groups: dict[str, list[str]] = {}
    for g, ids in judged.items():
        moved = {s.feature for s in vs_rest[g]}
        common = shared([s for s in vs_ref[g] if s.feature in moved], ids)
        if common:
            hit_groups[g] = ids
        findings.append(Finding("group", g, "data", bool(common), _ranked(common),
                                figures={"devices": len(ids), "drifting": sum(bool(drifted[d]) for d in ids),
                                         "shift": _signed(group_shifts[g])},
                                detail=_explain(_ranked(common))))  # fmt: skip

    # A device is compared with its peers: the rest of its site when the site drifted, else the devices that look
    # like the reference on their own (a drifted device among the peers would make every other device look moved
    # where it moved: 1 occluded device of 12 did). When too few do (the fleet moved), all the others.
    group_of = {d: g for g, ids in hit_groups.items() for d in ids}
    normal = [d for d in rows if d not in group_of and not drifted[d]]
    comparisons = {}
    for d, r in rows.items():
        peers = hit_groups.get(group_of.get(d, ""))
        if peers is None:
            peers = [p for p in normal if p != d]
            if len(peers) < 2:
                peers = [p for p in rows if p != d]
            pool = _sum([rows[p] for p in peers]) + r
        else:
            pool = _sum([rows[p] for p in peers])
        rest = pool - r
        comparisons[d] = _two_sample(list(r), list(rest)) if rest.sum() > 0 else []
    vs_peers = _decide_many(comparisons)
    for d in rows:
        moved = {s.feature for s in vs_peers[d]}
        own = [s for s in on_own[d] if s.feature in moved]
        findings.append(Finding("device", d, "data", bool(own), _ranked(own),
                                figures={"rows": int(rows[d][0].sum()) if len(rows[d]) else 0,
                                         "shift": _signed(own_shifts[d])},
                                detail=_explain(_ranked(own))))  # fmt: skip
    return findings


def _group_key(batch: DeviceBatch, group_tag: str | None) -> str | None:
    return f"{group_tag}={batch.tags[group_tag]}" if group_tag and group_tag in batch.tags else None


def _peers(
    batches: Sequence[DeviceBatch], group_tag: str | None, explained: Collection[str]
) -> dict[str, list[DeviceBatch]]:
    """Whom each device is compared with: the rest of its group when ``explained`` holds the group (it drifted as a
    whole), else the devices of no such group (at least two of them; else every other device)."""
    plain = [b for b in batches if _group_key(b, group_tag) not in explained]
    peers = {}
    for b in batches:
        key = _group_key(b, group_tag)
        if key in explained:
            pool = [p for p in batches if p is not b and _group_key(p, group_tag) == key]
        else:
            pool = [p for p in plain if p is not b]
        peers[b.device_id] = pool if len(pool) >= 2 else [p for p in batches if p is not b]
    return peers


def assess_predictions(
    batches: Sequence[DeviceBatch], group_tag: str | None = None, explained: Collection[str] = ()
) -> list[Finding]:
    """``prediction`` findings per device: its predicted classes and top-1 confidence against its peers
    (:func:`_peers`: a device of a site whose data drifted is compared with its site; BH across devices and the two
    histograms)."""
    if len(batches) < 2:
        return []
    classes = {b.device_id: np.asarray(b.window["classes"], dtype=np.int64) for b in batches}
    confidence = {b.device_id: np.asarray(b.window["confidence"], dtype=np.int64) for b in batches}
    peers = _peers(batches, group_tag, explained)
    families = {}
    rests = {}
    for d in classes:
        rest_c = _sum([classes[p.device_id] for p in peers[d]])
        rest_k = _sum([confidence[p.device_id] for p in peers[d]])
        rests[d] = rest_c
        families[d] = _two_sample([classes[d], confidence[d]], [rest_c, rest_k])
    decided = _decide_many(families)
    findings = []
    for d, moved in decided.items():
        others = rests[d]
        share, rest = classes[d] / max(classes[d].sum(), 1), others / max(others.sum(), 1)
        order = np.argsort(-np.abs(share - rest))[:TOP]
        top = tuple((int(c), float(share[c]), float(rest[c])) for c in order) if moved else ()
        what = ["predicted classes" if s.feature == 0 else "confidence" for s in moved]
        detail = (f"{' and '.join(what)} moved: " + ", ".join(f"class {c} {a:.0%} vs {b:.0%}" for c, a, b in top[:3])
                  if moved else "")  # fmt: skip
        findings.append(Finding("device", d, "prediction", bool(moved), classes=top, detail=detail))
    return findings


def _accuracies(members: Sequence[DeviceBatch], reference: Reference) -> dict[str, tuple[float, float]]:
    """The members' accuracy, ``(value, standard error)``: ``estimated`` from their confidence histograms (with the
    card's calibration) and ``measured`` from their feedback, each when it has its minimum sample."""
    found: dict[str, tuple[float, float]] = {}
    confidence = _sum([np.asarray(b.window["confidence"], dtype=np.int64) for b in members]).tolist()
    if reference.calibration is not None and sum(confidence) >= stats.MIN_SAMPLES:
        estimate = estimated_accuracy(confidence, reference.calibration)
        if estimate is not None:
            found["estimated"] = estimate
    labelled = [b.window["feedback"] for b in members if b.window.get("feedback")]
    if labelled:
        measured = measured_accuracy(_sum([np.asarray(f, dtype=np.int64) for f in labelled]).tolist())
        if measured is not None and measured[1] >= stats.MIN_SAMPLES:
            found["measured"] = (measured[0], max((measured[0] * (1 - measured[0]) / measured[1]) ** 0.5, 1e-9))
    return found


def assess_segments(batches: Sequence[DeviceBatch], reference: Reference, group_tag: str | None) -> list[Finding]:
    """Each group's (segment's) accuracy, measured and estimated, against the rest of the fleet's: a segment far
    below the rest is reported (``accuracy`` of scope ``group``, ``figures["segment"]``), the seed of bias
    monitoring. Significantly (one-sided z on the difference, both sides' errors) and materially (3 points)."""
    if not group_tag:
        return []
    groups: dict[str, list[DeviceBatch]] = {}
    for b in batches:
        if group_tag in b.tags:
            groups.setdefault(f"{group_tag}={b.tags[group_tag]}", []).append(b)
    findings = []
    for key, members in groups.items():
        rest = [b for b in batches if b not in members]
        if not rest:
            continue
        mine, theirs = _accuracies(members, reference), _accuracies(rest, reference)
        below = []
        for name in ("measured", "estimated"):
            if name in mine and name in theirs:
                (value, se), (other, other_se) = mine[name], theirs[name]
                if accuracy_drop((value, (se**2 + other_se**2) ** 0.5), other):
                    below.append(f"{name} accuracy {value:.1%} vs {other:.1%} on the rest of the fleet")
        figures = {"segment": True, **{f"{k}": v[0] for k, v in mine.items()},
                   **{f"rest_{k}": v[0] for k, v in theirs.items()}}  # fmt: skip
        findings.append(Finding("group", key, "accuracy", bool(below), figures=figures, detail="; ".join(below)))
    return findings


def assess_accuracy(batches: Sequence[DeviceBatch], reference: Reference, group_tag: str | None) -> list[Finding]:
    """``accuracy`` findings per scope: the label-free estimate (and the measured accuracy where feedback gives
    enough labelled rows) significantly and materially below the card's held-out accuracy; for a group, also below
    the rest of the fleet (:func:`assess_segments`)."""
    if reference.accuracy is None or not batches:
        return []
    card = reference.accuracy

    def below_card(found: Mapping[str, tuple[float, float]]) -> list[str]:
        return [f"{name} accuracy {found[name][0]:.1%} vs {card:.1%} on the release's held-out data"
                for name in found if accuracy_drop(found[name], card)]  # fmt: skip

    # One alarm per scope, as for data: a site far below the rest is the site's (a segment); the fleet below the
    # card is the fleet's unless a segment explains it; a device below the card is its own only if it is also below
    # its peers (a fleet-wide or site-wide drop leaves it level with them).
    segments = assess_segments(batches, reference, group_tag)
    explained = {f.key for f in segments if f.hit}
    fleet_found = _accuracies(batches, reference)
    fleet_low = below_card(fleet_found) if not explained else []
    findings = [Finding("fleet", "fleet", "accuracy", bool(fleet_low),
                        figures={"reference": card, **{k: v[0] for k, v in fleet_found.items()}},
                        detail="; ".join(fleet_low))]  # fmt: skip
    findings += [replace(f, detail=f"segment: {f.detail}" if f.hit else "") for f in segments]
    peers = _peers(batches, group_tag, explained)
    for b in batches:
        found = _accuracies([b], reference)
        low = below_card(found)
        if low:
            theirs = _accuracies(peers[b.device_id], reference)
            below_peers = [name for name in found if name in theirs and accuracy_drop(
                (found[name][0], (found[name][1] ** 2 + theirs[name][1] ** 2) ** 0.5), theirs[name][0])]  # fmt: skip
            low = low if below_peers else []
        findings.append(Finding("device", b.device_id, "accuracy", bool(low),
                                figures={"reference": card, **{k: v[0] for k, v in found.items()}},
                                detail="; ".join(low)))  # fmt: skip
    return findings


def assess(batches: Sequence[DeviceBatch], reference: Reference, *, group_tag: str | None = "site") -> list[Finding]:
    """Every stateless finding of one round: data, prediction and accuracy."""
    data = assess_data(batches, reference, group_tag)
    explained = {f.key for f in data if f.scope == "group" and f.hit}
    return [
        *data,
        *assess_predictions(batches, group_tag, explained),
        *assess_accuracy(batches, reference, group_tag),
    ]


@dataclass(frozen=True)
class Track:
    """One (scope, key, kind)'s state across rounds: its last verdicts, state, since when, and what moved last."""

    scope: str
    key: str
    kind: str
    history: tuple[bool, ...] = ()
    state: str = "ok"
    since: float | None = None
    features: tuple[stats.FeatureShift, ...] = ()
    classes: tuple[tuple[int, float, float], ...] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""


def advance(
    tracks: Mapping[tuple[str, str, str], Track],
    findings: Sequence[Finding],
    at: float,
    persistence: stats.Persistence = PERSISTENCE,
) -> tuple[dict[tuple[str, str, str], Track], list[Track]]:
    """The tracks after this round's findings (found at ``at``, the fleet's clock), and those whose state changed
    (an alarm raised, confirmed or cleared: what the detector stores as events and hands to hooks)."""
    updated = dict(tracks)
    changed: list[Track] = []
    for f in findings:
        key = (f.scope, f.key, f.kind)
        track = tracks.get(key, Track(f.scope, f.key, f.kind))
        history, persistent = persistence.update(track.history, f.hit)
        if persistent:
            state = "drift"
        elif any(history):
            state = "warning" if track.state != "drift" else "drift"
        else:
            state = "ok"
        since = track.since if state != "ok" and track.since is not None else (at if state != "ok" else None)
        new = replace(track, history=history, state=state, since=since)
        if f.hit:
            new = replace(new, features=f.features, classes=f.classes, figures=dict(f.figures), detail=f.detail)
        updated[key] = new
        if new.state != track.state:
            changed.append(new)
    return updated, changed


def concept(ddm: Mapping[str, Any] | None, window: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A device's DDM after this round's feedback (its persisted state in, out) and its verdict: ``ok``,
    ``warning`` or ``drift``."""
    detector = stats.Ddm.from_dict(ddm) if ddm else stats.Ddm()
    feedback = window.get("feedback")
    if not feedback:
        return detector.to_dict(), "ok"
    matrix = np.asarray(feedback, dtype=np.int64)
    n = int(matrix.sum())
    verdict = detector.update(n - int(np.trace(matrix)), n)
    return detector.to_dict(), verdict
