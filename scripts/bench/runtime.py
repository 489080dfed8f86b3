"""Benchmark the agent's runtime layer against the raw runtime call, and the memory one runtime plus a model costs.

Latency: per-inference time through ``agent.runtime`` vs the bare runtime API on the same int8 digits model in the
same process: ONNX Runtime ``InferenceSession.run``, and LiteRT ``set_tensor`` + ``invoke`` + ``get_tensor`` with
the same quantize/dequantize math the layer does (a TFLite caller has to do it too). Raw and layer calls alternate
in blocks and the best block of each counts, so a noisy neighbour on the machine hits both alike.

Memory: VmRSS (from /proc/self/status) of a fresh Python process per runtime, after importing numpy, after
importing the runtime, and after loading the model through the layer and running it once.

    python scripts/bench/runtime.py [--models DIR] [--blocks 15] [--json]

Without ``--models`` the good digits example is built into a temporary folder first (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchinfo
import numpy as np

TARGET_RATIO = 1.10
TARGET_RSS_MB = 60.0
BATCHES = (1, 32)
FILES = {"onnxruntime": "int8.onnx", "tflite": "int8.tflite"}


def _raw_onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The bare ONNX Runtime call, with the session options the layer uses at threads=1."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    input_name, output_names = session.get_inputs()[0].name, [session.get_outputs()[0].name]
    return lambda x: session.run(output_names, {input_name: x})[0]


def _raw_tflite(path: Path, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """The bare LiteRT call, input resized to ``batch``, with the layer's quantize and dequantize math."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [batch, inp["shape"][1]], strict=True)
    interp.allocate_tensors()
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    inv, zp, lo, hi = np.float32(1 / in_scale), np.float32(in_zp), np.float32(-128), np.float32(127)
    table = (np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32) - np.float32(out_zp)) * np.float32(
        out_scale
    )
    in_index, out_index = inp["index"], out["index"]

    def call(x: np.ndarray) -> np.ndarray:
        t = x * inv
        t += zp
        np.rint(t, out=t)
        np.minimum(t, hi, out=t)
        np.maximum(t, lo, out=t)
        interp.set_tensor(in_index, t.astype(np.int8))
        interp.invoke()
        return table[interp.get_tensor(out_index).view(np.uint8)]

    return call


