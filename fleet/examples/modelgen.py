"""The project's own example models: real, quantized, and built from data that ships inside scikit-learn.

Tests, the simulator and the demo need models that behave like releases do: one that is good, one that is better,
and ones that are inaccurate, slow or broken. :func:`build_example` trains a small MLP on scikit-learn's bundled
digits (nothing is downloaded), exports it three ways and writes a model card:

- ``float.onnx``: the float network (Gemm, Relu, Softmax), dynamic batch.
- ``int8.onnx``: the same, statically quantized by ``onnxruntime.quantization`` (QDQ, per-tensor int8,
  MinMax-calibrated on the training rows).
- ``int8.tflite``: the same network as int8 FULLY_CONNECTED layers and an int8 SOFTMAX
  (:mod:`fleet.examples.tflite_export`).
- ``card.json``: schemas, per-file accuracy on held-out digits, the drift reference, the per-file confidence
  calibration (:func:`calibration_table`), a smoke test and provenance.

Contract of every file: input float32 ``[batch, 64]`` = the 8x8 pixels / 16 (so 0..1), output float32
``[batch, 10]`` softmax probabilities. The card is deterministic for a given variant, seed and library versions.

Heavy imports (scikit-learn, onnx, onnxruntime) happen inside the functions: the ``fleet`` CLI imports this module
for :data:`VARIANTS` and must start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.files import write_atomic
from agent.logs import event
from agent.protocol import CONFIDENCE_BINS

log = logging.getLogger(__name__)

NAME = "digits"
FEATURES = 64
CLASSES = 10
#: The files :func:`build_example` writes, besides ``card.json``.
FILES = ("float.onnx", "int8.onnx", "int8.tflite")
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
TEST_SIZE = 0.25
SMOKE_SAMPLES = 16
#: Per-feature drift bins: at most this many edges, from training quantiles.
MAX_BIN_EDGES = 8
#: Pixel values are multiples of 1/16; a constant feature gets one bin this wide.
_PIXEL_STEP = 1.0 / 16.0
_OPSET = 17
_IR_VERSION = 9  # onnxruntime 1.20, the oldest the agent supports, reads IR <= 10


@dataclass(frozen=True)
class _Recipe:
    hidden: tuple[int, ...]
    max_iter: int
    version: str
    summary: str
    init_offset: int = 0
    shuffle_labels: bool = False
    broken: bool = False
    #: Extra float work appended to the ONNX files' output (exact: identity matrices), in 1024x1024 matmuls a row.
    slow_layers: int = 0


_RECIPES: dict[str, _Recipe] = {
    "good": _Recipe(hidden=(32,), max_iter=300, version="1.0.0", summary="MLP 64-32-10: the reference release"),
    "better": _Recipe(
        hidden=(64,),
        max_iter=300,
        version="1.1.0",
        summary="MLP 64-64-10, another initialisation: a second good release",
        init_offset=1,
    ),
    "inaccurate": _Recipe(
        hidden=(32,),
        max_iter=100,
        version="1.2.0",
        summary="MLP 64-32-10 trained on shuffled labels: loads and runs, accuracy near chance",
        shuffle_labels=True,
    ),
    "slow": _Recipe(
        hidden=(1024, 1024),
        max_iter=8,  # enough for ~97%; each epoch of this size costs about a second
        version="1.3.0",
        summary="MLP 64-1024-1024-10 (ONNX: plus eight exact identity layers of 1024): accurate, hundreds of times "
        "the work per row",
        slow_layers=8,
    ),
    "broken": _Recipe(
        hidden=(32,),
        max_iter=300,
        version="1.4.0",
        summary="the good network plus an out-of-range Gather: loads, then fails every inference",
        broken=True,
    ),
}
#: Variant names :func:`build_example` accepts.
VARIANTS: tuple[str, ...] = tuple(_RECIPES)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``: the model contract's float32 features and int labels, split 75/25,
    stratified, by ``seed``. The card of a model built with ``seed`` is measured on this ``x_test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def build_example(
    out_dir: Path, variant: str = "good", seed: int = 0, *, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train, export and measure one variant into ``out_dir`` (``float.onnx``, ``int8.onnx``, ``int8.tflite``,
    ``card.json``); return the card. ``card.json`` is written last, so its presence means the folder is complete.
    ``progress`` receives a short line per step."""
    if variant not in _RECIPES:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    recipe = _RECIPES[variant]
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = digits_split(seed)
    labels = np.random.default_rng(seed).permutation(y_train) if recipe.shuffle_labels else y_train
    layers = "-".join(map(str, (FEATURES, *recipe.hidden, CLASSES)))
    say(f"training MLP {layers} on {len(x_train)} digits (seed {seed})")
    clf = _train(recipe, x_train, labels, seed)

    say("exporting float.onnx, quantizing int8.onnx, writing int8.tflite")
    _export(out_dir, clf, x_train, broken=False, slow_layers=recipe.slow_layers)
    say(f"measuring each file on {len(x_test)} held-out digits")
    smoke_idx = np.arange(SMOKE_SAMPLES)
    intact = {name: _evaluate(out_dir / name, x_test, y_test, smoke_idx) for name in FILES}
    if recipe.broken:
        say("breaking every file (out-of-range Gather after the softmax)")
        _export(out_dir, clf, x_train, broken=True, slow_layers=recipe.slow_layers)
        measured = {name: _evaluate(out_dir / name, x_test, y_test, smoke_idx) for name in FILES}
    else:
        measured = intact

    card = {
        "card_version": 1,
        "name": NAME,
        "variant": variant,
        "version": recipe.version,
        "summary": recipe.summary,
        "created_by": {"tool": "fleet.examples.modelgen", "edgefleet": __version__},
        "labels": [str(c) for c in range(CLASSES)],
        "input": {
            "name": INPUT_NAME,
            "shape": [None, FEATURES],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "description": "8x8 grey levels (0..16) divided by 16, row-major",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [None, CLASSES],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "description": "softmax probability per digit 0..9",
        },
        "files": {name: _file_entry(out_dir / name, measured[name]["accuracy"]) for name in FILES},
        "drift": _drift_reference(x_train),
        "calibration": {name: measured[name]["calibration"] for name in FILES},
        "smoke_test": {
            "inputs": x_test[smoke_idx].tolist(),
            "labels": y_test[smoke_idx].tolist(),
            # What each file should return: from the intact network, so a broken file fails its smoke test.
            "expected": {name: intact[name]["smoke"] for name in FILES},
            "atol": 0.05,
            "latency_budget_ms": 50.0,
            "latency_note": "per single-row inference on a Raspberry Pi class CPU; catches hangs, not mild slowness",
        },
        "provenance": {
            "data": "sklearn.datasets.load_digits",
            "split": {"test_size": TEST_SIZE, "stratified": True, "random_state": seed},
            "seed": seed,
            "train_samples": len(x_train),
            "test_samples": len(x_test),
            "labels_shuffled": recipe.shuffle_labels,
            "estimator": (
                f"sklearn.neural_network.MLPClassifier(hidden_layer_sizes={recipe.hidden}, activation='relu', "
                f"max_iter={recipe.max_iter}, random_state={seed + recipe.init_offset})"
            ),
            "train_accuracy": round(float(clf.score(x_train, labels)), 4),
            "libraries": {lib: dist_version(lib) for lib in ("scikit-learn", "numpy", "onnx", "onnxruntime", "tflite")},
        },
    }
    write_atomic(out_dir / "card.json", json.dumps(card, indent=1).encode() + b"\n")
    event(
        log,
        "example_model_built",
        out_dir=str(out_dir),
        variant=variant,
        seed=seed,
        accuracy={name: card["files"][name]["accuracy"] for name in FILES},
    )
    return card


