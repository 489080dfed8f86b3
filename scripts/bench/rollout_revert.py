"""Rollout revert: N enrolled simulated devices (`firmware-sim run --enroll`) on digits:1.0.0, then a campaign of a bad
release that the fleet must stop in its first wave and roll back. Measured: the time from the first failing report
to every touched device reverted (target: within two telemetry windows plus the reinstall), and the campaign
controller's CPU share while the campaign runs.

Two bad releases, one campaign each, on the same fleet, one after the other:

* ``broken`` (digits:1.4.0): fails its smoke test on the device, so the failing report is an ``install_failed``
  event and the failed-share gate stops the campaign (3 failed of 3 finished);
* ``slow`` (digits:1.3.0): passes the smoke test and probation, and is caught by the fleet's latency KPI gate
  (``latency_p95 <= 1.5x``) from the telemetry windows the upgraded devices send: the failing report is the first
  window on the release.

The fleet service runs in this process (:class:`fleet.server.FleetServer`, embedded mosquitto, telemetry ingested
in this process: ``ingest_workers=0``, one controller round a second) so that the controller's own CPU
(``server.controller.cpu_s``, CPU seconds of its rounds on its thread) can be read. Everything else is as an operator
does it: `fleet init`, `fleet release publish`, `firmware-sim run --enroll` as a process, `fleet assign`,
`fleet rollout create --waves 10,50,100 --soak 30s --json`, `fleet rollout status ID --json`. Times are the fleet's
(``received_at`` of events and windows, decision and notify times), read from its SQLite store read-only.

    python scripts/bench/rollout_revert.py [--devices 200] [--shards 1] [--window 5] [--rate 1] [--seed 7]
                                           [--variants broken,slow] [--kpi EXPR ...] [--models DIR] [--timeout 600]
                                           [--json]

``--models DIR``: a folder with ``good``, ``slow`` and ``broken`` built by ``fleet.examples.modelgen.build_example``
(seed 0); without it they are built first, before anything is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchinfo

from fleet.server import FleetServer, ServerSettings

BIN = Path(sys.executable).parent
ID_PREFIX = "rr"
GOOD = "digits:1.0.0"
BAD = {"broken": "digits:1.4.0", "slow": "digits:1.3.0"}
ENDS = ("succeeded", "rolled_back", "aborted")


def fleet_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN / "fleet"), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"fleet {' '.join(map(str, args[:2]))} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, say: Callable[[str], None],
               every: float = 0.5) -> Any:  # fmt: skip
    deadline, said = time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if time.monotonic() - said >= 15:
            say(f"  ... waiting for {what}")
            said = time.monotonic()
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def serving(db: Path, release: str) -> int:
    return query(db, "SELECT count(*) FROM devices WHERE device_id LIKE ? AND json_extract(models, '$.digits.release')"
                     " = ?", f"{ID_PREFIX}-%", release)[0][0]  # fmt: skip


def campaign_figures(db: Path, campaign: str, variant: str, window: float) -> dict[str, Any]:
    """The campaign's times, from the store (see the module docstring)."""
    release = BAD[variant]
    created_at, ended_at, state, reason, spec, gates = query(
        db, "SELECT created_at, updated_at, state, reason, spec, gates FROM campaigns WHERE id = ?", campaign
    )[0]
    execs = query(db, "SELECT device_id, wave, state, from_release, rollback_seq, notified_at, reason "
                      "FROM executions WHERE campaign_id = ?", campaign)  # fmt: skip
    wave1 = sum(1 for e in execs if e[1] == 0)
    touched = [e for e in execs if e[2] != "queued"]
    first_event = query(db, "SELECT min(received_at) FROM events WHERE type IN ('install_failed', 'rolled_back') "
                            "AND json_extract(detail, '$.release') = ?", release)[0][0]  # fmt: skip
    first_window = query(db, "SELECT min(received_at) FROM windows WHERE release = ? AND device_id LIKE ?",
                         release, f"{ID_PREFIX}-%")[0][0]  # fmt: skip
    fails = query(db, "SELECT ts, gate, action, figures FROM rollout_decisions WHERE campaign_id = ? "
                      "AND verdict = 'fail' ORDER BY ts", campaign)  # fmt: skip
    decided = fails[0][0] if fails else None
    # The failing report: the first install_failed / rolled_back event of the release, else (a KPI gate) the first
    # window on it; whichever the fleet received first when both exist.
    first_fail = min(t for t in (first_event, first_window) if t is not None) if (first_event or first_window) else None
    if variant == "slow" and first_window is not None:
        first_fail = first_window  # the KPI case: the first telemetry on the release is its first failing report
    # When the windows on the release reached the KPI gates' sample (kpi_min_count inferences), and how many windows
    # the fleet had received on it by then: telemetry time vs the controller's time to decide.
    need = json.loads(spec).get("kpi_min_count", 200)
    sample_at, total, windows_by_decision, windows_to_sample = None, 0, 0, 0
    for received_at, count in query(db, "SELECT received_at, count FROM windows WHERE release = ? AND device_id LIKE ? "
                                        "ORDER BY received_at", release, f"{ID_PREFIX}-%"):  # fmt: skip
        if decided is not None and received_at <= decided:
            windows_by_decision += 1
        if sample_at is None:
            total += count
            windows_to_sample += 1
            if total >= need:
                sample_at = received_at
    reverts: dict[str, float] = {}
    reinstall: list[float] = []
    missing: list[str] = []
    for device_id, _, st, from_release, rollback_seq, notified_at, _ in touched:
        if rollback_seq is None:
            missing.append(f"{device_id} ({st}, never sent back)")
            continue
        back = query(db, "SELECT min(received_at) FROM events WHERE device_id = ? AND type = 'install_committed' "
                         "AND json_extract(detail, '$.release') = ? AND json_extract(detail, '$.seq') >= ?",
                     device_id, from_release, rollback_seq)[0][0]  # fmt: skip
        if back is None:
            missing.append(f"{device_id} ({st}, no revert commit)")
            continue
        reverts[device_id] = back
        reinstall.append(back - notified_at)
    all_reverted = max(reverts.values()) if reverts and not missing else None
    reinstall_s = statistics.median(reinstall) if reinstall else None
    out: dict[str, Any] = {
        "variant": variant,
        "release": release,
        "campaign": campaign,
        "state": state,
        "reason": reason,
        "devices": len(execs),
        "wave1_devices": wave1,
        "touched": len(touched),
        "touched_states_at_end": {s: sum(1 for e in touched if e[2] == s) for s in sorted({e[2] for e in touched})},
        "kpis": json.loads(spec).get("kpis"),
        "gates_at_end": [{k: g.get(k) for k in ("gate", "verdict", "detail")} for g in json.loads(gates or "[]")],
        "first_gate_failed": [{"gate": g, "action": a, "detail": json.loads(f).get("detail")} for _, g, a, f in fails],
        "not_reverted": missing,
        "campaign_created_to_first_failing_report_s": _r(first_fail, created_at),
        "campaign_created_to_rolled_back_state_s": _r(ended_at, created_at) if state in ENDS else None,
        "first_install_failed_event_after_create_s": _r(first_event, created_at),
        "first_window_on_release_after_create_s": _r(first_window, created_at),
        "first_failing_report_to_decided_s": _r(decided, first_fail),
        "kpi_min_count": need,
        "windows_before_campaign_in_baseline": query(  # what the campaign's first round reads (BASELINE_LOOKBACK_S)
            db, "SELECT count(*) FROM windows WHERE received_at >= ? AND received_at < ?", created_at - 3600, created_at
        )[0][0],
        "first_window_to_kpi_sample_complete_s": _r(sample_at, first_window),
        "kpi_sample_complete_to_decided_s": _r(decided, sample_at),
        "windows_on_release_to_kpi_sample": windows_to_sample if sample_at else None,
        "windows_on_release_received_by_decision": windows_by_decision,
        "decided_to_all_reverted_s": _r(all_reverted, decided),
        "first_failing_report_to_all_reverted_s": _r(all_reverted, first_fail),
        "reinstall_median_s": round(reinstall_s, 2) if reinstall_s is not None else None,
        "reinstall_max_s": round(max(reinstall), 2) if reinstall else None,
        "window_s": window,
    }
    budget = 2 * window + reinstall_s if reinstall_s is not None else None
    total = out["first_failing_report_to_all_reverted_s"]
    out["target_s"] = round(budget, 2) if budget is not None else None
    out["ratio_total_to_target"] = round(total / budget, 3) if total is not None and budget else None
    return out


