"""What the agent core counts for each inference call: the model's failures, not the caller's mistakes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent import runtime
from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig
from agent.core import AgentCore
from agent.reactor import Reactor
from fleet.examples.modelgen import digits_split


def make_core(tmp_path: Path, folder: Path, card: Path | None = None) -> AgentCore:
    config = AgentConfig(
        device_id="core-device",
        state_dir=tmp_path / "state",
        broker=BrokerAddress.parse("mqtt://127.0.0.1:1"),  # never started: inference needs no broker
        models=(ModelConfig("digits", folder / "int8.onnx", card or folder / "card.json", "digits:1.0.0"),),
    )
    return AgentCore(config, Reactor())


def test_a_call_of_the_wrong_type_dtype_or_shape_raises_and_is_not_counted_against_the_model(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    core = make_core(tmp_path, example_model("good"))
    _, x_test, _, _ = digits_split()
    try:
        core.predict("digits", x_test[:3])
        for bad in (x_test[:2].tolist(), x_test[:2].astype(np.float64), x_test[:2, :10], x_test[0]):
            with pytest.raises(runtime.InputError):
                core.predict("digits", bad)  # type: ignore[arg-type]
        window = core.models["digits"].telemetry.flush()
    finally:
        core.close(timeout=0)
    assert (window["count"], window["errors"]) == (3, 0)


def test_a_batch_with_nan_is_refused_and_counted_as_failed_rows_with_the_nan_binned(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    core = make_core(tmp_path, example_model("good"))
    _, x_test, _, _ = digits_split()
    rows = x_test[:4].copy()
    rows[1, 5] = np.nan
    try:
        with pytest.raises(runtime.NonFiniteInput):
            core.predict("digits", rows)
        core.predict("digits", x_test[:6])
        window = core.models["digits"].telemetry.flush()
    finally:
        core.close(timeout=0)
    assert (window["count"], window["errors"]) == (10, 4)
    assert sum(window["classes"]) == 6
    assert window["features"][5][-1] == 1  # the NaN column
    assert all(sum(row) == 10 for row in window["features"])


def test_a_card_whose_drift_edges_do_not_fit_the_model_is_refused_at_load(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    folder = example_model("good")
    card = json.loads((folder / "card.json").read_text())
    card["drift"]["edges"] = card["drift"]["edges"][:10]
    short = tmp_path / "card.json"
    short.write_text(json.dumps(card))
    with pytest.raises(runtime.UnsupportedModel, match=r"edges for 10 features, the model takes 64.*fix the card"):
        make_core(tmp_path, folder, short)
