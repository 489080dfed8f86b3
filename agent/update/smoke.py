"""The smoke test of a staged release: load it in a child process, run the card's signed samples, judge here.

The model runs in ``python -m agent.update.smoke``: a release that crashes its runtime (segfault, abort), exits or hangs
takes down a child, not the agent: the parent sees a signal, an exit code or its wall-clock timeout. The child loads the
model, runs each signed sample as a one-row batch (after one warm-up) and prints the outputs and latencies as one JSON
line. The parent, which never ran the model, decides: every output within ``atol`` of the card's expected outputs for
this file, and the median single-row latency within ``latency_budget_ms``.

The card's ``smoke_test`` (see ``fleet.examples.modelgen``)::

    {"inputs": [[...], ...], "expected": {"<file name>": {"probabilities": [[...], ...]}, ...},
     "atol": 0.05, "latency_budget_ms": 50.0}

Reasons are stable: ``smoke_bad_card``, ``smoke_crashed``, ``smoke_timeout``, ``smoke_error`` (the runtime refused
to load or run it), ``smoke_mismatch``, ``smoke_too_slow``; the detail says by how much.

Test hook: ``EDGEFLEET_FAULT_SMOKE=<signal name>`` (e.g. ``SIGKILL``, ``SIGSEGV``), ``hang`` or ``exit`` makes the
child, once the model is loaded, kill itself with that signal, hang, or exit with status 3 without an answer: a release
that crashes or hangs its runtime, on demand.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from agent.logs import event

log = logging.getLogger(__name__)

#: The test hook's environment variable (see the module docstring).
FAULT_SMOKE = "EDGEFLEET_FAULT_SMOKE"
_STDERR_TAIL = 300
#: Smoke-test children running at once in this process, at most one per CPU: an agent installs one release at a time,
#: but a simulator runs many devices' installers in one process, and a child per device at once would time out the
#: smoke tests of a whole fleet on a small machine (a digits int8 ONNX child takes 0.36-0.44 s of CPU, measured
#: here on 2 cores, mostly importing the runtime). The wait for a turn is not counted in the child's timeout.
_CHILDREN = threading.BoundedSemaphore(os.cpu_count() or 1)
#: Where smoke-test children are forked from once :func:`prefork` is called; None: a fresh interpreter each.
_FORKSERVER: multiprocessing.context.ForkServerContext | None = None


def share_cpus(processes: int) -> None:
    """This process is one of ``processes`` sharing the machine (the simulator's shards): run at most its share of
    the CPUs' smoke-test children at once, at least one. Call it before any install starts. Unshared, 2 shards on 2
    cores ran up to 4 children at once (docs/performance.md, 1,000 simulated devices)."""
    global _CHILDREN
    _CHILDREN = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) // processes))


@dataclass(frozen=True)
class SmokeResult:
    passed: bool
    reason: str = ""
    detail: str = ""
    median_ms: float | None = None


@dataclass(frozen=True)
class _Plan:
    inputs: list[list[float]]
    expected: np.ndarray
    atol: float
    budget_ms: float | None


def _plan(card: Mapping[str, Any], file_name: str) -> _Plan:
    """The signed samples and expectations for ``file_name``; ValueError if the card does not hold them."""
    smoke = card.get("smoke_test")
    if not isinstance(smoke, Mapping):
        raise ValueError("the card has no smoke_test")
    expected = smoke.get("expected", {}).get(file_name) if isinstance(smoke.get("expected"), Mapping) else None
    if not isinstance(expected, Mapping) or "probabilities" not in expected:
        raise ValueError(f"the card has no expected outputs for {file_name}")
    inputs, atol, budget = smoke.get("inputs"), smoke.get("atol"), smoke.get("latency_budget_ms")
    probabilities = np.asarray(expected["probabilities"], dtype=np.float64)
    if not isinstance(inputs, list) or not inputs or probabilities.ndim != 2 or len(probabilities) != len(inputs):
        raise ValueError("smoke_test inputs and expected outputs must be matching non-empty rows")
    if not (isinstance(atol, int | float) and math.isfinite(atol) and atol >= 0):
        raise ValueError("smoke_test atol must be a number >= 0")
    if budget is not None and not (isinstance(budget, int | float) and budget > 0):
        raise ValueError("smoke_test latency_budget_ms must be a number > 0")
    return _Plan(inputs, probabilities, float(atol), None if budget is None else float(budget))


def run_smoke_test(model: Path, runtime: str, card: Mapping[str, Any], file_name: str, timeout_s: float) -> SmokeResult:
    """Smoke-test ``model`` (the release file ``file_name``) against its signed ``card``, in a child process."""
    try:
        plan = _plan(card, file_name)
    except ValueError as exc:
        return SmokeResult(False, "smoke_bad_card", str(exc))
    fault = os.environ.get(FAULT_SMOKE)  # the agent's own environment, however the child starts
    request = json.dumps({"model": str(model), "runtime": runtime, "inputs": plan.inputs, "fault": fault})
    try:
        with _CHILDREN:
            done = _run_child(request, timeout_s)
    except subprocess.TimeoutExpired:  # the child has been killed
        return SmokeResult(False, "smoke_timeout", f"no answer within {timeout_s:g} s")
    if done.returncode < 0:
        sig = -done.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else "?"
        return SmokeResult(False, "smoke_crashed", f"signal {sig} ({name})")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return SmokeResult(False, "smoke_crashed", f"exit {done.returncode}: {done.stderr.strip()[-_STDERR_TAIL:]}")
    try:
        answer = json.loads(lines[-1])
        if "error" in answer:
            return SmokeResult(False, "smoke_error", str(answer["error"])[:_STDERR_TAIL])
        outputs = np.asarray(answer["outputs"], dtype=np.float64)
        median = statistics.median(float(v) for v in answer["latencies_ms"])
    except (KeyError, TypeError, ValueError, statistics.StatisticsError):
        return SmokeResult(False, "smoke_crashed", f"unreadable answer: {lines[-1][:_STDERR_TAIL]}")
    return _judge(plan, outputs, median)


def _run_child(request: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run the child on ``request``: a fresh interpreter, or a fork of the preloaded server (:func:`prefork`)."""
    if _FORKSERVER is None:
        return _fresh(request, timeout_s)
    receiver, sender = _FORKSERVER.Pipe(duplex=False)
    child = _FORKSERVER.Process(target=_forked, args=(request, sender), daemon=True)
    child.start()
    sender.close()
    try:
        answer = receiver.recv() if receiver.poll(timeout_s) else None
    except EOFError:  # it died before answering: its exit code says how
        answer = ""
    finally:
        receiver.close()
    if answer is None:
        child.kill()
        child.join()
        raise subprocess.TimeoutExpired("smoke test", timeout_s)
    child.join(timeout_s)
    if child.exitcode is None:
        child.kill()
        child.join()
    code = child.exitcode or 0
    if code < 0:  # a signal: the release crashed its runtime
        return subprocess.CompletedProcess([], code, answer, "")
    if not answer:  # no answer and no signal: not a verdict on the release; the fresh interpreter decides
        event(log, "smoke_fork_fallback", logging.WARNING, exit_code=code)
        return _fresh(request, timeout_s)
    # The answer is the verdict. The exit status after it can be lost: multiprocessing's Process.start() polls every
    # live child from whichever thread starts one, and two threads reading one child's status pipe leave the loser
    # 255 ("the forkserver got killed"); installer threads that start smoke tests at once met it (2 of 30 simulated
    # installs in one run, 1 of 8 in another). A lost status with no answer falls back above.
    return subprocess.CompletedProcess([], 0, answer, "")


def _fresh(request: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.update.smoke"], input=request, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip


def prefork() -> None:
    """Start smoke-test children by forking a server that imported the runtime once, instead of a fresh interpreter
    each: for a process that installs on many devices at once (the simulator). Each test still runs in a child of its
    own, so a release that crashes or hangs its runtime takes down that child only. A fresh interpreter costs
    0.36-0.44 s of CPU, mostly importing the runtime: 1,000 simulated devices spent 273 s (p50) waiting for their
    smoke test (docs/performance.md)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["agent.update.smoke", "agent.runtime", "onnxruntime"])
        _FORKSERVER = context


def _forked(request: str, sender: Connection) -> None:
    """The forked child's side: the same answer a fresh child prints, sent back on ``sender``."""
    sender.send(_answer(json.loads(request)))


def _judge(plan: _Plan, outputs: np.ndarray, median: float) -> SmokeResult:
    if outputs.shape != plan.expected.shape:
        return SmokeResult(False, "smoke_mismatch", f"output shape {list(outputs.shape)}, expected "
                           f"{list(plan.expected.shape)}", median)  # fmt: skip
    # NaN never compares within tolerance, so a NaN output is a mismatch.
    bad_rows = int((~(np.abs(outputs - plan.expected) <= plan.atol)).any(axis=1).sum())
    if bad_rows:
        detail = f"{bad_rows}/{len(outputs)} rows differ by more than atol {plan.atol:g}"
        return SmokeResult(False, "smoke_mismatch", detail, median)
    if plan.budget_ms is not None and median > plan.budget_ms:
        return SmokeResult(False, "smoke_too_slow", f"median {median:.3g} ms > budget {plan.budget_ms:g} ms", median)
    return SmokeResult(True, median_ms=median)


def _fault_hook(fault: str | None) -> None:
    if fault == "exit":
        os._exit(3)
    if fault == "hang":
        time.sleep(3600)
    elif fault:
        os.kill(os.getpid(), signal.Signals[fault])


def _answer(request: Mapping[str, Any]) -> str:
    """The child's side: load, run every sample alone, answer one JSON line. The parent judges."""
    from agent.runtime import RuntimeLayerError, load_model

    try:
        model = load_model(request["model"], threads=1, runtime=request["runtime"])
        _fault_hook(request.get("fault"))
        rows = np.asarray(request["inputs"], dtype=np.float32)
        model.predict(rows[:1])  # warm-up: first-call allocations are not the model's latency
        outputs, latencies = [], []
        for row in rows:
            started = time.perf_counter()
            out = model.predict(row[None, :])
            latencies.append((time.perf_counter() - started) * 1000.0)
            outputs.append(out[0].tolist())
    except RuntimeLayerError as exc:
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    return json.dumps({"outputs": outputs, "latencies_ms": latencies})


def _child() -> int:
    print(_answer(json.loads(sys.stdin.read())))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
