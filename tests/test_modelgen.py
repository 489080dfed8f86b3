"""The project's example models: real digits models in three files, a card that describes them, variants that
misbehave exactly as named, and the `fleet model` commands."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.runtime import InferenceFailed, Model, load_model
from agent.telemetry import WindowAggregator
from fleet.cli import main as fleet
from fleet.examples.modelgen import VARIANTS, build_example, confidence_bins, digits_split, feature_histogram

FILES = ("float.onnx", "int8.onnx", "int8.tflite")
ModelDir = Callable[[str], Path]


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split(0)
    return x_test, y_test


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def _predictions(path: Path, x: np.ndarray) -> np.ndarray:
    with load_model(path, threads=1) as model:
        return model.predict(x).argmax(axis=1)


def _accuracy(path: Path, held_out: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = held_out
    return float((_predictions(path, x) == y).mean())


def _seconds_per_call(model: Model, x: np.ndarray, calls: int = 200) -> float:
    """Best of five timed blocks: the least disturbed estimate on a shared machine."""
    model.predict(x)
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            model.predict(x)
        blocks.append((time.perf_counter() - start) / calls)
    return min(blocks)


# --- the good model and its card --------------------------------------------------------------------------------


def test_the_example_folder_holds_exactly_three_models_and_a_card(example_model: ModelDir) -> None:
    assert sorted(p.name for p in example_model("good").iterdir()) == sorted([*FILES, "card.json"])


def test_int8_models_are_within_two_points_of_the_float_model(example_model: ModelDir, held_out) -> None:
    folder = example_model("good")
    accuracy = {name: _accuracy(folder / name, held_out) for name in FILES}
    assert accuracy["float.onnx"] > 0.95
    assert accuracy["int8.onnx"] >= accuracy["float.onnx"] - 0.02
    assert accuracy["int8.tflite"] >= accuracy["float.onnx"] - 0.02
    assert {name: _card(folder)["files"][name]["accuracy"] for name in FILES} == pytest.approx(accuracy, abs=1e-4)


def test_onnx_int8_and_tflite_int8_agree_on_held_out_digits(example_model: ModelDir, held_out) -> None:
    folder, x = example_model("good"), held_out[0]
    agreement = (_predictions(folder / "int8.onnx", x) == _predictions(folder / "int8.tflite", x)).mean()
    assert agreement >= 0.98


def test_the_card_describes_the_contract_and_where_the_model_came_from(example_model: ModelDir) -> None:
    card = _card(example_model("good"))
    assert (card["name"], card["variant"], card["version"]) == ("digits", "good", "1.0.0")
    assert card["input"] == {
        "name": "input",
        "shape": [None, 64],
        "dtype": "float32",
        "range": [0.0, 1.0],
        "description": card["input"]["description"],
    }
    assert (card["output"]["shape"], card["output"]["dtype"]) == ([None, 10], "float32")
    assert card["labels"] == [str(d) for d in range(10)]
    assert card["provenance"]["data"] == "sklearn.datasets.load_digits"
    assert card["provenance"]["seed"] == 0 and "scikit-learn" in card["provenance"]["libraries"]
    assert {e["runtime"] for e in card["files"].values()} == {"onnxruntime", "tflite"}


def test_drift_bins_cover_every_feature_and_reproduce_the_reference_counts(example_model: ModelDir) -> None:
    drift = _card(example_model("good"))["drift"]
    x_train = digits_split(0)[0]
    assert drift["features"] == len(drift["edges"]) == len(drift["reference_counts"]) == 64
    for j, (edges, counts) in enumerate(zip(drift["edges"], drift["reference_counts"], strict=True)):
        assert 2 <= len(edges) <= 8 and np.all(np.diff(edges) > 0), f"feature {j}: edges {edges}"
        assert len(counts) == len(edges) + 2  # underflow, bins, overflow, NaN
        assert counts == feature_histogram(x_train[:, j], edges).tolist()
        assert sum(counts) == drift["reference_samples"] == len(x_train)
        assert counts[0] == counts[-1] == 0, "training data has no underflow and no NaN"


def test_the_calibration_table_counts_each_files_held_out_rows_per_confidence_bin_as_the_agent_bins_them(
    example_model: ModelDir, held_out
) -> None:
    """Per file: rows sum to the held-out size, correct <= rows, sum(correct) / sum(rows) is the card's accuracy, and
    the rows per bin are the confidence histogram the agent's own telemetry makes of the same outputs; the broken
    variant's files, which cannot run, have none."""
    folder, (x, y) = example_model("good"), held_out
    card = _card(folder)
    for name in FILES:
        table = card["calibration"][name]
        rows, correct = table["rows"], table["correct"]
        assert table["bins"] == len(rows) == len(correct) == 10
        assert all(isinstance(v, int) for v in rows + correct)
        assert sum(rows) == len(y)
        assert all(0 <= c <= r for c, r in zip(correct, rows, strict=True))
        assert sum(correct) / sum(rows) == pytest.approx(card["files"][name]["accuracy"], abs=5e-5)
        with load_model(folder / name, threads=1) as model:
            probs = model.predict(x)
        agg = WindowAggregator("digits", "1.0.0", card["drift"]["edges"], 10)
        agg.record(x, probs, 0.001)
        assert agg.flush()["confidence"] == rows
    assert card["calibration"]["int8.onnx"]["rows"][-1] > 0.8 * len(y), "a good model is mostly confident"
    assert _card(example_model("broken"))["calibration"] == dict.fromkeys(FILES)


