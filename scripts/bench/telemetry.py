"""Agent hot path and telemetry size.

1. Inference through ``AgentCore.predict`` (telemetry on) against the same model's ``predict`` without telemetry,
   same process, interleaved rounds, batch 1 and 32. As in `edge-agent run`, the reactor thread drains the queued
   inferences into histograms every 0.25 s. Two ratios: wall time per call on the caller's thread (what an
   application waits for) and process CPU time per call (what the device pays in all, drain included).
2. The encoded size of one telemetry window of the digits model after a realistic minute of traffic.

    python scripts/bench/telemetry.py [--models DIR] [--rounds 9] [--calls 10240] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent import protocol
from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig
from agent.core import DRAIN_INTERVAL_S, AgentCore
from agent.reactor import Reactor
from fleet.examples.modelgen import build_example, digits_split


def per_call_us(fn: Callable[..., object], args: tuple[object, ...], calls: int) -> tuple[float, float]:
    """(wall µs, process CPU µs) per call of ``fn(*args)``, as an application would make it."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="folder from `fleet model example` (built in a temp dir if absent)")
    ap.add_argument("--rounds", type=int, default=9)
    # A multiple of the 1,024 single-row calls after which the caller drains the queue itself, so every round holds
    # the same number of drains (with 2,000, rounds alternated between one and two, and the medians wobbled).
    ap.add_argument("--calls", type=int, default=10240)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp) / "models"
        if not (models / "card.json").exists():
            build_example(models)
        _, x_test, _, _ = digits_split(0)
        results: dict[str, object] = {}
        for model_file in ("int8.onnx", "int8.tflite"):
            config = AgentConfig(
                device_id="bench",
                state_dir=Path(tmp) / model_file,
                broker=BrokerAddress.parse("mqtt://127.0.0.1:1"),
                models=(ModelConfig("digits", models / model_file, models / "card.json", "digits:1.0.0", threads=1),),
            )
            reactor = Reactor()
            core = AgentCore(config, reactor)
            reactor.call_every(DRAIN_INTERVAL_S, core.drain_telemetry)
            reactor.start_thread()
            for batch in (1, 32):
                x = x_test[:batch]
                bare = (core.models["digits"].model.predict, (x,))
                served = (core.predict, ("digits", x))
                for fn, fn_args in (bare, served):  # warm up both paths
                    per_call_us(fn, fn_args, 200)
                on, off = [], []
                for _ in range(args.rounds):
                    off.append(per_call_us(*bare, args.calls))
                    on.append(per_call_us(*served, args.calls))
                wall_off, wall_on = (statistics.median(r[0] for r in runs) for runs in (off, on))
                cpu_off, cpu_on = (statistics.median(r[1] for r in runs) for runs in (off, on))
                results[f"{model_file} batch {batch}"] = {
                    "off_us": round(wall_off, 2),
                    "on_us": round(wall_on, 2),
                    "wall_ratio": round(wall_on / wall_off, 3),
                    "cpu_ratio": round(cpu_on / cpu_off, 3),
                }
            reactor.stop()
            reactor.thread.join()
            core.models["digits"].telemetry.flush()

            # One realistic window: a minute at 10 inferences/s of held-out digits.
            for i in range(600):
                core.predict("digits", x_test[i % len(x_test)][None, :])
            message = {
                "v": protocol.SCHEMA_VERSION,
                "device_id": "pi-kitchen-0001",
                "boot_id": "0" * 32,
                "seq": 123456,
                "dropped": 0,
                "health": core.health.sample(),
                **core.models["digits"].telemetry.flush(),
            }
            raw = json.dumps(message, separators=(",", ":"))
            results[f"{model_file} window"] = {
                "inferences": message["count"],
                "json_bytes": len(raw),
                "wire_bytes": len(protocol.encode(protocol.Kind.TELEMETRY, message)),
            }
            core.close(timeout=0)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, r in results.items():
            print(f"{name:24s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