def _train(recipe: _Recipe, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=recipe.hidden,
        activation="relu",
        max_iter=recipe.max_iter,
        random_state=seed + recipe.init_offset,
    )
    with warnings.catch_warnings():
        # max_iter is the budget on purpose (the shuffled and the slow variants never "converge").
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _export(out_dir: Path, clf: Any, calibration: np.ndarray, *, broken: bool, slow_layers: int = 0) -> None:
    from fleet.examples.tflite_export import int8_mlp

    float_model = _onnx_mlp(clf.coefs_, clf.intercepts_)
    int8_model = _quantize(float_model, calibration)
    if slow_layers:
        float_model, int8_model = _slowed(float_model, slow_layers), _slowed(int8_model, slow_layers)
    if broken:
        float_model, int8_model = _out_of_range_gather(float_model), _out_of_range_gather(int8_model)
    write_atomic(out_dir / "float.onnx", float_model.SerializeToString())
    write_atomic(out_dir / "int8.onnx", int8_model.SerializeToString())
    tflite_bytes = int8_mlp(
        clf.coefs_,
        clf.intercepts_,
        calibration,
        fail_at_inference=broken,
        description=f"edgefleet {NAME} int8 MLP",
    )
    write_atomic(out_dir / "int8.tflite", tflite_bytes)