def test_confidence_bins_match_the_agent_on_bin_edges_nan_and_negatives() -> None:
    probs = np.zeros((7, 10), np.float32)
    probs[:, 0] = [0.1, 0.3, 0.7, 0.9, 1.0, np.nan, -0.5]
    probs[:, 1] = [0.05, 0.2, 0.1, 0.05, 0.0, 0.0, -1.0]  # the last row: argmax column 2, at 0
    agg = WindowAggregator("m", "1", [[0.0, 1.0]] * 10, 10)
    agg.record(np.zeros((7, 10), np.float32), probs, 0.001)
    assert np.bincount(confidence_bins(probs), minlength=10).tolist() == agg.flush()["confidence"]


def test_feature_histogram_counts_underflow_overflow_and_nan_apart() -> None:
    counts = feature_histogram(np.array([-1.0, 0.0, 0.2, 0.5, 1.0, 1.5, np.nan]), [0.0, 0.5, 1.0])
    assert counts.tolist() == [1, 2, 2, 1, 1]  # [<0], [0, .5), [.5, 1] (closed), [>1], [NaN]


def test_the_smoke_test_in_the_card_passes_on_every_file(example_model: ModelDir) -> None:
    folder = example_model("good")
    smoke = _card(folder)["smoke_test"]
    x = np.array(smoke["inputs"], dtype=np.float32)
    assert x.shape == (16, 64) and smoke["latency_budget_ms"] > 0
    for name in FILES:
        with load_model(folder / name) as model:
            out = model.predict(x)
        expected = smoke["expected"][name]
        np.testing.assert_allclose(out, expected["probabilities"], atol=smoke["atol"])
        assert out.argmax(axis=1).tolist() == expected["predicted"]
        assert np.mean(np.array(expected["predicted"]) == smoke["labels"]) >= 0.9


def test_the_same_seed_builds_the_same_card(example_model: ModelDir, tmp_path: Path) -> None:
    assert build_example(tmp_path / "again", "good", seed=0) == _card(example_model("good"))


def test_an_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="good, better"):
        build_example(tmp_path, "perfect")


# --- variants misbehave as named --------------------------------------------------------------------------------


def test_better_is_at_least_as_accurate_as_good_within_a_point(example_model: ModelDir, held_out) -> None:
    good, better = example_model("good"), example_model("better")
    assert _card(better)["version"] > _card(good)["version"]
    for name in FILES:
        assert _accuracy(better / name, held_out) >= _accuracy(good / name, held_out) - 0.01


