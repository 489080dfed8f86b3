"""One inference interface over ONNX Runtime (``.onnx``) and TFLite (``.tflite``), so the agent core, the smoke test
and the local endpoint never care which runtime a release uses.

Contract. :func:`load_model` opens a model; :meth:`Model.predict` takes float32 ``[batch, features]`` and returns
float32 ``[batch, classes]``. Quantized int8/uint8 inputs and outputs (TFLite) are quantized and dequantized inside
with the model's own scale and zero point, so callers pass and get floats. The model must have one input
``[batch, features]`` and its first output must be ``[batch, classes]``; anything else is :class:`UnsupportedModel`
at load time, not a surprise at inference time.

Runtimes are imported lazily: a device needs only the one its models use. TFLite comes from ``ai_edge_litert``
(LiteRT, the maintained successor) and falls back to ``tflite_runtime``; tflite-runtime 2.14, its last release,
fails inside ``Interpreter()`` under numpy 2, so that combination is refused up front with the fix.

NaN/inf policy: a batch holding any NaN or infinity is rejected whole with :class:`NonFiniteInput` (which names the
rows) before it reaches the runtime. Quantizing NaN to int8 is undefined and a float model would return NaN
probabilities, so there is no meaningful answer to give; telemetry counts the rejection as an error and the caller
decides whether to drop or impute the rows and retry.

Errors are one hierarchy under :class:`RuntimeLayerError`, and each message says what to do about it. Bad
arguments to :func:`load_model` (an unknown runtime name, threads < 1) are programming errors and raise ValueError.

Cost. ``predict`` adds about a microsecond to the raw runtime call (docs/performance.md), most of it the NaN/inf
check, which is one BLAS dot product (an exact scan runs only if that overflows). Names, quantization parameters
and a dequantization table are computed at load time, and a float32 array is passed through without a copy.

Batches. TFLite models declaring a dynamic batch (shape signature ``-1``) are resized when the batch size changes; a
fixed batch-1 model is run row by row. Every :class:`Model` is safe to call from several threads (a TFLite
interpreter is not, so its calls are serialized by a lock).

Size: a little over the house's 500 lines, kept as one module: it is one concept (the contract, its errors and the
two adapters that keep it), the adapters share the checks above, and the hot path's helpers are module-level names.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from agent.faults import FAULT_SEGV_WHEN, segv_when
from agent.logs import event

log = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
TFLITE = "tflite"
RUNTIMES = (ONNXRUNTIME, TFLITE)

_F32 = np.dtype(np.float32)
_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier at bytes 4..8
_ONNX_FIRST_BYTE = b"\x08"  # ModelProto field 1 (ir_version, varint), which exporters write first
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
_TFLITE_IO_TYPES = ("float32", "int8", "uint8")
# How the runtimes say "this model is newer than me" (ORT: its error classes vary by case, so the text decides).
_ORT_TOO_NEW = ("IR version", "opset", "not a registered function/op")
_TFLITE_TOO_NEW = "Didn't find op"
# Module-level names for the hot path: one dict lookup instead of two attribute lookups.
_vdot = np.vdot
_isfinite = math.isfinite


class RuntimeLayerError(Exception):
    """Base of every error the runtime layer raises about a model, a runtime or an input."""


class ModelNotFound(RuntimeLayerError):
    """The model file does not exist or cannot be read."""


class CorruptModel(RuntimeLayerError):
    """The file has a known format but the runtime cannot parse it (truncated, damaged, not really a model)."""


class UnknownFormat(RuntimeLayerError):
    """Neither the file's content nor its extension says which runtime should run it."""


class UnsupportedModel(RuntimeLayerError):
    """The runtime parsed the model, but it does not fit the contract or uses ops this runtime lacks."""


class RuntimeNotInstalled(RuntimeLayerError):
    """The runtime the model needs cannot be imported on this machine."""


class InputError(RuntimeLayerError, ValueError):
    """The input is not float32 ``[batch, features]``; ``expected`` is the shape the model takes."""

    def __init__(self, message: str, expected: tuple[int | None, ...]) -> None:
        super().__init__(message)
        self.expected = expected