def _onnx_mlp(weights: list[np.ndarray], biases: list[np.ndarray]) -> Any:
    """The float network as ONNX: one Gemm per layer (ReLU between), softmax over classes, dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, current = [], [], INPUT_NAME
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        initializers += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"dense_{i}/weights"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"dense_{i}/bias"),
        ]
        out = f"dense_{i}/logits" if i == len(weights) - 1 else f"dense_{i}/linear"
        nodes.append(helper.make_node("Gemm", [current, f"dense_{i}/weights", f"dense_{i}/bias"], [out]))
        current = out
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"dense_{i}/relu"]))
            current = f"dense_{i}/relu"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", CLASSES])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        ir_version=_IR_VERSION,
        producer_name="edgefleet",
        producer_version=__version__,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantize(float_model: Any, calibration: np.ndarray) -> Any:
    """Static int8 QDQ quantization, per tensor, calibrated by min/max on ``calibration`` rows."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(calibration, max(1, len(calibration) // 128)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp, _quiet_quantizer():
        # From a file: given a ModelProto, quantize_static moves its weights to external data in place.
        source, out = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(float_model.SerializeToString())
        quantize_static(
            source,
            out,
            Rows(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
        )
        return onnx.load(out)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's advice to run its pre-processing (shape inference and graph fusion): this graph is built
    with full shapes and nothing to fuse, so the advice is noise on the operator's terminal."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _slowed(model: Any, layers: int, width: int = 1024) -> Any:
    """Append float work to the output that changes nothing: the probabilities padded to ``width`` columns, through
    ``layers`` identity matmuls (x * 1.0 + 0.0 is exact), and back to their columns. At batch 1 the runtime's own
    overhead hides a wide network (the 1024-1024 MLP alone predicts in 2.6x the good one's time, one latency bucket
    behind the agent's overhead); this is the work that makes `slow` slow per row on any runtime build."""
    import onnx
    from onnx import helper, numpy_helper

    slowed = onnx.ModelProto()
    slowed.CopyFrom(model)
    graph = slowed.graph
    intact = f"{OUTPUT_NAME}/fast"
    for node in graph.node:
        node.output[:] = [intact if o == OUTPUT_NAME else o for o in node.output]
    pad = np.eye(CLASSES, width, dtype=np.float32)
    graph.initializer.append(numpy_helper.from_array(pad, "slow/pad"))
    graph.initializer.append(numpy_helper.from_array(np.eye(width, dtype=np.float32), "slow/identity"))
    graph.initializer.append(numpy_helper.from_array(pad.T.copy(), "slow/unpad"))
    current = "slow/wide_0"
    graph.node.append(helper.make_node("MatMul", [intact, "slow/pad"], [current]))
    for i in range(layers):
        graph.node.append(helper.make_node("MatMul", [current, "slow/identity"], [f"slow/wide_{i + 1}"]))
        current = f"slow/wide_{i + 1}"
    graph.node.append(helper.make_node("MatMul", [current, "slow/unpad"], [OUTPUT_NAME]))
    return slowed


def _out_of_range_gather(model: Any) -> Any:
    """Append ``Gather(probabilities, [0..8, 10], axis=1)``: the graph checks and loads, and every run fails."""
    import onnx
    from onnx import helper, numpy_helper

    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    graph = broken.graph
    intact = f"{OUTPUT_NAME}/intact"
    for node in graph.node:
        node.output[:] = [intact if o == OUTPUT_NAME else o for o in node.output]
    index = np.array([*range(CLASSES - 1), CLASSES], dtype=np.int64)
    graph.initializer.append(numpy_helper.from_array(index, "broken/indices"))
    graph.node.append(helper.make_node("Gather", [intact, "broken/indices"], [OUTPUT_NAME], axis=1))
    return broken


def _evaluate(path: Path, x: np.ndarray, y: np.ndarray, smoke_idx: np.ndarray) -> dict[str, Any]:
    """Accuracy on (x, y) and the smoke rows' outputs, through the agent's runtime layer; ``None`` where the file
    cannot run (it is broken, or no runtime for it is installed here)."""
    from agent.runtime import InferenceFailed, RuntimeNotInstalled, load_model

    try:
        with load_model(path, threads=1) as model:
            probabilities = model.predict(x)
    except (InferenceFailed, RuntimeNotInstalled) as exc:
        event(log, "example_model_not_measured", file=path.name, reason=str(exc))
        return {"accuracy": None, "smoke": None, "calibration": None}
    predicted = probabilities.argmax(axis=1)
    smoke = probabilities[smoke_idx]
    return {
        "accuracy": round(float((predicted == y).mean()), 4),
        "calibration": calibration_table(probabilities, y),
        "smoke": {"probabilities": np.round(smoke, 4).tolist(), "predicted": smoke.argmax(axis=1).tolist()},
    }


def confidence_bins(probabilities: np.ndarray) -> np.ndarray:
    """Each row's top-1 confidence bin, exactly as the agent's telemetry bins it
    (``agent.telemetry.WindowAggregator._absorb_outputs``, which has no public function to reuse): the float32
    probability of the argmax class times ``CONFIDENCE_BINS``, NaN and negatives to bin 0, capped at the last bin,
    truncated. Replicated here, in float32 like the agent, so that a row on a bin edge lands in the same bin on the
    device and in the card; ``tests/test_modelgen.py`` checks the two agree."""
    probs = np.asarray(probabilities, dtype=np.float32)
    predicted = probs.argmax(axis=1)
    scaled = probs[np.arange(len(probs)), predicted] * CONFIDENCE_BINS
    scaled[~(scaled >= 0)] = 0
    np.minimum(scaled, CONFIDENCE_BINS - 1, out=scaled)
    return scaled.astype(np.intp)


def calibration_table(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per top-1 confidence bin (:func:`confidence_bins`), how many held-out rows fall in it and how many of those
    the file predicts correctly: ``{"bins": CONFIDENCE_BINS, "rows": [...], "correct": [...]}``, integers only.

    This is what the fleet calibrates a label-free accuracy estimate on (:mod:`fleet.drift.accuracy`): a device's
    window holds the same confidence histogram, so rows x bin accuracy estimates its accuracy. It is a top-level
    card section keyed by file, beside ``files`` rather than inside ``drift``: ``drift`` describes the *inputs*
    (training rows, the same for every file), while this describes each *file's outputs* on held-out rows, and
    quantization moves confidences (the int8 files' tables differ from the float one's). A file that cannot run has
    ``null``. ``sum(correct) / sum(rows)`` is the file's ``accuracy`` in ``files`` (before its rounding)."""
    probs = np.asarray(probabilities, dtype=np.float32)
    bins = confidence_bins(probs)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    return {
        "bins": CONFIDENCE_BINS,
        "rows": np.bincount(bins, minlength=CONFIDENCE_BINS).tolist(),
        "correct": np.bincount(bins, weights=correct, minlength=CONFIDENCE_BINS).astype(np.int64).tolist(),
    }


def _file_entry(path: Path, accuracy: float | None) -> dict[str, Any]:
    data = path.read_bytes()
    runtime = "tflite" if path.suffix == ".tflite" else "onnxruntime"
    precision = "float32" if path.stem == "float" else "int8"
    return {
        "runtime": runtime,
        "precision": precision,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "accuracy": accuracy,
    }


def _drift_reference(x: np.ndarray) -> dict[str, Any]:
    """Per-feature bin edges from training quantiles, and the training rows' counts over them."""
    edges = [_bin_edges(x[:, j]) for j in range(x.shape[1])]
    return {
        "features": x.shape[1],
        "binning": (
            "per feature: underflow (x < edges[0]), then numpy.histogram bins over edges ([e_i, e_i+1), the last "
            "bin closed), then overflow (x > edges[-1]), then NaN: len(edges) + 2 counts"
        ),
        "edges": edges,
        "reference_counts": [feature_histogram(x[:, j], e).tolist() for j, e in enumerate(edges)],
        "reference_samples": len(x),
    }


def _bin_edges(column: np.ndarray) -> list[float]:
    quantiles = np.quantile(column.astype(np.float64), np.linspace(0.0, 1.0, MAX_BIN_EDGES))
    edges = np.unique(np.round(quantiles, 6))
    if len(edges) < 2:  # a constant feature (the digits' corner pixels): one bin of one pixel step
        edges = np.array([edges[0], edges[0] + _PIXEL_STEP])
    return [float(e) for e in edges]


def feature_histogram(values: np.ndarray, edges: list[float] | np.ndarray) -> np.ndarray:
    """Counts of ``values`` as the card's ``drift.binning`` describes: underflow, bins, overflow, NaN."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(edges, values, side="right")  # 0: underflow; len(edges): at or above the last edge
    idx[values == edges[-1]] = len(edges) - 1  # the last bin is closed
    idx[np.isnan(values)] = len(edges) + 1
    return np.bincount(idx, minlength=len(edges) + 2)
