"""Shared test fixtures: a real Mosquitto broker per session and real models built by the project."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.broker import MosquittoBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One real mosquitto on a free loopback port for the whole session."""
    if not MosquittoBroker.available():
        pytest.fail("the mosquitto binary is missing: install it (apt-get install mosquitto) or run .ci/run")
    b = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.kill()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that stop, kill or restart it."""
    b = MosquittoBroker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.kill()


@pytest.fixture(scope="session")
def example_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build (once per session and variant) the project's real digits models; returns the variant's folder."""
    from fleet.modelgen import build_example

    root = Path(os.environ["EDGEFLEET_TEST_MODELS"]) if "EDGEFLEET_TEST_MODELS" in os.environ else None
    root = root or tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(variant: str = "good") -> Path:
        if variant not in built:
            out = root / variant
            if not (out / "card.json").exists():
                build_example(out, variant=variant)
            built[variant] = out
        return built[variant]

    return get