def _with_nan_scan(raw: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """The raw call plus the layer's NaN/inf check: what the policy alone costs, measured where it runs."""

    def call(x: np.ndarray) -> np.ndarray:
        math.isfinite(np.vdot(x, x))
        return raw(x)

    return call


def _per_call(fn: Callable[[np.ndarray], Any], x: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls


def latency(models: Path, blocks: int) -> list[dict[str, Any]]:
    from agent.runtime import load_model
    from fleet.examples.modelgen import digits_split

    x_all = digits_split(0)[1]
    rows = []
    for runtime, name in FILES.items():
        path = models / name
        for batch in BATCHES:
            x = np.ascontiguousarray(x_all[:batch])
            model = load_model(path, threads=1)
            raw = _raw_onnx(path) if runtime == "onnxruntime" else _raw_tflite(path, batch)
            np.testing.assert_allclose(model.predict(x), raw(x), atol=1e-6)  # same answers, and both warmed up
            calls = max(200, 20_000 // batch)
            scanned = _with_nan_scan(raw)
            raw_t, scan_t, layer_t = [], [], []
            for _ in range(blocks):
                raw_t.append(_per_call(raw, x, calls))
                scan_t.append(_per_call(scanned, x, calls))
                layer_t.append(_per_call(model.predict, x, calls))
            model.close()
            raw_us, scan_us, layer_us = min(raw_t) * 1e6, min(scan_t) * 1e6, min(layer_t) * 1e6
            rows.append(
                {
                    "runtime": runtime,
                    "file": name,
                    "batch": batch,
                    "raw_us": round(raw_us, 2),
                    "layer_us": round(layer_us, 2),
                    "overhead_us": round(layer_us - raw_us, 2),
                    "of_which_nan_scan_us": round(scan_us - raw_us, 2),
                    "ratio": round(layer_us / raw_us, 3),
                }
            )
    return rows


# Runs in a fresh interpreter (python -c) so the first reading is a bare Python: print VmRSS after each step.
_RSS_CHILD = """
import json, sys

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

runtime, path = sys.argv[1], sys.argv[2]
steps = {"python": rss()}
import numpy as np
steps["numpy"] = rss()
if runtime == "onnxruntime":
    import onnxruntime
else:
    import ai_edge_litert.interpreter
steps["runtime_imported"] = rss()
from agent.runtime import load_model
steps["layer_imported"] = rss()
model = load_model(path, threads=1)
model.predict(np.zeros((1, 64), np.float32))
steps["model_loaded"] = rss()
print(json.dumps({k: round(v, 1) for k, v in steps.items()}))
"""


def memory(models: Path) -> list[dict[str, Any]]:
    """Each runtime in its own fresh process. Bytecode is cached first (as ``pip install`` does on a device), so the
    figures do not include compiling the project's own modules."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-pycache-") as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPYCACHEPREFIX": pycache}
        for runtime, name in FILES.items():
            for _ in range(2):  # the first run fills the bytecode cache, the second is measured
                out = subprocess.run(
                    [sys.executable, "-c", _RSS_CHILD, runtime, str(models / name)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
            rows.append({"runtime": runtime, "file": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def machine() -> dict[str, Any]:
    import ai_edge_litert
    import onnxruntime

    from agent import __version__

    return {
        **benchinfo.machine(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
        "edgefleet": __version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="folder from `fleet model example` (default: build one)")
    parser.add_argument("--blocks", type=int, default=15, help="alternating timing blocks per case")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        models = args.models
        if models is None:
            from fleet.examples.modelgen import build_example

            models = Path(tmp) / "good"
            build_example(models, "good")
        result = {"machine": machine(), "latency": latency(models, args.blocks), "memory": memory(models)}
    result["targets"] = {
        "ratio_batch1_max": TARGET_RATIO,
        "ratio_batch1_met": all(r["ratio"] <= TARGET_RATIO for r in result["latency"] if r["batch"] == 1),
        "rss_mb_max": TARGET_RSS_MB,
        "rss_met": all(r["model_loaded"] <= TARGET_RSS_MB for r in result["memory"]),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    m = result["machine"]
    print(f"{m['cpu']}, {m['nproc']} CPUs; onnxruntime {m['onnxruntime']}, ai-edge-litert {m['ai_edge_litert']}")
    print(f"\n{'runtime':<12} {'batch':>5} {'raw us':>9} {'layer us':>9} {'+us':>6} {'(scan)':>7} {'ratio':>6}")
    for r in result["latency"]:
        print(
            f"{r['runtime']:<12} {r['batch']:>5} {r['raw_us']:>9.2f} {r['layer_us']:>9.2f} "
            f"{r['overhead_us']:>6.2f} {r['of_which_nan_scan_us']:>7.2f} {r['ratio']:>6.3f}"
        )
    print(f"\n{'VmRSS MB':<12} {'python':>7} {'+numpy':>7} {'+runtime':>9} {'+layer':>7} {'+model':>7}")
    for r in result["memory"]:
        print(
            f"{r['runtime']:<12} {r['python']:>7.1f} {r['numpy']:>7.1f} {r['runtime_imported']:>9.1f} "
            f"{r['layer_imported']:>7.1f} {r['model_loaded']:>7.1f}"
        )
    t = result["targets"]
    print(f"\nbatch-1 ratio <= {TARGET_RATIO}: {'met' if t['ratio_batch1_met'] else 'NOT met'}")
    print(f"RSS <= {TARGET_RSS_MB:.0f} MB: {'met' if t['rss_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