class NonFiniteInput(InputError):
    """The batch holds NaN or infinity (``rows`` lists which rows) and was rejected whole."""

    def __init__(self, message: str, expected: tuple[int | None, ...], rows: list[int]) -> None:
        super().__init__(message, expected)
        self.rows = rows


class InferenceFailed(RuntimeLayerError):
    """The runtime failed while running a valid input, or returned an output that breaks the contract."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output as the runtime declares it. ``None`` in ``shape`` is a dynamic dimension;
    ``quantization`` is ``(scale, zero_point)`` for quantized tensors and ``None`` for float ones."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    quantization: tuple[float, int] | None = None


def runtime_names() -> list[str]:
    """Runtimes this machine can run, for the device's birth message. Checks without importing them (the import
    costs tens of MB and a second on a Pi); tflite-runtime alone under numpy 2 does not count, since it cannot run."""
    names = []
    if _spec_exists("onnxruntime"):
        names.append(ONNXRUNTIME)
    if _spec_exists("ai_edge_litert") or (_spec_exists("tflite_runtime") and not _numpy2()):
        names.append(TFLITE)
    return names


def load_model(path: str | Path, *, threads: int | None = None, runtime: str | None = None) -> Model:
    """Open a model for inference.

    The runtime is chosen by content (a TFLite flatbuffer carries ``TFL3``), then by extension (``.onnx``,
    ``.tflite``); pass ``runtime`` ("onnxruntime" or "tflite") to force one. ``threads`` caps the runtime's
    intra-op threads; ``None`` keeps the runtime's default. On a device shared with an application, 1 is usually
    best for small models.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, not {threads}")
    path = Path(path)
    started = time.perf_counter()
    try:
        head = _read_head(path)
        chosen = runtime or _detect(path, head)
        model: Model = _OnnxModel(path, threads) if chosen == ONNXRUNTIME else _TfliteModel(path, threads)
    except RuntimeLayerError as exc:
        event(log, "model_load_failed", logging.WARNING, path=str(path), error=type(exc).__name__, reason=str(exc))
        raise
    if FAULT_SEGV_WHEN in os.environ:  # a test hook (agent/faults.py), read once per load: unset, nothing is wrapped
        segv_when(model, os.environ[FAULT_SEGV_WHEN])
    event(log, "model_loaded", path=str(path), runtime=model.runtime, threads=threads,
          input=list(model.inputs[0].shape), output=list(model.outputs[0].shape),
          load_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip
    return model


class Model(abc.ABC):
    """A loaded model. Use :func:`load_model` to get one; close it (or use ``with``) to free the runtime's memory."""

    runtime: str
    path: Path
    threads: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    _features: int
    _classes: int

    @abc.abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run float32 ``[batch, features]`` through the model; return float32 ``[batch, classes]``.

        Raises :class:`InputError` (wrong type, dtype or shape), :class:`NonFiniteInput` (NaN/inf: the batch is
        rejected) or :class:`InferenceFailed` (the runtime failed, or the model is closed).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime session; ``predict`` raises :class:`InferenceFailed` afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        shapes = f"{list(self.inputs[0].shape)} -> {list(self.outputs[0].shape)}"
        return f"<Model {self.runtime} {self.path.name} {shapes}>"

    def _validate_io(self) -> tuple[int, int]:
        """Check the contract once at load; return (features, classes) for the hot path."""
        if len(self.inputs) != 1:
            raise UnsupportedModel(
                f"{self.path.name} has {len(self.inputs)} inputs; the runtime layer runs single-input models "
                "[batch, features]: re-export with one input"
            )
        for role, spec in (("input", self.inputs[0]), ("first output", self.outputs[0])):
            if len(spec.shape) != 2 or spec.shape[1] is None:
                raise UnsupportedModel(
                    f"{self.path.name}: {role} {spec.name!r} has shape {list(spec.shape)}; the runtime layer needs "
                    "[batch, n] with n fixed: re-export with that shape"
                )
        return self.inputs[0].shape[1], self.outputs[0].shape[1]  # type: ignore[return-value]

    def _wrong_shape(self, shape: tuple[int, ...], n: int) -> InferenceFailed:
        return InferenceFailed(
            f"{self.path.name} returned shape {list(shape)} for a batch of {n}, not [{n}, {self._classes}]: the model "
            "is faulty, roll back to the previous release"
        )

    def _failed(self, exc: Exception, closed: bool) -> InferenceFailed:
        if closed:
            return InferenceFailed(f"{self.path.name} is closed: load it again with load_model()")
        reason = str(exc).rstrip(".")
        return InferenceFailed(
            f"{self.runtime} failed running {self.path.name}: {reason}. The model is faulty or does not suit this "
            "runtime version: roll back to the previous release"
        )


class _OnnxModel(Model):
    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeNotInstalled(
                f"{path.name} needs ONNX Runtime, which is not installed: pip install onnxruntime (or edgefleet[agent])"
            ) from exc
        self.runtime, self.path, self.threads = ONNXRUNTIME, path, threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 4  # fatal only: its errors come back to us as exceptions, its warnings are noise
        # Idle worker threads sleep instead of spinning: the device's application needs those cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            if type(exc).__name__ == "NotImplemented" or any(sign in str(exc) for sign in _ORT_TOO_NEW):
                raise UnsupportedModel(
                    f"{path.name} needs something onnxruntime {ort.__version__} lacks ({exc}): upgrade onnxruntime "
                    "or export with a lower opset / IR version"
                ) from exc
            raise CorruptModel(
                f"{path.name} is not a loadable ONNX model ({exc}): download the release again; if it persists, "
                "the release itself is bad"
            ) from exc
        self.inputs = [_ort_spec(a) for a in session.get_inputs()]
        self.outputs = [_ort_spec(a) for a in session.get_outputs()]
        self._features, self._classes = self._validate_io()
        for role, spec in (("input", self.inputs[0]), ("first output", self.outputs[0])):
            if spec.dtype != "float32":
                raise UnsupportedModel(
                    f"{path.name}: {role} {spec.name!r} is {spec.dtype}; ONNX models must take and return float32 "
                    "(quantize inside the graph with QuantizeLinear/DequantizeLinear)"
                )
        self._input_name = self.inputs[0].name
        self._output_names = [self.outputs[0].name]
        self._session: Any = session
        self._run: Callable[..., list[np.ndarray]] | None = session.run

    def predict(self, x: np.ndarray) -> np.ndarray:
        # The checks are inlined (not a helper call): at batch 1 every 100 ns is 1% of the inference.
        if not (isinstance(x, np.ndarray) and x.dtype == _F32 and x.ndim == 2 and x.shape[1] == self._features):
            raise _input_error(x, self._features)
        n = x.shape[0]
        if not n:
            raise _input_error(x, self._features)
        if not _isfinite(_vdot(x, x)):
            _reject_non_finite(x, self._features)
        try:
            out = self._run(self._output_names, {self._input_name: x})[0]  # type: ignore[misc]
        except Exception as exc:
            raise self._failed(exc, self._run is None) from exc
        if out.shape != (n, self._classes):  # ORT knows the output shape only once it has run
            raise self._wrong_shape(out.shape, n)
        return out

    def close(self) -> None:
        self._run = None
        self._session = None


class _TfliteModel(Model):
    def __init__(self, path: Path, threads: int | None) -> None:
        interpreter_class = _tflite_interpreter_class(path)
        self.runtime, self.path, self.threads = TFLITE, path, threads
        try:
            interp = interpreter_class(model_path=str(path), num_threads=threads)
        except ValueError as exc:
            if _TFLITE_TOO_NEW in str(exc):
                raise UnsupportedModel(
                    f"this TFLite runtime lacks an op {path.name} uses ({exc}): upgrade ai-edge-litert or re-export "
                    "for an older runtime"
                ) from exc
            raise CorruptModel(
                f"{path.name} is not a valid TFLite model ({exc}): download the release again; if it persists, "
                "the release itself is bad"
            ) from exc
        try:
            interp.allocate_tensors()
        except RuntimeError as exc:
            raise UnsupportedModel(
                f"this TFLite runtime cannot prepare {path.name} ({exc}): it uses an op or shape the runtime lacks; "
                "upgrade ai-edge-litert or re-export"
            ) from exc
        in_details, out_details = interp.get_input_details(), interp.get_output_details()
        self.inputs = [_tflite_spec(d) for d in in_details]
        self.outputs = [_tflite_spec(d) for d in out_details]
        self._features, self._classes = self._validate_io()
        for role, spec in (("input", self.inputs[0]), ("first output", self.outputs[0])):
            if spec.dtype not in _TFLITE_IO_TYPES or (spec.dtype != "float32" and spec.quantization is None):
                raise UnsupportedModel(
                    f"{path.name}: {role} {spec.name!r} is {spec.dtype} without usable quantization; TFLite models "
                    "must take and return float32, or int8/uint8 with a scale and zero point"
                )
        self._interp: Any = interp
        self._lock = threading.Lock()
        self._in_index = in_details[0]["index"]
        self._out_index = out_details[0]["index"]
        self._dynamic = self.inputs[0].shape[0] is None
        self._batch = int(in_details[0]["shape"][0])
        self._check_allocated_output(self._batch)
        # Quantization constants, precomputed: clamp(rint(x / scale) + zero_point) in, (q - zero_point) * scale out.
        self._qtype: np.dtype | None = None
        if self.inputs[0].quantization is not None:
            scale, zero_point = self.inputs[0].quantization
            self._qtype = np.dtype(self.inputs[0].dtype)
            self._inv_scale, self._zero_point = np.float32(1.0 / scale), np.float32(zero_point)
            self._lo, self._hi = np.float32(np.iinfo(self._qtype).min), np.float32(np.iinfo(self._qtype).max)
        self._table: np.ndarray | None = None  # output dequantization as one lookup in a 256-entry table
        if self.outputs[0].quantization is not None:
            scale, zero_point = self.outputs[0].quantization
            values = np.arange(256, dtype=np.uint8).view(self.outputs[0].dtype).astype(np.float32)
            self._table = (values - np.float32(zero_point)) * np.float32(scale)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # The checks are inlined (not a helper call): at batch 1 every 100 ns is 1% of the inference.
        if not (isinstance(x, np.ndarray) and x.dtype == _F32 and x.ndim == 2 and x.shape[1] == self._features):
            raise _input_error(x, self._features)
        n = x.shape[0]
        if not n:
            raise _input_error(x, self._features)
        if not _isfinite(_vdot(x, x)):
            _reject_non_finite(x, self._features)
        if n != self._batch and not self._dynamic:
            return self._predict_fixed_batch(x)
        if self._qtype is not None:
            t = x * self._inv_scale
            t += self._zero_point
            np.rint(t, out=t)
            np.minimum(t, self._hi, out=t)
            np.maximum(t, self._lo, out=t)
            x = t.astype(self._qtype)
        with self._lock:  # an interpreter is not thread-safe; uncontended, the lock costs ~50 ns
            if n != self._batch:
                self._resize(n)
            interp = self._interp
            try:
                interp.set_tensor(self._in_index, x)
                interp.invoke()
                out = interp.get_tensor(self._out_index)
            except Exception as exc:
                raise self._failed(exc, interp is None) from exc
        return out if self._table is None else self._table[out.view(np.uint8)]

    def _predict_fixed_batch(self, x: np.ndarray) -> np.ndarray:
        """A model without a dynamic batch dimension: run batch-1 models row by row, refuse other sizes."""
        if self._batch != 1:
            raise InputError(
                f"{self.path.name} has a fixed batch of {self._batch}: pass exactly {self._batch} rows",
                (self._batch, self._features),
            )
        return np.concatenate([self.predict(x[i : i + 1]) for i in range(x.shape[0])])

    def _resize(self, n: int) -> None:
        """Resize the batch (TFLite keeps the allocation until the size changes again) and check the new output."""
        interp = self._interp
        try:
            interp.resize_tensor_input(self._in_index, [n, self._features], strict=True)
            interp.allocate_tensors()
        except Exception as exc:
            raise self._failed(exc, interp is None) from exc
        self._batch = n
        self._check_allocated_output(n)

    def _check_allocated_output(self, n: int) -> None:
        """TFLite fixes output shapes at allocation, so the contract is checked here once, not on every call."""
        shape = tuple(self._interp.get_output_details()[0]["shape"])
        if shape != (n, self._classes):
            raise self._wrong_shape(shape, n)

    def close(self) -> None:
        self._interp = None


def _reject_non_finite(x: np.ndarray, features: int) -> None:
    """Raise :class:`NonFiniteInput` unless the squared norm only overflowed (huge but finite values)."""
    finite_rows = np.isfinite(x).all(axis=1)
    if finite_rows.all():
        return
    rows = np.flatnonzero(~finite_rows).tolist()
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    raise NonFiniteInput(
        f"input rows [{shown}] hold NaN or infinity; the batch was rejected: drop or impute those rows and retry",
        (None, features),
        rows,
    )


def _input_error(x: object, features: int) -> InputError:
    expected = f"float32 [batch, {features}]"
    if not isinstance(x, np.ndarray):
        msg = f"input is a {type(x).__name__}; the model takes a numpy array {expected}: use np.asarray(x, np.float32)"
    elif x.dtype != _F32:
        msg = f"input dtype is {x.dtype}; the model takes {expected}: convert with x.astype(np.float32)"
    elif x.ndim == 2 and x.shape[1] == features:
        msg = f"input is an empty batch; the model takes {expected} with batch >= 1"
    else:
        msg = f"input shape is {list(x.shape)}; the model takes {expected}: reshape to (-1, {features})"
    return InputError(msg, (None, features))


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


def _tflite_spec(details: dict[str, Any]) -> TensorSpec:
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) else details["shape"]
    scale, zero_point = details["quantization"]
    quantization = (float(scale), int(zero_point)) if scale else None
    shape = tuple(None if d < 0 else int(d) for d in dims)
    return TensorSpec(details["name"], shape, np.dtype(details["dtype"]).name, quantization)