def test_inaccurate_runs_but_is_near_chance(example_model: ModelDir, held_out) -> None:
    folder = example_model("inaccurate")
    for name in FILES:
        assert _accuracy(folder / name, held_out) < 0.30


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_slow_is_accurate_but_clearly_slower_than_good(example_model: ModelDir, held_out, name: str) -> None:
    x = held_out[0][:16]  # a small batch: the per-call overhead both share would blur the ratio at batch 1
    good_path, slow_path = example_model("good") / name, example_model("slow") / name
    with load_model(good_path, threads=1) as good, load_model(slow_path, threads=1) as slow:
        ratio = _seconds_per_call(slow, x) / _seconds_per_call(good, x)
    assert ratio > 3.0, f"slow/good latency ratio {ratio:.1f}"
    assert _accuracy(slow_path, held_out) > 0.93


@pytest.mark.parametrize("name", FILES)
def test_broken_loads_then_fails_every_inference_with_a_typed_error(
    example_model: ModelDir, held_out, name: str
) -> None:
    folder = example_model("broken")
    card = _card(folder)
    assert card["files"][name]["accuracy"] is None
    assert card["smoke_test"]["expected"][name] is not None, "the card still says what the model should answer"
    with load_model(folder / name) as model:
        assert model.outputs[0].shape == (None, 10)
        with pytest.raises(InferenceFailed, match="roll back"):
            model.predict(held_out[0][:1])


def test_every_variant_has_a_distinct_version(example_model: ModelDir) -> None:
    versions = [_card(example_model(v))["version"] for v in VARIANTS]
    assert len(set(versions)) == len(VARIANTS)


# --- the fleet model commands -----------------------------------------------------------------------------------


def test_fleet_model_example_builds_a_variant_and_prints_its_card(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        fleet, ["model", "example", "--out", str(tmp_path / "m"), "--variant", "broken", "--json"]
    )
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["variant"] == "broken" and (tmp_path / "m" / "int8.tflite").exists()
    assert "training MLP 64-32-10" in result.stderr


def test_fleet_model_example_prints_a_summary_and_refuses_unknown_variants(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(fleet, ["model", "example", "--out", str(tmp_path / "m"), "--variant", "inaccurate"])
    assert result.exit_code == 0, result.output
    assert "digits 1.2.0 (inaccurate, seed 0)" in result.stdout and "int8.tflite" in result.stdout
    bad = runner.invoke(fleet, ["model", "example", "--out", str(tmp_path / "x"), "--variant", "perfect"])
    assert bad.exit_code == 2 and "perfect" in bad.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["int8.onnx", "int8.tflite"])
def test_fleet_model_run_reports_accuracy_and_latency(example_model: ModelDir, name: str) -> None:
    path = example_model("good") / name
    result = CliRunner().invoke(fleet, ["model", "run", str(path), "--samples", "100", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 100 and report["accuracy"] > 0.9
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p95"]
    text = CliRunner().invoke(fleet, ["model", "run", str(path), "--samples", "20"])
    assert text.exit_code == 0 and "accuracy" in text.stdout and "latency per row" in text.stdout


def test_fleet_model_run_exits_non_zero_on_a_broken_or_missing_model(example_model: ModelDir, tmp_path: Path) -> None:
    broken = CliRunner().invoke(fleet, ["model", "run", str(example_model("broken") / "int8.onnx")])
    assert broken.exit_code == 1 and "InferenceFailed" in broken.output
    missing = CliRunner().invoke(fleet, ["model", "run", str(tmp_path / "absent.onnx")])
    assert missing.exit_code == 2


def test_fleet_model_help_describes_both_commands() -> None:
    result = CliRunner().invoke(fleet, ["model", "--help"])
    assert result.exit_code == 0 and "example" in result.output and "run" in result.output
