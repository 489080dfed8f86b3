"""Write a dense ReLU network as a fully int8 ``.tflite`` flatbuffer, without TensorFlow.

TensorFlow's converter would pull a 500 MB dependency into the fleet manager for what is, for the project's MLPs, a
few FULLY_CONNECTED layers and a SOFTMAX. So the network is quantized here (TFLite's int8 scheme: symmetric
per-tensor int8 weights, int32 biases at ``input_scale * weight_scale``, asymmetric int8 activations calibrated by
min/max on sample data) and serialized with the generated builders of the ``tflite`` schema package.

The input and output tensors are int8 with a scale and zero point, so the agent's runtime layer quantizes and
dequantizes around the interpreter. The softmax output uses the scale 1/256 and zero point -128 that TFLite's int8
SOFTMAX requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite

_FILE_IDENTIFIER = b"TFL3"
_SCHEMA_VERSION = 3
_SOFTMAX_SCALE = 1.0 / 256.0
_SOFTMAX_ZERO_POINT = -128
#: Op versions for int8 kernels (TFLite's op_version.cc); any version the resolver registers works.
_OP_VERSIONS = {
    tflite.BuiltinOperator.FULLY_CONNECTED: 4,
    tflite.BuiltinOperator.SOFTMAX: 2,
    tflite.BuiltinOperator.GATHER: 2,
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int
    scale: float
    zero_point: int
    data: bytes = b""
    dynamic_batch: bool = False


@dataclass(frozen=True)
class _Op:
    code: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    relu: bool = False
    gather_axis: int = 0


def _activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 parameters covering [lo, hi]; the range always includes 0 so that 0 is exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0 / 255.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return float(np.float32(scale)), zero_point


def int8_mlp(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    calibration: np.ndarray,
    *,
    input_range: tuple[float, float] = (0.0, 1.0),
    dynamic_batch: bool = True,
    fail_at_inference: bool = False,
    description: str = "edgefleet int8 MLP",
) -> bytes:
    """Return the ``.tflite`` bytes of ``softmax(relu(...relu(x @ W0 + b0)...) @ Wn + bn)`` quantized to int8.

    ``weights[i]`` is ``[in, out]`` (scikit-learn's ``coefs_`` layout); ``calibration`` is float input rows used to
    pick activation ranges. With ``dynamic_batch`` the tensors are ``[1, n]`` with shape signature ``[-1, n]`` so an
    interpreter can resize the batch; without it the batch is fixed at 1. ``fail_at_inference`` appends a GATHER
    whose index is out of range: the model loads, and every invoke fails (the simulator's "broken" release).
    """
    if len(weights) != len(biases) or not weights:
        raise ValueError("need one bias per weight matrix and at least one layer")
    tensors: list[_Tensor] = []
    ops: list[_Op] = []

    def add(tensor: _Tensor) -> int:
        tensors.append(tensor)
        return len(tensors) - 1

    in_scale, in_zp = _activation_qparams(*input_range)
    features = weights[0].shape[0]
    current = add(_Tensor("input", (1, features), tflite.TensorType.INT8, in_scale, in_zp, dynamic_batch=dynamic_batch))
    activations = np.asarray(calibration, dtype=np.float64)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        last = i == len(weights) - 1
        w = np.asarray(w, dtype=np.float64)
        w_scale = float(np.float32(np.abs(w).max() / 127.0 or 1.0))
        w_q = np.clip(np.round(w.T / w_scale), -127, 127).astype(np.int8)
        bias_scale = float(np.float32(in_scale * w_scale))
        b_q = np.round(np.asarray(b, dtype=np.float64) / bias_scale).astype(np.int32)
        activations = activations @ w + b
        if not last:
            activations = np.maximum(activations, 0.0)
        out_scale, out_zp = _activation_qparams(float(activations.min()), float(activations.max()))
        w_t = add(_Tensor(f"dense_{i}/weights", w_q.shape, tflite.TensorType.INT8, w_scale, 0, w_q.tobytes()))
        b_t = add(_Tensor(f"dense_{i}/bias", b_q.shape, tflite.TensorType.INT32, bias_scale, 0, b_q.tobytes()))
        name = "logits" if last else f"dense_{i}/relu"
        out = add(
            _Tensor(name, (1, w.shape[1]), tflite.TensorType.INT8, out_scale, out_zp, dynamic_batch=dynamic_batch)
        )
        ops.append(_Op(tflite.BuiltinOperator.FULLY_CONNECTED, (current, w_t, b_t), (out,), relu=not last))
        current, in_scale = out, out_scale
    classes = weights[-1].shape[1]
    probs = add(
        _Tensor(
            "probabilities",
            (1, classes),
            tflite.TensorType.INT8,
            _SOFTMAX_SCALE,
            _SOFTMAX_ZERO_POINT,
            dynamic_batch=dynamic_batch,
        )
    )
    ops.append(_Op(tflite.BuiltinOperator.SOFTMAX, (current,), (probs,)))
    if fail_at_inference:
        index = np.array([*range(classes - 1), classes], dtype=np.int32)  # the last index is out of range
        idx = add(_Tensor("broken/indices", index.shape, tflite.TensorType.INT32, 0.0, 0, index.tobytes()))
        out = add(
            _Tensor(
                "broken/probabilities",
                (1, classes),
                tflite.TensorType.INT8,
                _SOFTMAX_SCALE,
                _SOFTMAX_ZERO_POINT,
                dynamic_batch=dynamic_batch,
            )
        )
        ops.append(_Op(tflite.BuiltinOperator.GATHER, (probs, idx), (out,), gather_axis=1))
        probs = out
    return _serialize(tensors, ops, inputs=(0,), outputs=(probs,), description=description)


def _byte_vector(b: flatbuffers.Builder, data: bytes, alignment: int = 16) -> int:
    """A [ubyte] vector aligned for the widest element it stores (TFLite reads int32 biases in place)."""
    b.StartVector(1, len(data), alignment)
    b.head -= len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return b.EndVector()


def _offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _quantization(b: flatbuffers.Builder, scale: float, zero_point: int) -> int:
    scales = b.CreateNumpyVector(np.array([scale], dtype=np.float32))
    zero_points = b.CreateNumpyVector(np.array([zero_point], dtype=np.int64))
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scales)
    tflite.QuantizationParametersAddZeroPoint(b, zero_points)
    return tflite.QuantizationParametersEnd(b)


def _int32s(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _serialize(
    tensors: Sequence[_Tensor], ops: Sequence[_Op], *, inputs: Sequence[int], outputs: Sequence[int], description: str
) -> bytes:
    b = flatbuffers.Builder(1024)
    # Buffer 0 is the empty sentinel TFLite expects; each constant tensor gets its own buffer after it.
    buffer_data: list[bytes] = [b""]
    buffer_of: list[int] = []
    for t in tensors:
        if t.data:
            buffer_data.append(t.data)
            buffer_of.append(len(buffer_data) - 1)
        else:
            buffer_of.append(0)
    buffers = []
    for data in buffer_data:
        data_off = _byte_vector(b, data) if data else None
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buffers.append(tflite.BufferEnd(b))

    tensor_offs = []
    for t, buf in zip(tensors, buffer_of, strict=True):
        name = b.CreateString(t.name)
        shape = _int32s(b, t.shape)
        signature = _int32s(b, (-1, *t.shape[1:])) if t.dynamic_batch else None
        quant = _quantization(b, t.scale, t.zero_point) if t.scale else None
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, t.dtype)
        tflite.TensorAddBuffer(b, buf)
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensor_offs.append(tflite.TensorEnd(b))

    codes = sorted({op.code for op in ops})
    code_offs = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, _OP_VERSIONS[code])
        code_offs.append(tflite.OperatorCodeEnd(b))

    op_offs = []
    for op in ops:
        options, options_type = _options(b, op)
        op_inputs = _int32s(b, op.inputs)
        op_outputs = _int32s(b, op.outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op.code))
        tflite.OperatorAddInputs(b, op_inputs)
        tflite.OperatorAddOutputs(b, op_outputs)
        tflite.OperatorAddBuiltinOptionsType(b, options_type)
        tflite.OperatorAddBuiltinOptions(b, options)
        op_offs.append(tflite.OperatorEnd(b))

    tensors_vec = _offsets(b, tensor_offs)
    inputs_vec = _int32s(b, inputs)
    outputs_vec = _int32s(b, outputs)
    ops_vec = _offsets(b, op_offs)
    graph_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs_vec)
    tflite.SubGraphAddOutputs(b, outputs_vec)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, graph_name)
    subgraph = tflite.SubGraphEnd(b)

    codes_vec = _offsets(b, code_offs)
    subgraphs_vec = _offsets(b, [subgraph])
    buffers_vec = _offsets(b, buffers)
    desc = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, _SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=_FILE_IDENTIFIER)
    return bytes(b.Output())


def _options(b: flatbuffers.Builder, op: _Op) -> tuple[int, int]:
    if op.code == tflite.BuiltinOperator.FULLY_CONNECTED:
        tflite.FullyConnectedOptionsStart(b)
        activation = tflite.ActivationFunctionType.RELU if op.relu else tflite.ActivationFunctionType.NONE
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        return tflite.FullyConnectedOptionsEnd(b), tflite.BuiltinOptions.FullyConnectedOptions
    if op.code == tflite.BuiltinOperator.SOFTMAX:
        tflite.SoftmaxOptionsStart(b)
        tflite.SoftmaxOptionsAddBeta(b, 1.0)
        return tflite.SoftmaxOptionsEnd(b), tflite.BuiltinOptions.SoftmaxOptions
    tflite.GatherOptionsStart(b)
    tflite.GatherOptionsAddAxis(b, op.gather_axis)
    return tflite.GatherOptionsEnd(b), tflite.BuiltinOptions.GatherOptions
