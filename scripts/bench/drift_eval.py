"""Evaluate the drift engine against the fixed PSI > 0.2 baseline on simulated fleet rounds of real model outputs.

This is the issue's evaluation in its **"windows fed straight to the engine"** variant: no agents, broker or store.
Each round, every device (50 by default, tagged ``site=site-{i % 3}``) draws ``--rows`` held-out digits (the good
example's test split) with its own seeded generator, passes them through the simulator's drift functions
(``firmware_sim.drift.DriftingFrames``, one per device, frame by frame, exactly as ``firmware-sim`` applies them),
runs the REAL quantized model on them (``agent.runtime.load_model(int8.onnx)``), and builds the window a device
would send: per-feature histograms over the card's ``drift.edges`` (``feature_histogram``, padded to the wire
layout), predicted classes, top-1 confidence bins (``confidence_bins``, as the agent bins them). The windows go to
``engine.assess`` + ``engine.advance`` (persistence 2 of 3). No feedback is sent (label-free), except in the
``concept`` scenario, where every row's true label comes back and ``engine.concept`` (DDM) is fed too.

The baseline judges the same device-windows: a device-window is flagged when any feature's PSI against the card's
reference exceeds 0.2 (``stats.psi_fixed_threshold``), with no persistence.

Per scenario: detection delay (windows from the onset, counting the onset window: 2 is the earliest a 2-of-3 rule
can give), false alarms per 1,000 clean device-windows, precision and recall of flagged device-windows after the
onset, the alarms raised (scope, key, kind), and the estimated (label-free) and measured (true labels) accuracy.
A device-window is *flagged* by the engine when a track in state ``drift`` covers it: its own device track, its
site's group track or the fleet track (a fleet-wide shift is meant to be one fleet alarm, not 50 device alarms).

    python scripts/bench/drift_eval.py --seed S [--devices 50] [--rows 500] [--models DIR] [--json]

Without ``--models`` the good example is built into a temporary folder first (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchinfo
import numpy as np

from firmware_sim.drift import Drift, DriftingFrames
from fleet.drift import engine, stats
from fleet.drift.accuracy import estimated_accuracy
from fleet.drift.engine import DeviceBatch, Reference
from fleet.examples.modelgen import confidence_bins, digits_split, feature_histogram

SITES = 3
ONSET = 5
#: Which devices a scenario drifts: all, one (d07), or one site (site-1).
ALL, ONE, SITE = "all", "one", "site"


@dataclass(frozen=True)
class Scenario:
    name: str
    drifts: tuple[Drift, ...] = ()
    who: str = ALL
    rounds: int = 10
    rows: int | None = None  # None: --rows
    feedback: bool = False
    #: A change the simulator has no kind for, applied to a drifted device's rows (after the simulator's drifts).
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    expect: str = "fleet"  # the scope the alarm should be at: fleet, group, device, none
    note: str = ""


def _dead_pixels(x: np.ndarray) -> np.ndarray:
    x[:, DEAD] = 0.0
    return x


#: The four centre pixels, which ``stuck pixels`` holds at 0 (dead): the simulator's ``stuck`` repeats whole frames.
DEAD = [27, 28, 35, 36]


def scenarios(clean_rounds: int, drift_rounds: int) -> list[Scenario]:
    d = drift_rounds
    return [
        Scenario("clean", rounds=clean_rounds, expect="none"),
        Scenario("clean, 50 rows", rounds=clean_rounds, rows=50, expect="none"),
        Scenario(
            "clean, feedback",
            rounds=clean_rounds,
            feedback=True,
            expect="none",
            note="every row's label comes back: DDM and measured accuracy judged too",
        ),
        Scenario("brightness 0.2", (Drift("brightness", 0.2),), rounds=d),
        Scenario("noise 0.2", (Drift("noise", 0.2),), rounds=d),
        Scenario("contrast 0.2", (Drift("contrast", 0.2),), rounds=d, note="x1.8 around mid-grey"),
        Scenario("occlusion 0.5", (Drift("occlusion", 0.5),), rounds=d, note="top-left 4x4: a quarter of the image"),
        Scenario("occlusion 0.25", (Drift("occlusion", 0.25),), rounds=d, note="top-left 2x2 (the sim's 0.25)"),
        Scenario("stuck 0.5", (Drift("stuck", 0.5),), rounds=d, note="half the frames repeat the one before"),
        Scenario("stuck pixels", rounds=d, transform=_dead_pixels, note=f"pixels {DEAD} read 0 (replica)"),
        Scenario("prior 0.3", (Drift("prior", 0.3),), rounds=d, note="30 % of frames replaced by a class-0 frame"),
        Scenario("concept 0.3", (Drift("concept", 0.3),), rounds=d, feedback=True, note="labels only; feedback on"),
        Scenario("one device occluded 0.5", (Drift("occlusion", 0.5),), who=ONE, rounds=d, expect="device"),
        Scenario("one site brightness 0.2", (Drift("brightness", 0.2),), who=SITE, rounds=d, expect="group"),
        Scenario(
            "brightness 0.2, 50 rows",
            (Drift("brightness", 0.2),),
            rounds=d,
            rows=50,
            note="each device below MIN_SAMPLES; the fleet's merged rows are not",
        ),
        Scenario(
            "one device occluded 0.5, 50 rows", (Drift("occlusion", 0.5),), who=ONE, rounds=d, rows=50, expect="device"
        ),
    ]


@dataclass
class Fleet:
    """What every scenario shares: the card's reference and edges, the model, the held-out rows."""

    card: dict[str, Any]
    reference: Reference
    predict: Callable[[np.ndarray], np.ndarray]
    x: np.ndarray
    y: np.ndarray
    edges: list[list[float]] = field(init=False)
    width: int = field(init=False)

    def __post_init__(self) -> None:
        self.edges = self.card["drift"]["edges"]
        self.width = max(len(e) + 2 for e in self.edges)

    def features(self, rows: np.ndarray) -> list[list[int]]:
        out = []
        for j, e in enumerate(self.edges):
            h = feature_histogram(rows[:, j], e)
            out.append(np.concatenate([h[:-2], np.zeros(self.width - h.size, np.int64), h[-2:]]).tolist())
        return out


