"""Simulated fleet with installs: N enrolled devices (`firmware-sim run --enroll --shards K`) against `fleet serve`
and its mosquitto on this machine, then one release assigned to all of them and installed through each device's own
update path (director check, TUF, download, slots, smoke-test child, probation) until every one has committed it.

Everything runs as it would for an operator: `fleet init` and `fleet serve` on a fresh home, `fleet release publish`
of the `better` digits example as digits:1.1.0, the simulator enrolled with that home, `fleet assign` of every
device, then SIGTERM to the simulator (its report: windows produced vs acknowledged by the fleet). Measured from
/proc every second: CPU of the simulator's processes (its parent, shards and smoke-test children), of the broker and
of the rest of `fleet serve`; resident memory of the simulator's processes. From the fleet's database (read-only):
the connect storm (devices online over time), and each device's install states and commit time.

    python scripts/bench/sim_installs.py [--devices 1000] [--shards 2] [--window 10] [--rate 1] [--steady 30]
                                         [--install-timeout 1500] [--models DIR] [--json]

``--models DIR``: a folder with ``good`` and ``better`` built by ``fleet.examples.modelgen.build_example`` (seed 0);
without it both are built first, outside the measured processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchinfo
from sim_scale import cpu_between, percentile, proc_cpu_s, raise_fd_limit

RELEASE = "digits:1.1.0"
ID_PREFIX = "bench"
#: Steady-phase CPU is measured from this long after the last device came online.
SETTLE_S = 5.0
BIN = Path(sys.executable).parent


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError), open(f"/proc/{p}/task/{p}/children") as f:
            todo.extend(int(c) for c in f.read().split())
    return found


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of a live process, and of its children it has reaped (smoke tests); zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1]) / tick, (fields[2] + fields[3]) / tick


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def name(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
    return ""


class Sampler:
    """Every call: wall time, CPU seconds of the simulator's tree, the broker and the rest of `fleet serve`, and RSS."""

    def __init__(self, sim: int, serve: int, broker: int) -> None:
        self.sim, self.serve, self.broker = sim, serve, broker
        self.samples: list[dict[str, Any]] = []
        self.peak_rss: dict[str, Any] = {"total_mb": 0.0}

    def __call__(self) -> dict[str, Any]:
        sim = tree(self.sim)
        rss = {p: rss_mb(p) for p in sim}
        serve = [p for p in tree(self.serve) if p not in tree(self.broker)]
        sim_cpu = [cpu_s(p) for p in sim]
        sample = {
            "t": time.time(),
            "sim_cpu": sum(own + reaped for own, reaped in sim_cpu),
            "sim_reaped_cpu": sum(reaped for _, reaped in sim_cpu),
            "broker_cpu": proc_cpu_s(self.broker) or 0.0,
            "serve_cpu": sum(sum(cpu_s(p)) for p in serve),
            "sim_rss_mb": sum(rss.values()),
            "sim_processes": len(sim),
        }
        self.samples.append(sample)
        if sample["sim_rss_mb"] > self.peak_rss["total_mb"]:
            self.peak_rss = {
                "total_mb": round(sample["sim_rss_mb"], 1),
                "per_process_mb": {f"{p} {name(p)}": round(r, 1) for p, r in rss.items()},
            }
        return sample

    def cpu(self, key: str, start: float, end: float) -> float | None:
        return cpu_between([(s["t"], s[key]) for s in self.samples], start, end)

    def rss_between(self, start: float, end: float) -> float | None:
        inside = [s["sim_rss_mb"] for s in self.samples if start <= s["t"] <= end]
        return round(max(inside), 1) if inside else None


