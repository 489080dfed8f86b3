"""From desired-state publish to COMMITTED on one device, and what verification costs per MB.

1. A real fleet (TUF repository over HTTP on loopback, director key, mosquitto) and a real agent core with
   updates on. Each round enrols a fresh device on the good digits model, publishes the desired state for
   the `better` release and waits for the install. Phases come from the device's own `install_state` events:
   deliver (publish -> DOWNLOADING: MQTT + director signature and checks), refresh+download (TUF refresh,
   two-source agreement, download), verify (hash at rest, stage), smoke test (child process), switch (load and
   swap). Probation is excluded (it is a policy wait, not work).
2. TUF refresh and download on their own (the same ReleaseFetcher the installer uses), and the cost of
   verification per MB: ngclient download+verify of a large target, and the at-rest hash the device runs
   before it serves a slot.

    python scripts/bench/update.py [--models DIR] [--rounds 5] [--big-mb 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import runtime
from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig, UpdateConfig
from agent.core import AgentCore
from agent.protocol import DEFAULT_PREFIX, Kind, topic
from agent.reactor import Reactor
from agent.update.desired import DesiredModel
from agent.update.slots import file_problem
from agent.update.tuf_client import ReleaseFetcher
from fleet.broker import MosquittoBroker
from fleet.examples.modelgen import build_example
from fleet.trust.director import sign_desired
from fleet.trust.repo_server import RepoServer
from fleet.trust.repository import Repository

PHASES = (
    ("deliver", None, "DOWNLOADING"),
    ("refresh+download", "DOWNLOADING", "VERIFYING"),
    ("verify", "VERIFYING", "STAGED"),
    ("smoke test", "STAGED", "ACTIVATING"),
    ("switch", "ACTIVATING", "PROBATION"),
)


class EventTap:
    def __init__(self, broker: BrokerAddress, device_id: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic(DEFAULT_PREFIX, device_id, Kind.EVENTS), qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.events.append(json.loads(message.payload))
            self.arrived.notify_all()

    def wait(self, type_: str, timeout: float) -> dict[str, Any]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: any(e["type"] == type_ for e in self.events), timeout):
                raise TimeoutError(f"no {type_} event in {timeout} s: {[e['type'] for e in self.events]}")
        return next(e for e in self.events if e["type"] == type_)

    def state_times(self) -> dict[str, float]:
        return {e["detail"]["state"]: e["ts"] for e in self.events if e["type"] == "install_state"}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_install(repo: Repository, server: RepoServer, broker: MosquittoBroker, models: Path,
                release: Any, work: Path) -> dict[str, float]:  # fmt: skip
    device_id = f"bench-{uuid.uuid4().hex[:8]}"
    root, director = work / f"{device_id}.root.json", work / f"{device_id}.director.json"
    root.write_bytes(repo.trusted_root())
    director.write_bytes(repo.keys.public_key_json("director"))
    config = AgentConfig(
        device_id=device_id,
        state_dir=work / device_id,
        broker=BrokerAddress.parse(broker.url),
        window_s=60,
        models=(ModelConfig("digits", models / "int8.onnx", models / "card.json", "digits:1.0.0", threads=1),),
        update=UpdateConfig(server.url, root, director, probation_inferences=1, probation_s=0.5),
    )
    reactor = Reactor()
    core = AgentCore(config, reactor)
    tap = EventTap(config.broker, device_id)
    core.start()
    reactor.start_thread()
    try:
        payload = sign_desired(
            repo.keys.signer("director"), device_id, 1, {"digits": release.desired_entry()}, "bench",
            time.time(), time.time() + 600,
        )  # fmt: skip
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"director-{device_id}")
        publisher.connect(config.broker.host, config.broker.port)
        publisher.loop_start()
        published = time.time()
        publisher.publish(topic(DEFAULT_PREFIX, device_id, Kind.DESIRED), payload, qos=1, retain=True)
        tap.wait("install_committed", 60)
        publisher.disconnect()
        publisher.loop_stop()
        times = tap.state_times()
        phases = {}
        for name, start, end in PHASES:
            phases[name] = (times[end] - (published if start is None else times[start])) * 1000
        phases["total (probation excluded)"] = (times["PROBATION"] - published) * 1000
        return phases
    finally:
        reactor.call_soon_threadsafe(lambda: core.stop(timeout=2))
        reactor.stop()
        if reactor.thread:
            reactor.thread.join(10)
        tap.close()


def fetcher_costs(repo: Repository, server: RepoServer, release: Any, work: Path, tag: str) -> dict[str, float]:
    """TUF refresh, resolve and download+verify with a fresh device state, timed apart."""
    fetcher = ReleaseFetcher(
        work / f"fetch-{tag}", server.url, repo.trusted_root(), 2**31, 600, runtimes=runtime.runtime_names()
    )
    t0 = time.perf_counter()
    fetcher.refresh()
    t1 = time.perf_counter()
    entry = DesiredModel(release.name, release.version, release.target, release.release, release.sha256, release.length)
    target = fetcher.resolve(entry)
    t2 = time.perf_counter()
    path = fetcher.download(target, work / f"dl-{tag}")
    t3 = time.perf_counter()
    assert file_problem(path, target.sha256, target.length) is None
    t4 = time.perf_counter()
    return {
        "bytes": target.length,
        "refresh_ms": (t1 - t0) * 1000,
        "resolve_ms": (t2 - t1) * 1000,
        "download_verify_ms": (t3 - t2) * 1000,
        "at_rest_hash_ms": (t4 - t3) * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="a `fleet model example` folder of the good variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--big-mb", type=int, default=32, help="size of the synthetic target for per-MB costs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        good = args.models or work / "good"
        if not (good / "card.json").exists():
            build_example(good)
        better = work / "better"
        build_example(better, variant="better")
        home = work / "home"
        Repository.init(home)
        repo = Repository(home)
        release = repo.publish(better / "int8.onnx", "digits", "1.1.0", json.loads((better / "card.json").read_text()))
        big = work / "big" / "big.onnx"
        big.parent.mkdir()
        big.write_bytes(os.urandom(args.big_mb * 2**20))
        big_card = json.loads((better / "card.json").read_text())
        big_card["files"] = {}
        big_release = repo.publish(big, "bigmodel", "1.0.0", big_card)
        server = RepoServer(repo.dir).start()
        broker = MosquittoBroker(work / "mosquitto")
        broker.start()
        try:
            rounds = [one_install(repo, server, broker, good, release, work) for _ in range(args.rounds)]
            small = fetcher_costs(repo, server, release, work, "small")
            large = fetcher_costs(repo, server, big_release, work, "large")
        finally:
            broker.kill()
            server.stop()

    mb = large["bytes"] / 2**20
    results: dict[str, Any] = {
        "publish_to_committed_ms": {k: round(statistics.median(r[k] for r in rounds), 1) for k in rounds[0]},
        "rounds": args.rounds,
        "model_bytes": small["bytes"],
        "fetch_small_ms": {k: round(v, 1) for k, v in small.items() if k != "bytes"},
        "per_mb": {
            "target_mb": round(mb, 1),
            "download_verify_ms_per_mb": round(large["download_verify_ms"] / mb, 2),
            "at_rest_hash_ms_per_mb": round(large["at_rest_hash_ms"] / mb, 2),
        },
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"publish -> COMMITTED (probation excluded), median of {args.rounds}, {small['bytes']} byte model:")
        for k, v in results["publish_to_committed_ms"].items():
            print(f"  {k:28s} {v:8.1f} ms")
        print("fetcher alone (fresh device state):")
        for k, v in results["fetch_small_ms"].items():
            print(f"  {k:28s} {v:8.1f} ms")
        print(f"verification per MB ({mb:.0f} MB target):")
        for k, v in results["per_mb"].items():
            if k != "target_mb":
                print(f"  {k:28s} {v:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