def drifted(who: str, i: int, devices: int) -> bool:
    return who == ALL or (who == ONE and i == 7 % devices) or (who == SITE and i % SITES == 1)


def run_scenario(fleet: Fleet, sc: Scenario, devices: int, rows_default: int, seed: int) -> dict[str, Any]:
    rows_n = sc.rows or rows_default
    rngs = [np.random.default_rng([seed, i]) for i in range(devices)]
    sims = [DriftingFrames(sc.drifts, fleet.x, fleet.y) for _ in range(devices)]
    ids = [f"d{i:02d}" for i in range(devices)]
    tracks: dict[tuple[str, str, str], engine.Track] = {}
    ddm: dict[str, dict[str, Any] | None] = {d: None for d in ids}
    changes = bool(sc.drifts) or sc.transform is not None
    onset = ONSET if changes else sc.rounds
    per_round = []
    engine_s = 0.0
    for r in range(sc.rounds):
        on = r >= onset
        batches, truth, psi_flag, meas, est = [], [], [], [], []
        all_rows, all_labels, slices = [], [], []
        for i in range(devices):
            idx = rngs[i].integers(0, len(fleet.x), rows_n)
            x, y = fleet.x[idx].copy(), fleet.y[idx].copy()
            is_drifted = on and drifted(sc.who, i, devices) and changes
            if is_drifted:
                for k in range(rows_n if sc.drifts else 0):
                    frame, label = sims[i].apply(x[k : k + 1], int(y[k]), 1.0, rngs[i])
                    x[k], y[k] = frame[0], label
                if sc.transform is not None:
                    x = sc.transform(x)
            truth.append(is_drifted)
            slices.append(slice(sum(len(a) for a in all_rows), sum(len(a) for a in all_rows) + rows_n))
            all_rows.append(x)
            all_labels.append(y)
        probs = fleet.predict(np.concatenate(all_rows).astype(np.float32))
        pred_all, conf_all = probs.argmax(axis=1), confidence_bins(probs)
        for i, d in enumerate(ids):
            x, y = all_rows[i], all_labels[i]
            pred, conf = pred_all[slices[i]], conf_all[slices[i]]
            window: dict[str, Any] = {
                "count": rows_n,
                "features": fleet.features(x),
                "classes": np.bincount(pred, minlength=10).tolist(),
                "confidence": np.bincount(conf, minlength=10).tolist(),
            }
            if sc.feedback:
                fb = np.zeros((10, 10), np.int64)
                np.add.at(fb, (y, pred), 1)
                window["feedback"] = fb.tolist()
            batches.append(DeviceBatch(d, window, {"site": f"site-{i % SITES}"}, float(r), float(r)))
            psi_flag.append(bool(stats.psi_fixed_threshold(window["features"], fleet.reference.rows)))
            meas.append(float((pred == y).mean()))
            e = estimated_accuracy(window["confidence"], fleet.reference.calibration)
            est.append(e[0] if e else float("nan"))
        t0 = time.perf_counter()
        findings = engine.assess(batches, fleet.reference)
        tracks, _ = engine.advance(tracks, findings, at=float(r))
        concept_states = []
        if sc.feedback:
            for b in batches:
                ddm[b.device_id], verdict = engine.concept(ddm[b.device_id], b.window)
                concept_states.append(verdict)
        engine_s += time.perf_counter() - t0
        alarms = sorted((t.scope, t.key, t.kind) for t in tracks.values() if t.state == "drift")
        fleet_acc = next((f.figures for f in findings if f.kind == "accuracy" and f.scope == "fleet"), {})
        covered, covered_data = [], []
        for i, d in enumerate(ids):
            site = f"site=site-{i % SITES}"
            mine = [kind for s, k, kind in alarms if (s == "device" and k == d) or (s == "group" and k == site)
                    or s == "fleet"]  # fmt: skip
            covered.append(bool(mine))
            covered_data.append("data" in mine)
        per_round.append({
            "round": r, "on": on, "truth": truth, "ours": covered, "ours_data": covered_data, "psi": psi_flag,
            "alarms": alarms, "measured": meas, "estimated": est, "fleet_estimated": fleet_acc.get("estimated"),
            "fleet_measured": float(np.mean(meas)), "concept": concept_states,
            "warnings": sorted((t.scope, t.key, t.kind) for t in tracks.values() if t.state == "warning"),
        })  # fmt: skip
    return summarise(sc, per_round, onset, rows_n, devices, engine_s)