def fleet_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN / "fleet"), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"fleet {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def end(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def fleet_serve(home: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    """`fleet serve` on ``home`` until the block ends; yields once it prints its repository URL (ingest subscribed)."""
    with log.open("w") as err:
        serve = subprocess.Popen([str(BIN / "fleet"), "serve", "--home", str(home), "--log-level", "warning"],
                                 stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("repo: "):
                break
        else:
            raise RuntimeError(f"fleet serve exited {serve.wait()}: {log.read_text()[-2000:]}")
        yield serve
    finally:
        end(serve, 60)


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def online(db: Path) -> int:
    return query(db, "SELECT coalesce(sum(online), 0) FROM devices WHERE device_id LIKE ?", f"{ID_PREFIX}-%")[0][0]


def committed(db: Path) -> dict[str, float]:
    """Device id -> when it reported committing RELEASE (device clock: this machine's) among devices whose birth
    says they serve it."""
    rows = query(
        db,
        "SELECT e.device_id, min(e.ts) FROM events e JOIN devices d ON d.device_id = e.device_id "
        "WHERE e.type = 'install_committed' AND json_extract(e.detail, '$.release') = ? "
        "AND json_extract(d.models, '$.digits.release') = ? GROUP BY e.device_id",
        RELEASE,
        RELEASE,
    )
    return dict(rows)


def outcomes(db: Path) -> dict[str, str]:
    """Device id -> its latest outcome for RELEASE (install_committed, install_failed, rolled_back)."""
    rows = query(
        db,
        "SELECT device_id, type FROM events WHERE type IN ('install_committed', 'install_failed', 'rolled_back') "
        "AND json_extract(detail, '$.release') = ? ORDER BY ts",
        RELEASE,
    )
    return dict(rows)


def inference_rate(db: Path, start: float, end: float, devices: int) -> float | None:
    """Inferences per second of the whole fleet between ``start`` and ``end``: per device-second of the stored
    windows that lie inside, times ``devices``."""
    count, seconds = query(db, "SELECT sum(count), sum(window_end - window_start) FROM windows "
                               "WHERE window_start >= ? AND window_end <= ?", start, end)[0]  # fmt: skip
    return round(count / seconds * devices, 1) if seconds else None


def install_phases(db: Path, assigned_at: float) -> dict[str, Any]:
    """Per phase, p50 / p95 / max over devices of the time between its install states (assign -> DOWNLOADING ->
    STAGED -> ACTIVATING -> PROBATION -> COMMITTED), and the outcomes other than committed, by reason."""
    states: dict[str, dict[str, float]] = {}
    for device_id, state, ts in query(
        db,
        "SELECT device_id, json_extract(detail, '$.state'), min(ts) FROM events WHERE type = 'install_state' "
        "AND json_extract(detail, '$.release') = ? GROUP BY device_id, json_extract(detail, '$.state')",
        RELEASE,
    ):
        states.setdefault(device_id, {})[state] = ts
    marks = ["DOWNLOADING", "STAGED", "ACTIVATING", "PROBATION", "COMMITTED"]
    names = ["assign to download", "download + verify", "smoke test (queue included)", "switch", "probation"]
    phases: dict[str, Any] = {}
    for i, phase in enumerate(names):
        spans = [
            s[marks[i]] - (assigned_at if i == 0 else s[marks[i - 1]])
            for s in states.values()
            if marks[i] in s and (i == 0 or marks[i - 1] in s)
        ]
        if spans:
            phases[phase] = {q: round(percentile(spans, p), 2) for q, p in (("p50_s", 50), ("p95_s", 95))}
            phases[phase]["max_s"] = round(max(spans), 2)
    failed = query(
        db,
        "SELECT type, json_extract(detail, '$.reason'), count(*) FROM events WHERE type IN ('install_failed', "
        "'rolled_back') GROUP BY 1, 2",
    )
    return {"phases": phases, "not_committed_events": [list(r) for r in failed]}


def wait_until(condition: Callable[[], bool], timeout: float, tick: Callable[[], Any], say: Callable[[str], None],
               what: str) -> float | None:  # fmt: skip
    """Poll every second (sampling with ``tick``) until ``condition``; the wall time it held, or None on timeout."""
    deadline = time.monotonic() + timeout
    last_said = time.monotonic()
    while time.monotonic() < deadline:
        tick()
        if condition():
            return time.time()
        if time.monotonic() - last_said >= 15:
            say(f"  ... waiting for {what}")
            last_said = time.monotonic()
        time.sleep(1.0)
    return None


def run(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    n = args.devices
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    result: dict[str, Any] = {"machine": benchinfo.machine(), "settings": settings}
    result["machine"]["nofile"] = raise_fd_limit(max(4096, 8 * n + 256))
    models = workdir / "models"
    if args.models:
        good, better = args.models.resolve() / "good", args.models.resolve() / "better"
    else:
        from fleet.examples.modelgen import build_example

        say("building the good and better digits examples ...")
        good, better = models / "good", models / "better"
        build_example(good, variant="good", seed=0)
        build_example(better, variant="better", seed=0)
    sim_models = workdir / "sim-models"  # firmware-sim looks for MODEL_DIR/good-SEED
    sim_models.mkdir()
    (sim_models / "good-0").symlink_to(good)

    home = workdir / "home"
    fleet_cli("init", "--home", home, "--json")
    db = home / "fleet.db"
    with fleet_serve(home, workdir / "serve.err") as serve:
        fleet_cli("release", "publish", better / "int8.onnx", "--name", "digits", "--version", "1.1.0", "--home", home)
        broker = next(p for p in tree(serve.pid) if name(p) == "mosquitto")
        command = [
            str(BIN / "firmware-sim"), "run", "--enroll", f"--home={home}", f"--devices={n}", f"--shards={args.shards}",
            "--duration=86400", f"--window={args.window}", f"--rate={args.rate}", f"--model-dir={sim_models}",
            f"--state-dir={workdir / 'devices'}", f"--id-prefix={ID_PREFIX}", "--json",
        ]  # fmt: skip
        result["command"] = " ".join(command)
        say(f"starting {n} enrolled devices in {args.shards} shard(s) ...")
        with (workdir / "sim.out").open("w") as out, (workdir / "sim.err").open("w") as err:
            t_spawn = time.time()
            sim = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        sample = Sampler(sim.pid, serve.pid, broker)
        first_online: float | None = None

        def storm() -> bool:
            nonlocal first_online
            if sim.poll() is not None:
                raise RuntimeError(f"firmware-sim exited {sim.returncode}: {(workdir / 'sim.err').read_text()[-2000:]}")
            count = online(db)
            if count and first_online is None:
                first_online = time.time()
            return count >= n

        all_online = wait_until(storm, args.install_timeout, sample, say, f"{n} devices online")
        if all_online is None or first_online is None:
            raise RuntimeError(f"only {online(db)} of {n} devices came online")
        enrolled = query(db, "SELECT min(enrolled_at), max(enrolled_at) FROM enrollments WHERE device_id LIKE ?",
                         f"{ID_PREFIX}-%")[0]  # fmt: skip
        heard = query(db, "SELECT min(first_seen), max(first_seen) FROM devices WHERE device_id LIKE ?",
                      f"{ID_PREFIX}-%")[0]  # fmt: skip
        say(f"all online {all_online - t_spawn:.1f} s after the start; steady phase for {args.steady:.0f} s ...")
        steady_from = all_online + SETTLE_S
        while time.time() < steady_from + args.steady:
            sample()
            time.sleep(1.0)
        steady_to = time.time()

        ids = [f"{ID_PREFIX}-{i:04d}" for i in range(n)]
        say(f"fleet assign {RELEASE} to {n} devices ...")
        assigned_at = time.time()
        fleet_cli("assign", *ids, "--release", RELEASE, "--home", home, "--timeout", "60", timeout=1800)
        assign_done = time.time()
        progress: list[tuple[float, int]] = []

        def all_ended() -> bool:
            progress.append((time.time(), len(committed(db))))
            return len(outcomes(db)) >= n

        all_ended_at = wait_until(all_ended, args.install_timeout, sample, say, f"{n} devices to install {RELEASE}")
        install_end = time.time()
        commits = sorted(committed(db).values())
        all_done = commits[-1] if len(commits) >= n else None
        listed = json.loads(fleet_cli("devices", "list", "--home", home, "--json").stdout)
        serving = sum(1 for d in listed if d["device_id"].startswith(f"{ID_PREFIX}-")
                      and d["releases"].get("digits") == RELEASE)  # fmt: skip
        phases = install_phases(db, assigned_at)

        say("ending the simulator (SIGTERM) ...")
        end(sim, 600)
        t_exit = time.time()
    text = (workdir / "sim.out").read_text()
    try:
        report = json.loads(text[text.index("{") :])
    except ValueError:
        raise RuntimeError(f"firmware-sim exited {sim.returncode} without a report: "
                           f"{(workdir / 'sim.err').read_text()[-2000:]}") from None  # fmt: skip
    totals = report["totals"]

    def commit_after(share: float) -> float | None:
        k = int(share * n + 0.999) - 1
        return round(commits[k] - assigned_at, 1) if len(commits) > k else None

    result |= {
        "storm": {
            "enroll_s": round(enrolled[1] - enrolled[0], 1),
            "spawn_to_first_online_s": round(first_online - t_spawn, 1),
            "first_to_all_online_s": round(all_online - first_online, 1),
            "first_to_last_first_seen_s": round(heard[1] - heard[0], 2),
            "spawn_to_last_first_seen_s": round(heard[1] - t_spawn, 2),
            "spawn_to_all_online_s": round(all_online - t_spawn, 1),
        },
        "steady": {
            "seconds": round(steady_to - steady_from, 1),
            "sim_cpu_percent": sample.cpu("sim_cpu", steady_from, steady_to),
            "broker_cpu_percent": sample.cpu("broker_cpu", steady_from, steady_to),
            "fleet_serve_cpu_percent": sample.cpu("serve_cpu", steady_from, steady_to),
            "sim_rss_mb": sample.rss_between(steady_from, steady_to),
            "inferences_per_s": inference_rate(db, steady_from, steady_to, n),
        },
        "installs": {
            "assign_s": round(assign_done - assigned_at, 1),
            "committed": len(commits),
            "serving_release_in_devices_list": serving,
            "all_committed_s": None if all_done is None else round(all_done - assigned_at, 1),
            "all_ended_s": None if all_ended_at is None else round(all_ended_at - assigned_at, 1),
            "inferences_per_s": inference_rate(db, assigned_at, install_end, n),
            "sim_smoke_tests_cpu_percent": sample.cpu("sim_reaped_cpu", assigned_at, install_end),
            "first_commit_s": commit_after(1 / n),
            "half_committed_s": commit_after(0.5),
            "p95_committed_s": commit_after(0.95),
            "sim_cpu_percent": sample.cpu("sim_cpu", assigned_at, install_end),
            "broker_cpu_percent": sample.cpu("broker_cpu", assigned_at, install_end),
            "fleet_serve_cpu_percent": sample.cpu("serve_cpu", assigned_at, install_end),
            "sim_rss_mb_peak": sample.rss_between(assigned_at, install_end),
            "progress": [(round(t - assigned_at), c) for t, c in progress[:: max(1, len(progress) // 20)]],
            **phases,
        },
        "memory": {"sim_peak": sample.peak_rss},
        "windows": {
            "produced": totals["windows_produced"],
            "acknowledged": totals["windows_acked"],
            "dropped_on_device": totals["windows_dropped"],
        },
        "reconnects": sum(d["connects"] for d in report["devices"]) - n,
        "simulator": {
            "exit_code": sim.returncode,
            "wall_s": round(t_exit - t_spawn, 1),
            "run_s": report["elapsed_s"],
            "devices_reported": len(report["devices"]),
            "inferences": totals["inferences"],
            "errors": totals["errors"],
        },
    }
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["target"] = {
        "all_committed": len(commits) == n,
        "no_loss": totals["windows_produced"] == totals["windows_acked"] and totals["windows_dropped"] == 0,
    }
    return result


def print_table(r: dict[str, Any]) -> None:
    m, cfg, st, sd, ins, w = r["machine"], r["settings"], r["storm"], r["steady"], r["installs"], r["windows"]
    print(f"{m['cpu']}, {m['nproc']} CPUs, load {m['load_before']} -> {m['load_after']}; {m['mosquitto']}")
    print(f"{cfg['devices']} devices in {cfg['shards']} shards, window {cfg['window']:.0f} s, {cfg['rate']}/s/device")
    print(f"$ {r['command']}\n")
    rows = [
        ("enrollment (first to last)", f"{st['enroll_s']} s"),
        ("start to first / all online", f"{st['spawn_to_first_online_s']} / {st['spawn_to_all_online_s']} s"),
        ("connect storm (first to all online)", f"{st['first_to_all_online_s']} s (polled once a second)"),
        ("connect storm (first to last first_seen)", f"{st['first_to_last_first_seen_s']} s"),
        (
            "steady CPU sim / broker / fleet serve",
            f"{sd['sim_cpu_percent']} / {sd['broker_cpu_percent']} / {sd['fleet_serve_cpu_percent']} % of one core",
        ),
        ("steady sim RSS (all its processes)", f"{sd['sim_rss_mb']} MB"),
        ("steady inferences/s", f"{sd['inferences_per_s']} (scheduled {cfg['devices'] * cfg['rate']:.0f})"),
        ("fleet assign", f"{ins['assign_s']} s"),
        ("committed / serving it (devices list)", f"{ins['committed']} / {ins['serving_release_in_devices_list']}"),
        (
            "first / half / 95 % / all committed",
            f"{ins['first_commit_s']} / {ins['half_committed_s']} / "
            f"{ins['p95_committed_s']} / {ins['all_committed_s']} s",
        ),
        (
            "install CPU sim / broker / fleet serve",
            f"{ins['sim_cpu_percent']} / {ins['broker_cpu_percent']} / {ins['fleet_serve_cpu_percent']} % of one core",
        ),
        ("  of which smoke-test children", f"{ins['sim_smoke_tests_cpu_percent']} % of one core"),
        ("install inferences/s", f"{ins['inferences_per_s']} (scheduled {cfg['devices'] * cfg['rate']:.0f})"),
        ("every device ended its install", f"{ins['all_ended_s']} s"),
        ("install sim RSS peak", f"{ins['sim_rss_mb_peak']} MB"),
        *(
            (f"  {phase} p50/p95/max", f"{v['p50_s']} / {v['p95_s']} / {v['max_s']} s")
            for phase, v in ins["phases"].items()
        ),
        ("MQTT reconnects", f"{r['reconnects']}"),
        ("not committed (type, reason, count)", f"{ins['not_committed_events'] or 'none'}"),
        (
            "windows produced / acknowledged / dropped",
            f"{w['produced']} / {w['acknowledged']} / {w['dropped_on_device']}",
        ),
    ]
    for label, value in rows:
        print(f"{label:<42} {value}")
    t = r["target"]
    verdict = {True: "met", False: "NOT met"}
    print(
        f"\nall committed: {verdict[t['all_committed']]}; no loss: {verdict[t['no_loss']]}; "
        f"simulator exit code {r['simulator']['exit_code']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0, help="telemetry window, s")
    parser.add_argument("--rate", type=float, default=1.0, help="inferences/s per device")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady phase measured before assign")
    parser.add_argument("--install-timeout", type=float, default=1500.0, help="s to wait for every commit")
    parser.add_argument("--models", type=Path, help="folder with good/ and better/ (default: build them)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, database)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True)
            workdir = args.keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-bench-installs-")))
        result = run(args, workdir, say)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print()
        print_table(result)


if __name__ == "__main__":
    main()
