"""The agent's runtime layer: one interface over ONNX Runtime and TFLite, typed errors, floats in and out."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import tflite
from onnx import TensorProto, helper, numpy_helper

from agent.logs import JsonLineFormatter
from agent.runtime import (
    CorruptModel,
    InferenceFailed,
    InputError,
    ModelNotFound,
    NonFiniteInput,
    RuntimeLayerError,
    RuntimeNotInstalled,
    TensorSpec,
    UnknownFormat,
    UnsupportedModel,
    load_model,
    runtime_names,
)
from fleet.examples import tflite_export
from fleet.examples.modelgen import digits_split
from fleet.examples.tflite_export import int8_mlp

FILES = ("float.onnx", "int8.onnx", "int8.tflite")
ModelDir = Callable[[str], Path]


@pytest.fixture(scope="module")
def good(example_model: ModelDir) -> Path:
    return example_model("good")


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split(0)
    return x_test, y_test


def _onnx_weights(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The float network's layers, read back from float.onnx (Gemm weights and biases, in order)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    layers = sorted({name.split("/")[0] for name in arrays})
    return [arrays[f"{n}/weights"] for n in layers], [arrays[f"{n}/bias"] for n in layers]


# --- schema and predictions -------------------------------------------------------------------------------------


def test_onnx_model_declares_float_input_and_output_with_dynamic_batch(good: Path) -> None:
    with load_model(good / "int8.onnx") as model:
        assert model.runtime == "onnxruntime"
        assert model.inputs == [TensorSpec("input", (None, 64), "float32", None)]
        assert model.outputs == [TensorSpec("probabilities", (None, 10), "float32", None)]


def test_tflite_model_declares_int8_tensors_with_their_quantization(good: Path) -> None:
    with load_model(good / "int8.tflite") as model:
        assert model.runtime == "tflite"
        [inp], [out] = model.inputs, model.outputs
        assert (inp.name, inp.shape, inp.dtype) == ("input", (None, 64), "int8")
        assert inp.quantization == pytest.approx((1 / 255, -128))
        assert (out.shape, out.dtype) == ((None, 10), "int8")
        assert out.quantization == (1 / 256, -128)  # what TFLite's int8 softmax requires


@pytest.mark.parametrize("name", FILES)
def test_predict_takes_float_rows_and_returns_class_probabilities(good: Path, held_out, name: str) -> None:
    x, y = held_out
    with load_model(good / name) as model:
        for batch in (1, 7, 32, 1):  # TFLite resizes its input whenever the batch size changes
            out = model.predict(x[:batch])
            assert out.dtype == np.float32 and out.shape == (batch, 10)
            np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=0.03)
        assert (model.predict(x).argmax(axis=1) == y).mean() > 0.95


@pytest.mark.parametrize("name", FILES)
def test_a_batch_gives_the_same_answers_as_its_rows_one_at_a_time(good: Path, held_out, name: str) -> None:
    x = held_out[0][:20]
    with load_model(good / name) as model:
        batched = model.predict(x)
        rows = np.concatenate([model.predict(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(batched, rows, atol=1e-6)


def test_a_fixed_batch_one_tflite_model_runs_bigger_batches_row_by_row(good: Path, held_out, tmp_path: Path) -> None:
    x_train = digits_split(0)[0]
    weights, biases = _onnx_weights(good / "float.onnx")
    fixed = tmp_path / "fixed.tflite"
    fixed.write_bytes(int8_mlp(weights, biases, x_train, dynamic_batch=False))
    x = held_out[0][:9]
    with load_model(fixed) as model, load_model(good / "int8.tflite") as dynamic:
        assert model.inputs[0].shape == (1, 64)
        np.testing.assert_array_equal(model.predict(x), dynamic.predict(x))


def test_the_format_comes_from_the_content_when_the_extension_says_nothing(good: Path, tmp_path: Path) -> None:
    for name, runtime in (("int8.onnx", "onnxruntime"), ("int8.tflite", "tflite")):
        renamed = tmp_path / f"{name}.bin"
        renamed.write_bytes((good / name).read_bytes())
        with load_model(renamed) as model:
            assert model.runtime == runtime


def test_threads_caps_the_runtimes_worker_threads_without_changing_answers(good: Path, held_out) -> None:
    x = held_out[0][:64]
    process = psutil.Process()
    for name in ("int8.onnx", "int8.tflite"):
        with load_model(good / name, threads=1) as one:
            expected = one.predict(x)
            baseline = process.num_threads()
            with load_model(good / name, threads=4) as four:
                np.testing.assert_array_equal(four.predict(x), expected)
                assert (one.threads, four.threads) == (1, 4)
                assert process.num_threads() - baseline >= 3, f"{name}: 4 threads means 3 workers besides the caller"
    with pytest.raises(ValueError, match="threads"):
        load_model(good / "int8.onnx", threads=0)


def test_runtime_names_lists_what_this_machine_can_run() -> None:
    assert runtime_names() == ["onnxruntime", "tflite"]


def test_loading_logs_a_structured_event(good: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent.runtime"), load_model(good / "int8.tflite", threads=1):
        pass
    [record] = [r for r in caplog.records if r.getMessage() == "model_loaded"]
    line = json.loads(JsonLineFormatter().format(record))
    assert (line["event"], line["runtime"], line["threads"], line["input"]) == ("model_loaded", "tflite", 1, [None, 64])


# --- model file errors ------------------------------------------------------------------------------------------


def test_a_missing_file_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no model file"):
        load_model(tmp_path / "absent.onnx")


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_a_truncated_file_is_a_corrupt_model(good: Path, tmp_path: Path, name: str) -> None:
    data = (good / name).read_bytes()
    for keep in (0, 8, len(data) // 2, len(data) - 1):
        cut = tmp_path / name
        cut.write_bytes(data[:keep])
        with pytest.raises(CorruptModel, match="download the release again"):
            load_model(cut)


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_random_bytes_with_a_model_extension_are_a_corrupt_model(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(CorruptModel):
        load_model(path)


def test_a_file_no_runtime_recognises_is_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x04\x95 a pickled estimator, not a model file")
    with pytest.raises(UnknownFormat, match=r"\.onnx or \.tflite"):
        load_model(path)


def test_forcing_the_wrong_runtime_is_a_corrupt_model_and_a_bad_name_a_value_error(good: Path) -> None:
    with pytest.raises(CorruptModel):
        load_model(good / "int8.tflite", runtime="onnxruntime")
    with pytest.raises(CorruptModel):
        load_model(good / "int8.onnx", runtime="tflite")
    with pytest.raises(ValueError, match="onnxruntime, tflite"):
        load_model(good / "int8.onnx", runtime="tensorrt")


def _save_onnx(path: Path, nodes: list, output: onnx.ValueInfoProto, initializers: list | None = None) -> Path:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])], [output], initializers
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_a_model_outside_the_contract_is_refused_at_load_time(tmp_path: Path) -> None:
    labels = _save_onnx(
        tmp_path / "labels.onnx",
        [helper.make_node("ArgMax", ["input"], ["label"], axis=1)],
        helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
    )
    with pytest.raises(UnsupportedModel, match="float32"):
        load_model(labels)


def test_a_model_newer_than_the_runtime_says_to_upgrade_it(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    future_onnx = onnx.load(good / "int8.onnx")
    future_onnx.ir_version = 99
    onnx.save(future_onnx, tmp_path / "future.onnx")
    with pytest.raises(UnsupportedModel, match="upgrade onnxruntime"):
        load_model(tmp_path / "future.onnx")
    weights, biases = _onnx_weights(good / "float.onnx")
    monkeypatch.setitem(tflite_export._OP_VERSIONS, tflite.BuiltinOperator.FULLY_CONNECTED, 99)
    (tmp_path / "future.tflite").write_bytes(int8_mlp(weights, biases, digits_split(0)[0]))
    with pytest.raises(UnsupportedModel, match="upgrade ai-edge-litert"):
        load_model(tmp_path / "future.tflite")


def test_a_model_returning_another_shape_than_it_declares_fails_at_inference(tmp_path: Path, held_out) -> None:
    # Declares [batch, 10] but returns input[:, :batch]: a shape no load-time inference can see through.
    liar = _save_onnx(
        tmp_path / "liar.onnx",
        [
            helper.make_node("Shape", ["input"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
            helper.make_node("Slice", ["input", "zero", "batch", "one"], ["probabilities"]),
        ],
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("one", 1))],
    )
    with load_model(liar) as model, pytest.raises(InferenceFailed, match=r"returned shape \[4, 4\]"):
        model.predict(held_out[0][:4])


# --- input errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(64, np.float32),
        np.zeros((1, 63), np.float32),
        np.zeros((1, 8, 8), np.float32),
        np.zeros((0, 64), np.float32),
    ],
    ids=["1d", "63-features", "8x8", "empty"],
)
def test_a_wrong_shape_is_an_input_error_naming_the_expected_shape(good: Path, name: str, bad: np.ndarray) -> None:
    with load_model(good / name) as model, pytest.raises(InputError, match=r"float32 \[batch, 64\]") as err:
        model.predict(bad)
    assert err.value.expected == (None, 64)


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_a_wrong_dtype_is_an_input_error_saying_how_to_convert(good: Path, held_out, name: str) -> None:
    with load_model(good / name) as model:
        with pytest.raises(InputError, match=r"float64.*astype\(np.float32\)"):
            model.predict(held_out[0][:2].astype(np.float64))
        with pytest.raises(InputError, match=r"np\.asarray"):
            model.predict(held_out[0][:2].tolist())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FILES)
def test_nan_or_inf_rejects_the_whole_batch_and_names_the_rows(good: Path, held_out, name: str) -> None:
    x = held_out[0][:6].copy()
    x[1, 5], x[4, 0] = np.nan, -np.inf
    with load_model(good / name) as model, pytest.raises(NonFiniteInput, match=r"rows \[1, 4\]") as err:
        model.predict(x)
    assert err.value.rows == [1, 4]
    assert isinstance(err.value, InputError)


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_huge_but_finite_inputs_are_not_mistaken_for_inf(good: Path, name: str) -> None:
    x = np.full((2, 64), 3e30, np.float32)  # the squared norm overflows float32; the values do not
    with load_model(good / name) as model:
        assert np.isfinite(model.predict(x)).all()


# --- runtime availability and lifecycle -------------------------------------------------------------------------


def test_a_missing_onnx_runtime_is_reported_with_the_install_command(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # fault injection: the import now fails
    with pytest.raises(RuntimeNotInstalled, match="pip install onnxruntime"):
        load_model(good / "int8.onnx")
    assert "onnxruntime" not in runtime_names()


def _block_tflite(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)


def test_a_missing_tflite_runtime_is_reported_with_the_install_command(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _block_tflite(monkeypatch)
    with pytest.raises(RuntimeNotInstalled, match="pip install ai-edge-litert"):
        load_model(good / "int8.tflite")
    assert runtime_names() == ["onnxruntime"]


def test_tflite_runtime_alone_under_numpy_2_is_refused_with_both_fixes(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tflite-runtime 2.14 fails inside Interpreter() under numpy 2; the layer says so before trying."""
    assert np.lib.NumpyVersion(np.__version__) >= "2.0.0"
    _block_tflite(monkeypatch)
    # Only the package's presence matters: the layer refuses before touching the interpreter.
    package = types.ModuleType("tflite_runtime")
    package.__spec__ = importlib.machinery.ModuleSpec("tflite_runtime", None)
    interpreter = types.ModuleType("tflite_runtime.interpreter")
    interpreter.Interpreter = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", interpreter)
    with pytest.raises(RuntimeNotInstalled, match=r"pip install ai-edge-litert.*'numpy<2'"):
        load_model(good / "int8.tflite")
    assert "tflite" not in runtime_names()


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_a_closed_model_refuses_to_predict(good: Path, held_out, name: str) -> None:
    with load_model(good / name) as model:
        model.predict(held_out[0][:1])
    with pytest.raises(InferenceFailed, match="closed"):
        model.predict(held_out[0][:1])


def test_every_error_is_one_hierarchy() -> None:
    errors = [ModelNotFound, CorruptModel, UnknownFormat, UnsupportedModel, RuntimeNotInstalled, InputError]
    errors += [NonFiniteInput, InferenceFailed]
    assert all(issubclass(e, RuntimeLayerError) for e in errors)


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_one_model_serves_several_threads_at_once_with_the_same_answers(good: Path, held_out, name: str) -> None:
    x, _ = held_out
    with load_model(good / name) as model:
        expected = [model.predict(x[i : i + 1 + i % 3]) for i in range(60)]
        failures: list[str] = []

        def worker() -> None:
            for _ in range(5):
                for i in range(60):
                    got = model.predict(x[i : i + 1 + i % 3])
                    if not np.array_equal(got, expected[i]):
                        failures.append(f"row {i}")

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