def _tflite_interpreter_class(path: Path) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pass
    else:
        return Interpreter
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    except ImportError as exc:
        raise RuntimeNotInstalled(
            f"{path.name} needs a TFLite runtime and none is installed: pip install ai-edge-litert "
            "(or edgefleet[tflite])"
        ) from exc
    if _numpy2():
        raise RuntimeNotInstalled(
            f"{path.name} needs TFLite; only tflite-runtime is installed and it cannot run under numpy "
            f"{np.__version__}: pip install ai-edge-litert (preferred) or 'numpy<2'"
        )
    event(log, "tflite_fallback", runtime="tflite_runtime")
    return Interpreter


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(8)
    except FileNotFoundError as exc:
        raise ModelNotFound(f"no model file at {path}: check the path or reinstall the release") from exc
    except OSError as exc:
        raise ModelNotFound(f"cannot read model file {path} ({exc.strerror}): check the path and permissions") from exc


def _detect(path: Path, head: bytes) -> str:
    if head[4:8] == _TFLITE_IDENTIFIER:
        return TFLITE
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        raise CorruptModel(
            f"{path.name} has no TFLite file identifier (empty, truncated or not a TFLite model): "
            "download the release again"
        )
    if suffix == ".onnx" or head[:1] == _ONNX_FIRST_BYTE:
        return ONNXRUNTIME
    raise UnknownFormat(
        f"cannot tell which runtime runs {path.name}: it is not a TFLite flatbuffer and has no .onnx extension; "
        "rename it to .onnx or .tflite, or pass runtime="
    )


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _numpy2() -> bool:
    return np.lib.NumpyVersion(np.__version__) >= "2.0.0"
