"""Smoke-test children: a fresh interpreter per test (the agent) against a fork of a preloaded server (the simulator,
``agent.update.smoke.prefork``), in the same process and run, on the project's good digits model.

Measured for each: wall time per smoke test run one after another, and the CPU the children used (this process's
``RUSAGE_CHILDREN``, plus the forkserver's own and its children's CPU, before and after). The forkserver is started
and preloaded before the forked runs are timed, as a simulator starts it once for all its devices. Prints the
ratios forked / fresh.

    python scripts/bench/smoke_children.py [--tests 30] [--models DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import benchinfo

from agent.update import smoke


def children_cpu_s() -> float:
    """CPU of this process's children, and of the forkserver with its own children once it runs (forked children are
    the forkserver's, so RUSAGE_CHILDREN does not see them): utime, stime, cutime, cstime of /proc/PID/stat."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def timed(model: Path, card: dict[str, Any], tests: int) -> dict[str, float]:
    cpu, started = children_cpu_s(), time.perf_counter()
    for _ in range(tests):
        result = smoke.run_smoke_test(model, "onnxruntime", card, model.name, 60)
        assert result.passed, result
    return {
        "wall_s_per_test": (time.perf_counter() - started) / tests,
        "cpu_s_per_test": (children_cpu_s() - cpu) / tests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=30)
    parser.add_argument("--models", type=Path, help="a folder of `fleet model example` (default: built now)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            from fleet.examples.modelgen import build_example

            models = Path(tmp) / "good"
            build_example(models, variant="good", seed=0)
        card = json.loads((models / "card.json").read_text())
        model = models / "int8.onnx"
        fresh = timed(model, card, args.tests)
        smoke.prefork()
        timed(model, card, 1)  # starts the forkserver and preloads the runtime: paid once per simulator process
        forked = timed(model, card, args.tests)
    result = {
        "machine": benchinfo.machine(),
        "tests": args.tests,
        "fresh": fresh,
        "forked": forked,
        "ratio_wall": forked["wall_s_per_test"] / fresh["wall_s_per_test"],
        "ratio_cpu": forked["cpu_s_per_test"] / fresh["cpu_s_per_test"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("fresh", "forked"):
        r = result[name]
        print(f"{name:7} {r['wall_s_per_test'] * 1000:7.1f} ms wall  {r['cpu_s_per_test'] * 1000:7.1f} ms CPU per test")
    print(f"forked / fresh: wall {result['ratio_wall']:.3f}, CPU {result['ratio_cpu']:.3f}")


if __name__ == "__main__":
    main()