def _rate(flags: list[bool], truth: list[bool]) -> dict[str, Any]:
    f, t = np.asarray(flags), np.asarray(truth)
    clean = ~t
    tp, fp, fn = int((f & t).sum()), int((f & clean).sum()), int((~f & t).sum())
    return {
        "false_alarms": fp,
        "clean_windows": int(clean.sum()),
        "false_per_1000": round(1000 * fp / clean.sum(), 2) if clean.sum() else None,
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
    }


def summarise(sc: Scenario, rounds: list[dict[str, Any]], onset: int, rows: int, devices: int, s: float) -> dict:
    truth = [t for r in rounds for t in r["truth"]]
    out: dict[str, Any] = {"scenario": sc.name, "note": sc.note, "rows": rows, "devices": devices,
                           "rounds": len(rounds), "onset": onset if onset < len(rounds) else None, "expect": sc.expect,
                           "engine_s": round(s, 2)}  # fmt: skip
    for who in ("ours", "ours_data", "psi"):
        flags = [f for r in rounds for f in r[who]]
        res = _rate(flags, truth)
        delay = None
        for r in rounds[onset:]:
            if any(f and t for f, t in zip(r[who], r["truth"], strict=True)):
                delay = r["round"] - onset + 1
                break
        res["delay"] = delay
        # after the onset, the drifted devices' windows: how many of them the method flagged
        out[who] = res
    alarms = sorted({a for r in rounds for a in r["alarms"]})
    out["alarms"] = [list(a) for a in alarms]
    out["alarms_before_onset"] = sorted({a for r in rounds[:onset] for a in r["alarms"]})
    out["warnings_ever"] = len({a for r in rounds for a in r["warnings"]})
    want = {"none": set(), "fleet": {("fleet", "fleet")}, "group": {("group", "site=site-1")},
            "device": {("device", "d07")}}[sc.expect]  # fmt: skip
    out["scope_ok_data"] = {(a[0], a[1]) for a in alarms if a[2] == "data"} == want
    out["scope_ok_all_kinds"] = {(a[0], a[1]) for a in alarms} == want
    out["alarm_count"] = {k: {s: sum(a[0] == s and a[2] == k for a in alarms) for s in engine.SCOPES}
                          for k in engine.KINDS if any(a[2] == k for a in alarms)}  # fmt: skip
    before, after = rounds[:onset], rounds[onset:]

    def acc(rs: list[dict[str, Any]], key: str, drifted_only: bool | None) -> float | None:
        vals = [v for r in rs for v, t in zip(r[key], r["truth"], strict=True)
                if drifted_only is None or t == drifted_only]  # fmt: skip
        return round(float(np.nanmean(vals)), 4) if vals else None

    errs = [abs(e - m) for r in rounds for e, m, t in zip(r["estimated"], r["measured"], r["truth"], strict=True)
            if not t]  # fmt: skip
    out["accuracy"] = {
        "clean_measured": acc(rounds, "measured", False),
        "clean_estimated": acc(rounds, "estimated", False),
        "clean_abs_error_mean": round(float(np.nanmean(errs)), 4) if errs else None,
        "clean_abs_error_max": round(float(np.nanmax(errs)), 4) if errs else None,
        "drifted_measured": acc(after, "measured", True),
        "drifted_estimated": acc(after, "estimated", True),
        "fleet_estimated_before": _mean([r["fleet_estimated"] for r in before]),
        "fleet_estimated_after": _mean([r["fleet_estimated"] for r in after]),
        "fleet_measured_before": _mean([r["fleet_measured"] for r in before]),
        "fleet_measured_after": _mean([r["fleet_measured"] for r in after]),
    }
    if any(r["concept"] for r in rounds):
        false_ddm = sum(v == "drift" for r in before for v in r["concept"])
        first = next((r["round"] - onset + 1 for r in after if "drift" in r["concept"]), None)
        out["concept"] = {
            "ddm_delay": first,
            "ddm_drift_devices_after": sum(v == "drift" for r in after for v in r["concept"]),
            "ddm_drift_devices_before": sum(v == "drift" for r in before for v in r["concept"]),
            "ddm_false_per_1000": round(1000 * false_ddm / max(1, sum(len(r["concept"]) for r in before)), 2),
        }
    return out


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 4) if v else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def provenance() -> dict[str, Any]:
    """The commit, and the hashes of the files whose behaviour is measured (others edit this tree concurrently)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    files = ["fleet/drift/engine.py", "fleet/drift/stats.py", "fleet/drift/accuracy.py", "firmware-sim/drift.py"]
    dirty = subprocess.run([*git, "status", "--porcelain", "--", *files], capture_output=True, text=True).stdout.split()
    return {
        "commit": commit,
        "dirty": [f for f in files if f in dirty],
        "sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--clean-rounds", type=int, default=40)
    p.add_argument("--drift-rounds", type=int, default=10, help=f"rounds per drift scenario (onset at {ONSET})")
    p.add_argument("--only", default="", help="comma-separated scenario names (prefixes) to run")
    p.add_argument("--models", type=Path, help="a folder with the good example (card.json, int8.onnx)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    info = benchinfo.machine()
    info["code"] = provenance()
    started = time.perf_counter()
    from agent.runtime import load_model

    with tempfile.TemporaryDirectory(prefix="edgefleet-drift-eval-") as tmp:
        models = args.models
        if models is None:
            from fleet.examples.modelgen import build_example

            models = Path(tmp) / "good"
            build_example(models, "good", seed=0)
        card = json.loads((models / "card.json").read_text())
        _, x_test, _, y_test = digits_split(card["provenance"]["seed"])
        results = []
        with load_model(models / "int8.onnx", threads=1) as model:
            fleet = Fleet(card, Reference.from_card(card, "int8.onnx"), model.predict, x_test, y_test)
            wanted = [w.strip() for w in args.only.split(",") if w.strip()]
            for sc in scenarios(args.clean_rounds, args.drift_rounds):
                if wanted and not any(sc.name.startswith(w) for w in wanted):
                    continue
                t0 = time.perf_counter()
                res = run_scenario(fleet, sc, args.devices, args.rows, args.seed)
                res["wall_s"] = round(time.perf_counter() - t0, 2)
                results.append(res)
                if not args.json:
                    print(_line(res), flush=True)
    total = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps({"machine": info, "seed": args.seed, "devices": args.devices, "rows": args.rows,
                          "card_accuracy": card["files"]["int8.onnx"]["accuracy"], "wall_s": total,
                          "scenarios": results}, indent=1))  # fmt: skip
    else:
        print(f"machine: {info}; card accuracy {card['files']['int8.onnx']['accuracy']}; total {total} s")
    return 0


def _line(r: dict[str, Any]) -> str:
    o, b, a = r["ours"], r["psi"], r["accuracy"]
    parts = [
        f"{r['scenario']} ({r['devices']}x{r['rounds']} windows of {r['rows']} rows):",
        f"ours delay {_fmt(o['delay'])} fa/1000 {_fmt(o['false_per_1000'])} P {_fmt(o['precision'])} "
        f"R {_fmt(o['recall'])} |",
        f"PSI delay {_fmt(b['delay'])} fa/1000 {_fmt(b['false_per_1000'])} P {_fmt(b['precision'])} "
        f"R {_fmt(b['recall'])} |",
        f"ours(data only) delay {_fmt(r['ours_data']['delay'])} fa/1000 {_fmt(r['ours_data']['false_per_1000'])} "
        f"R {_fmt(r['ours_data']['recall'])} |",
        f"alarms {r['alarm_count']} scope ok data/all {r['scope_ok_data']}/{r['scope_ok_all_kinds']} |",
        f"acc clean meas/est {_fmt(a['clean_measured'])}/{_fmt(a['clean_estimated'])} "
        f"(|err| mean {_fmt(a['clean_abs_error_mean'])} max {_fmt(a['clean_abs_error_max'])}) "
        f"drifted meas/est {_fmt(a['drifted_measured'])}/{_fmt(a['drifted_estimated'])} |",
        f"{r['wall_s']} s",
    ]
    if "concept" in r:
        parts.insert(-1, f"DDM {r['concept']} |")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
