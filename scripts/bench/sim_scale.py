"""Simulator at scale: N real agent cores (default 500) in one `firmware-sim run` process on this machine, their
telemetry through a loopback mosquitto into the fleet's ``Ingest`` and SQLite ``Store``.

The simulator runs as a subprocess (`firmware-sim run --json`), so its CPU is its own: read from /proc every
second while it runs, and in total from ``getrusage(RUSAGE_CHILDREN)`` once it has exited. The ingest runs in this
process. Measured: simulator CPU (whole run, and the steady phase once every device is online), ingest lag per
window (the store's ``received_at`` minus the device's ``window_end``: p50, p95, max), windows produced by the
devices vs stored by the fleet (must be equal), MQTT connects, and wall time.

    python scripts/bench/sim_scale.py [--devices 500] [--duration 60] [--window 10] [--rate 1] [--models DIR]
                                      [--runtime onnx|tflite] [--json]

Without ``--models`` the good digits example is built into a temporary folder first (a few seconds), outside the
measured simulator process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchinfo

#: Steady-phase CPU is measured from this long after the last device came online to shortly before the run ends.
SETTLE_S = 5.0
#: Windows must reach the store within this long after the simulator exits.
STORE_WAIT_S = 60.0


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's open-file soft limit (inherited by the broker and the simulator) towards ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """How many files a process has open (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def proc_limit(pid: int, name: str) -> str | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith(name):
                return " ".join(line[len(name) :].split()[:2])
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Average CPU percent (100 = one core) between two wall times, from (time, cpu seconds) samples."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return None
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    return round((c1 - c0) / (t1 - t0) * 100, 1)


class Probe:
    """A bare paho subscriber (QoS 0, own thread) that notes when each telemetry payload reaches a subscriber of the
    broker; payloads are decoded only after the run. It splits the lag into device + broker, and the ingest."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from agent import protocol

        self.arrivals: list[tuple[float, bytes]] = []
        self._ready = threading.Event()
        topic = protocol.subscription(protocol.DEFAULT_PREFIX, protocol.Kind.TELEMETRY)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sim-probe")
        client.on_connect = lambda c, *_: c.subscribe(topic, 0)
        client.on_subscribe = lambda *_: self._ready.set()
        client.on_message = lambda _c, _u, m: self.arrivals.append((time.time(), m.payload))
        client.connect(host, port)
        client.loop_start()
        self._client = client
        if not self._ready.wait(10):
            raise RuntimeError("the probe did not subscribe")

    def stop(self) -> dict[tuple[str, str, int], float]:
        """(device_id, boot_id, seq) -> first arrival time."""
        from agent import protocol

        self._client.disconnect()
        self._client.loop_stop()
        seen: dict[tuple[str, str, int], float] = {}
        for at, payload in self.arrivals:
            m = protocol.decode(protocol.Kind.TELEMETRY, payload)
            seen.setdefault((m["device_id"], m["boot_id"], m["seq"]), at)
        return seen


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(values, 50), 3),
        "p95_s": round(percentile(values, 95), 3),
        "max_s": round(max(values), 3),
        "mean_s": round(statistics.mean(values), 3),
    }


def lag_stats(db: Path, arrivals: dict[tuple[str, str, int], float]) -> dict[str, Any]:
    """Per stored window: received_at - window_end (s); and split at the probe's arrival time, when it saw it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT device_id, boot_id, seq, window_end, received_at FROM windows").fetchall()
    finally:
        conn.close()
    if not rows:
        return {"windows": 0}
    split = [(arrivals[r[:3]] - r[3], r[4] - arrivals[r[:3]]) for r in rows if r[:3] in arrivals]
    out: dict[str, Any] = {"windows": len(rows), **_summary([r[4] - r[3] for r in rows])}
    if split:
        out["device_to_broker"] = _summary([a for a, _ in split])
        out["broker_to_store"] = _summary([b for _, b in split])
    return out


def run(args: argparse.Namespace, workdir: Path, say: Any) -> dict[str, Any]:
    from fleet.broker import MosquittoBroker
    from fleet.ingest.mqtt import Ingest
    from fleet.store import open_store

    settings = {k: v for k, v in vars(args).items() if k != "json"}
    result: dict[str, Any] = {"machine": benchinfo.machine(), "settings": settings}
    # Per device: a socket, the outbox database with its WAL and shm; the broker needs one socket per device.
    soft, hard = raise_fd_limit(max(4096, 8 * args.devices + 256))
    result["machine"]["nofile"] = [soft, hard]

    model_root = workdir / "models"  # firmware-sim looks for MODEL_DIR/good-SEED
    model_root.mkdir()
    if args.models:
        (model_root / f"good-{args.seed}").symlink_to(args.models.resolve())
    else:
        from fleet.examples.modelgen import build_example

        say("building the good digits example ...")
        build_example(model_root / f"good-{args.seed}", "good", seed=args.seed)

    broker = MosquittoBroker(workdir / "broker")
    broker.start()
    assert broker.proc is not None
    store = open_store(workdir / "fleet.db")
    ingest = Ingest(store, broker.url, client_id="bench-sim-ingest")
    ingest.start()
    if not ingest.wait_ready(10):
        raise RuntimeError("the ingest did not subscribe")
    result["machine"]["broker_nofile"] = proc_limit(broker.proc.pid, "Max open files")
    probe = Probe(broker.host, broker.port)

    command = [
        str(Path(sys.executable).parent / "firmware-sim"),
        "run",
        f"--devices={args.devices}",
        f"--broker={broker.url}",
        f"--duration={args.duration}",
        f"--window={args.window}",
        f"--rate={args.rate}",
        f"--seed={args.seed}",
        f"--runtime={args.runtime}",
        f"--model-dir={model_root}",
        f"--state-dir={workdir / 'devices'}",
        "--json",
    ]
    say(f"running {args.devices} devices for {args.duration:.0f} s ...")
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu, broker_cpu = time.process_time(), proc_cpu_s(broker.proc.pid) or 0.0
    out_path, err_path = workdir / "sim.out", workdir / "sim.err"
    samples: list[tuple[float, float]] = []  # (wall, simulator CPU s)
    online_at: float | None = None
    fds = {"simulator": 0, "broker": 0}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t_spawn = time.time()
        sim = subprocess.Popen(command, stdout=out, stderr=err)
        while sim.poll() is None:
            cpu = proc_cpu_s(sim.pid)
            if cpu is not None:
                samples.append((time.time(), cpu))
            fds["simulator"] = max(fds["simulator"], open_fds(sim.pid))
            fds["broker"] = max(fds["broker"], open_fds(broker.proc.pid))
            if online_at is None and store.summary().online >= args.devices:
                online_at = time.time()
            time.sleep(1.0)
        t_exit = time.time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out_path.read_text()
    try:
        report = json.loads(text[text.index("{") :])
    except ValueError:
        raise RuntimeError(f"firmware-sim exited {sim.returncode} without a report; see {err_path}") from None

    totals = report["totals"]
    produced = totals["windows_produced"]
    deadline = time.monotonic() + STORE_WAIT_S
    while sum(store.window_counts().values()) < produced and time.monotonic() < deadline:
        time.sleep(0.2)
    t_stored = time.time()
    stored = sum(store.window_counts().values())
    own_cpu = time.process_time() - own_cpu
    broker_cpu = (proc_cpu_s(broker.proc.pid) or 0.0) - broker_cpu
    ingest.stop()
    arrivals = probe.stop()
    summary = store.summary()
    store.close()
    broker.stop()

    sim_cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    wall = t_exit - t_spawn
    steady = None
    if online_at is not None:
        steady_end = online_at + args.duration - 2.0
        steady = cpu_between(samples, online_at + SETTLE_S, steady_end)
    connects = sum(d["connects"] for d in report["devices"])
    result |= {
        "simulator": {
            "exit_code": sim.returncode,
            "wall_s": round(wall, 1),
            "run_s": report["elapsed_s"],
            "startup_s": None if online_at is None else round(online_at - t_spawn, 1),
            "cpu_s": round(sim_cpu, 1),
            "cpu_percent_avg": round(sim_cpu / wall * 100, 1),
            "cpu_percent_steady": steady,
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "inferences": totals["inferences"],
            "errors": totals["errors"],
        },
        "windows": {
            "produced": produced,
            "acked_by_broker": totals["windows_acked"],
            "dropped_on_device": totals["windows_dropped"],
            "stored": stored,
            "lost": produced - stored,
        },
        "connects": {"total": connects, "reconnects": connects - args.devices},
        "max_open_files": fds,
        "lag": lag_stats(workdir / "fleet.db", arrivals),
        "fleet": {
            "devices_seen": summary.devices,
            "rejects": summary.rejects,
            "ingest_process_cpu_s": round(own_cpu, 1),
            "broker_cpu_s": round(broker_cpu, 1),
            "stored_s_after_sim_exit": round(t_stored - t_exit, 2),
        },
    }
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["target"] = {"no_loss": stored == produced and totals["windows_dropped"] == 0}
    return result


def print_table(r: dict[str, Any]) -> None:
    m, s, w, c, lag, f = r["machine"], r["simulator"], r["windows"], r["connects"], r["lag"], r["fleet"]
    cfg = r["settings"]
    print(f"{m['cpu']}, {m['nproc']} CPUs, load {m['load_before']} -> {m['load_after']}; {m['mosquitto']}")
    print(
        f"{cfg['devices']} devices, {cfg['duration']:.0f} s, window {cfg['window']:.0f} s, {cfg['rate']}/s/device, "
        f"{cfg['runtime']}; nofile {m['nofile']}, broker {m['broker_nofile']}\n"
    )
    rows = [
        ("wall time, simulator process", f"{s['wall_s']} s (startup {s['startup_s']} s, run {s['run_s']} s)"),
        ("simulator CPU, total", f"{s['cpu_s']} s ({s['cpu_percent_avg']}% of one core over its wall time)"),
        ("simulator CPU, steady phase", f"{s['cpu_percent_steady']}% of one core"),
        ("simulator max RSS", f"{s['max_rss_mb']} MB"),
        ("inferences (errors)", f"{s['inferences']} ({s['errors']})"),
        ("windows produced / acked / stored", f"{w['produced']} / {w['acked_by_broker']} / {w['stored']}"),
        ("windows lost / dropped on device", f"{w['lost']} / {w['dropped_on_device']}"),
        ("MQTT connects (reconnects)", f"{c['total']} ({c['reconnects']})"),
        ("open files, simulator / broker", f"{r['max_open_files']['simulator']} / {r['max_open_files']['broker']}"),
        ("ingest lag p50 / p95 / max", f"{lag.get('p50_s')} / {lag.get('p95_s')} / {lag.get('max_s')} s"),
        *(
            (f"  of which {name.replace('_', ' ')}", f"{part['p50_s']} / {part['p95_s']} / {part['max_s']} s")
            for name in ("device_to_broker", "broker_to_store")
            if (part := lag.get(name))
        ),
        ("ingest process CPU / broker CPU", f"{f['ingest_process_cpu_s']} s / {f['broker_cpu_s']} s"),
        ("rejects", f"{f['rejects'] or 'none'}"),
    ]
    for name, value in rows:
        print(f"{name:<36} {value}")
    print(f"\nno loss: {'met' if r['target']['no_loss'] else 'NOT met'}; simulator exit code {s['exit_code']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the devices run")
    parser.add_argument("--window", type=float, default=10.0, help="telemetry window, s")
    parser.add_argument("--rate", type=float, default=1.0, help="inferences/s per device")
    parser.add_argument("--runtime", choices=("onnx", "tflite"), default="onnx")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, help="folder from `fleet model example` (default: build one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    from agent import logs

    logs.setup("WARNING")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-sim-") as tmp:
        result = run(args, Path(tmp), say)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print()
        print_table(result)


if __name__ == "__main__":
    main()