def _r(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def run_campaign(server: FleetServer, home: Path, db: Path, variant: str, args: argparse.Namespace,
                 say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    controller = server.controller
    assert controller is not None
    cpu0, rounds0, t0 = controller.cpu_s, controller.rounds, time.time()
    made = json.loads(fleet_cli("rollout", "create", "--release", BAD[variant], "--waves", "10,50,100", "--soak", "30s",
                                "--seed", str(args.seed), *(a for k in args.kpi for a in ("--kpi", k)),
                                "--home", home, "--json").stdout)  # fmt: skip
    campaign = made["id"]
    say(f"campaign {campaign}: {BAD[variant]} ({variant}) to {args.devices} devices ...")

    # CPU of each round: the controller adds a round's CPU to cpu_s, then counts it; polled ten times a round.
    per_round: list[float] = []
    seen_rounds, seen_cpu = controller.rounds, controller.cpu_s
    state, last_query, said = "", 0.0, time.monotonic()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rounds_now, cpu_now = controller.rounds, controller.cpu_s
        if rounds_now > seen_rounds:
            per_round.extend([(cpu_now - seen_cpu) / (rounds_now - seen_rounds)] * (rounds_now - seen_rounds))
            seen_rounds, seen_cpu = rounds_now, cpu_now
        if time.monotonic() - last_query >= 0.25:
            last_query = time.monotonic()
            state = query(db, "SELECT state FROM campaigns WHERE id = ?", campaign)[0][0]
            if state in ENDS:
                break
        if time.monotonic() - said >= 15:
            say(f"  ... campaign {campaign}: {state}")
            said = time.monotonic()
        time.sleep(controller.interval / 10)
    else:
        state = f"not ended after {args.timeout:.0f} s: {state}"
    t1 = time.time()
    cpu, rounds = controller.cpu_s - cpu0, controller.rounds - rounds0
    status = json.loads(fleet_cli("rollout", "status", campaign, "--home", home, "--json").stdout)
    (Path(args.workdir) / f"status-{variant}.json").write_text(json.dumps(status, indent=1))
    figures = campaign_figures(db, campaign, variant, args.window)
    figures.update(
        ended_as=state,
        campaign_wall_s=round(t1 - t0, 2),
        controller_cpu_s=round(cpu, 3),
        controller_rounds=rounds,
        controller_cpu_share=round(cpu / (t1 - t0), 4),
        controller_cpu_ms_per_round=round(1000 * cpu / rounds, 2) if rounds else None,
        controller_round_cpu_ms=[round(1000 * c, 1) for c in per_round],
    )
    rest = per_round[1:]
    figures["controller_round_cpu_ms_first_median_rest_max"] = [
        round(1000 * per_round[0], 1) if per_round else None,
        round(1000 * statistics.median(rest), 1) if rest else None,
        round(1000 * max(per_round), 1) if per_round else None,
    ]
    # Every touched device back on GOOD, as `fleet devices list` shows it.
    listed = json.loads(fleet_cli("devices", "list", "--home", home, "--json").stdout)
    figures["devices_listed_on_good"] = sum(1 for d in listed if d["releases"].get("digits") == GOOD)
    figures["devices_listed_on_bad"] = sum(1 for d in listed if d["releases"].get("digits") == BAD[variant])
    return figures


def run(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": benchinfo.machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    variants = [v for v in args.variants.split(",") if v]
    if args.models:
        models = args.models.resolve()
    else:
        from fleet.examples.modelgen import build_example

        models = workdir / "models"
        for v in ("good", *variants):
            say(f"building the {v} digits example ...")
            build_example(models / v, variant=v, seed=0)
    sim_models = workdir / "sim-models"  # firmware-sim looks for MODEL_DIR/good-SEED
    sim_models.mkdir()
    (sim_models / "good-0").symlink_to(models / "good")

    home = workdir / "home"
    db = home / "fleet.db"
    fleet_cli("init", "--home", home, "--json")
    sim: subprocess.Popen[str] | None = None
    settings = ServerSettings(home=home, ingest_workers=args.ingest_workers, log_level="WARNING", rollout_tick_s=1.0)
    with FleetServer(settings) as server:
        try:
            fleet_cli("release", "publish", models / "good" / "int8.onnx", "--name", "digits", "--version", "1.0.0",
                      "--home", home)  # fmt: skip
            for v in variants:
                version = BAD[v].split(":")[1]
                fleet_cli("release", "publish", models / v / "int8.onnx", "--name", "digits", "--version", version,
                          "--home", home)  # fmt: skip
            command = [
                str(BIN / "firmware-sim"), "run", "--enroll", f"--home={home}", f"--devices={args.devices}",
                f"--shards={args.shards}", "--duration=86400", f"--window={args.window}", f"--rate={args.rate}",
                f"--model-dir={sim_models}", f"--state-dir={workdir / 'devices'}", f"--id-prefix={ID_PREFIX}",
                "--json",
            ]  # fmt: skip
            result["sim_command"] = " ".join(command)
            say(f"starting {args.devices} enrolled devices in {args.shards} shard(s) ...")
            with (workdir / "sim.out").open("w") as out, (workdir / "sim.err").open("w") as err:
                sim = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                       env={**os.environ, "TMPDIR": str(workdir)})  # fmt: skip

            def online() -> bool:
                if sim is not None and sim.poll() is not None:
                    raise RuntimeError(f"firmware-sim exited {sim.returncode}: "
                                       f"{(workdir / 'sim.err').read_text()[-2000:]}")  # fmt: skip
                n = query(db, "SELECT coalesce(sum(online), 0) FROM devices WHERE device_id LIKE ?",
                          f"{ID_PREFIX}-%")[0][0]  # fmt: skip
                return n >= args.devices

            t = time.time()
            wait_until(online, 600, f"{args.devices} devices online", say)
            say(f"all {args.devices} online after {time.time() - t:.1f} s; fleet assign {GOOD} ...")
            ids = [f"{ID_PREFIX}-{i:04d}" for i in range(args.devices)]
            t = time.time()
            fleet_cli("assign", *ids, "--release", GOOD, "--home", home, "--timeout", "60", timeout=1800)
            wait_until(lambda: serving(db, GOOD) >= args.devices, 1200, f"every device committing {GOOD}", say)
            result["install_good_s"] = round(time.time() - t, 1)
            say(f"all on {GOOD} after {result['install_good_s']} s; {args.baseline:.0f} s of baseline telemetry ...")
            assert server.controller is not None
            cpu0, rounds0 = server.controller.cpu_s, server.controller.rounds
            time.sleep(args.baseline)
            idle_rounds = server.controller.rounds - rounds0
            result["controller_idle_ms_per_round"] = (
                round(1000 * (server.controller.cpu_s - cpu0) / idle_rounds, 2) if idle_rounds else None
            )
            result["load_at_campaigns"] = [round(x, 2) for x in os.getloadavg()]
            result["campaigns"] = []
            for v in variants:
                figures = run_campaign(server, home, db, v, args, say)
                result["campaigns"].append(figures)
                say(summary(figures))
                if v != variants[-1]:
                    # Between campaigns: every device back on GOOD, then a little telemetry on it again.
                    wait_until(lambda: serving(db, GOOD) >= args.devices, 600, f"every device back on {GOOD}", say)
                    time.sleep(args.baseline)
            result["load_after"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            if sim is not None and sim.poll() is None:
                say("ending the simulator (SIGTERM) ...")
                sim.send_signal(signal.SIGTERM)
                try:
                    sim.wait(180)
                except subprocess.TimeoutExpired:
                    sim.kill()
                    sim.wait()
    if sim is not None:
        text = (workdir / "sim.out").read_text()
        with contextlib.suppress(ValueError):
            report = json.loads(text[text.index("{") :])
            keys = ("windows_produced", "windows_acked", "windows_dropped")
            result["sim_totals"] = {k: report["totals"][k] for k in keys if k in report["totals"]}
        result["sim_exit"] = sim.returncode
    return result


def summary(f: dict[str, Any]) -> str:
    failed = f["first_gate_failed"]
    gate = f"{failed[0]['gate']}: {failed[0]['detail']}" if failed else "-"
    lines = [
        f"{f['variant']} ({f['release']}): campaign {f['campaign']} {f['ended_as']}; {f['devices']} devices, wave 1 = "
        f"{f['wave1_devices']}, touched {f['touched']} {f['touched_states_at_end']}",
        f"  gate: {gate}",
        f"  KPI gates {f['kpis']}; at the end: "
        + "; ".join(f"{g['gate']}: {g['verdict']} ({g['detail']})" for g in f["gates_at_end"][2:]),
        f"  campaign created -> first failing report       {f['campaign_created_to_first_failing_report_s']} s",
        f"  first failing report -> rollback decided       {f['first_failing_report_to_decided_s']} s",
        *(
            [
                f"  of which: first window -> {f['kpi_min_count']} inferences on the release received "
                f"{f['first_window_to_kpi_sample_complete_s']} s ({f['windows_on_release_to_kpi_sample']} windows), "
                f"-> decided {f['kpi_sample_complete_to_decided_s']} s"
            ]
            if f["variant"] == "slow"
            else []
        ),
        f"  rollback decided -> all touched reverted       {f['decided_to_all_reverted_s']} s",
        f"  total: first failing report -> all reverted    {f['first_failing_report_to_all_reverted_s']} s",
        f"  reinstall (rollback notify -> revert commit)   median {f['reinstall_median_s']} s, "
        f"max {f['reinstall_max_s']} s",
        f"  target 2 x window ({f['window_s']:g} s) + reinstall     {f['target_s']} s; "
        f"ratio total / target = {f['ratio_total_to_target']}",
        f"  controller: {f['controller_cpu_s']} CPU s over {f['campaign_wall_s']} s of campaign = "
        f"{100 * f['controller_cpu_share']:.2f} % of a core; {f['controller_rounds']} rounds, "
        f"{f['controller_cpu_ms_per_round']} ms CPU per round (first / median of the rest / max: "
        f"{f['controller_round_cpu_ms_first_median_rest_max']} ms; "
        f"the first round filed {f['windows_before_campaign_in_baseline']} baseline windows)",
    ]
    if f["not_reverted"] and f["state"] != "succeeded":  # a campaign that succeeded sends nobody back
        lines.append(f"  NOT reverted: {f['not_reverted'][:10]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--window", type=float, default=5.0, help="telemetry window of the simulated devices, s")
    parser.add_argument("--rate", type=float, default=1.0, help="inferences/s per device")
    parser.add_argument("--seed", type=int, default=7, help="seed of the campaigns' wave order")
    parser.add_argument("--variants", default="broken,slow", help="bad releases, one campaign each, in this order")
    parser.add_argument(
        "--kpi",
        action="append",
        default=[],
        help="a KPI gate for `fleet rollout create --kpi`; repeat for more [default: the fleet's]",
    )
    parser.add_argument("--ingest-workers", type=int, default=0, help="telemetry workers of the fleet service")
    parser.add_argument("--baseline", type=float, default=20.0, help="s of telemetry on 1.0.0 before each campaign")
    parser.add_argument("--timeout", type=float, default=600.0, help="s to wait for a campaign to end")
    parser.add_argument("--models", type=Path, help="folder with good/, slow/, broken/ (built if not given)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON at the end")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(BAD)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: use {', '.join(BAD)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # cleanup runs as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="rollout-revert-") as tmp:
        args.workdir = tmp
        result = run(args, Path(tmp), lambda s: print(s, file=sys.stderr, flush=True))
    print(f"machine: {result['machine']}; load at the campaigns {result.get('load_at_campaigns')}")
    print(f"simulator: {result['sim_command']}")
    print(
        f"all {args.devices} devices committed {GOOD} {result['install_good_s']} s after the assign; controller "
        f"with no campaign: {result['controller_idle_ms_per_round']} ms CPU per round"
    )
    for f in result["campaigns"]:
        print(summary(f))
    print(f"simulator exit {result.get('sim_exit')}, windows {result.get('sim_totals')}")
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
