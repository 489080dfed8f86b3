"""Installing releases on a device, end to end: real signed TUF metadata served over HTTP on loopback, director-signed
desired states delivered retained over a real broker, the project's real models, the real agent core (in process,
with its reactor on a thread, or as an `edge-agent run` child that is SIGKILLed), real SQLite and real smoke-test
child processes. Faults are injected only where the device cannot be made to fail honestly on demand: a smoke-test
child that kills itself or hangs (EDGEFLEET_FAULT_SMOKE), an agent that SIGKILLs itself right after persisting a
state (EDGEFLEET_FAULT_KILL_AT), a device without the TFLite runtime, a tiny tmpfs as a full disk, a clock set back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_fixtures import EventTap, Fleet, deliver, new_device_id, retained_birth, tiny_tmpfs, wait_for
from securesystemslib.signer import CryptoSigner

from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig, UpdateConfig
from agent.core import AgentCore
from agent.reactor import Reactor
from agent.telemetry import WindowAggregator
from agent.update import smoke
from agent.update.journal import FAULT_KILL_AT
from agent.update.probation import ProbationLimits, Verdict
from agent.update.smoke import FAULT_SMOKE, run_smoke_test
from fleet.broker import MosquittoBroker, free_port
from fleet.trust.releases import ReleaseInfo

DAY = 86400.0
INSTALL_STATES = ["DOWNLOADING", "VERIFYING", "STAGED", "SMOKE_TEST", "ACTIVATING", "PROBATION", "COMMITTED"]


def card_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "card.json").read_text())


def smoke_rows(folder: Path) -> np.ndarray:
    return np.asarray(card_of(folder)["smoke_test"]["inputs"], np.float32)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet.create(tmp_path / "fleet")
    yield f
    f.stop()


@pytest.fixture
def releases(fleet: Fleet, example_model: Callable[[str], Path]) -> dict[str, ReleaseInfo]:
    """digits 1.0.0 (the devices' factory model, good) and 1.1.0 (better), both int8 ONNX."""
    good, better = example_model("good"), example_model("better")
    return {
        "good": fleet.publish(good / "int8.onnx", "1.0.0", card_of(good)),
        "better": fleet.publish(better / "int8.onnx", "1.1.0", card_of(better)),
    }


@dataclass
class Device:
    """A real agent core with its reactor on a thread, connected to the broker, and a tap on its events."""

    config: AgentConfig
    broker_url: str
    clock: Callable[[], float]
    core: AgentCore = field(init=False)
    reactor: Reactor = field(init=False)
    tap: EventTap = field(init=False)
    running: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.tap = EventTap(self.broker_url, self.config.device_id)
        self.boot()

    def boot(self) -> None:
        self.reactor = Reactor()
        self.core = AgentCore(self.config, self.reactor, clock=self.clock)
        self.core.start()
        self.reactor.start_thread()
        self.running = True

    def shutdown(self) -> None:
        if not self.running:
            return
        self.running = False
        self.reactor.stop()
        assert self.reactor.thread is not None
        self.reactor.thread.join(10)
        self.core.close(2.0)
        self.reactor.close()

    def deliver(self, payload: bytes) -> None:
        deliver(self.broker_url, self.config.device_id, payload)

    @property
    def serving(self) -> str:
        return self.core.models["digits"].config.release

    def install(self) -> dict[str, Any]:
        return self.core.status()["models"]["digits"]["install"]

    def slots(self) -> dict[str, Any]:
        return self.core.status()["models"]["digits"]["slots"]

    def assert_serves(self, release: str, folder: Path, file: str = "int8.onnx") -> None:
        """The served model is ``release`` and answers its signed smoke samples as its card says: verified, working."""
        assert self.serving == release
        card = card_of(folder)["smoke_test"]
        outputs = self.core.predict("digits", np.asarray(card["inputs"], np.float32))
        expected = np.asarray(card["expected"][file]["probabilities"])
        assert np.abs(outputs - expected).max() <= card["atol"]


@pytest.fixture
def device(
    tmp_path: Path, broker: MosquittoBroker, fleet: Fleet, example_model: Callable[[str], Path]
) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(*, device_id: str | None = None, clock: Callable[[], float] = time.time, **update: Any) -> Device:
        device_id = device_id or new_device_id()
        root, director = fleet.enroll(tmp_path / "enrolled")
        good = example_model("good")
        settings = {"probation_inferences": 20, "probation_s": 0.5, "smoke_timeout_s": 30.0} | update
        config = AgentConfig(
            device_id=device_id,
            state_dir=tmp_path / device_id,
            broker=BrokerAddress.parse(broker.url),
            reconnect_max_s=1.0,
            models=(ModelConfig("digits", good / "int8.onnx", good / "card.json", "digits:1.0.0"),),
            update=UpdateConfig(fleet.server.url, root, director, **settings),
        )
        made.append(Device(config, broker.url, clock))
        return made[-1]

    yield make
    for d in made:
        d.shutdown()
        d.tap.close()


# --------------------------------------------------------------------------------------------------------------
# The happy path


def test_a_signed_release_is_downloaded_smoke_tested_activated_and_committed(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    broker: MosquittoBroker,
    example_model: Callable[[str], Path],
) -> None:
    d = device(probation_s=60)  # committed by 20 healthy inferences, long before 60 s
    d.assert_serves("digits:1.0.0", example_model("good"))
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))

    d.tap.wait_for("install_state", state="PROBATION")
    rows = smoke_rows(example_model("better"))
    for row in rows[:10]:
        d.core.predict("digits", row[None, :])
    d.core.predict("digits", rows[10:])  # a batch of 6 rows: 16 inferences so far
    assert d.install()["state"] == "PROBATION"
    d.core.predict("digits", rows[:4])
    committed = d.tap.wait_for("install_committed")

    assert committed["detail"]["release"] == "digits:1.1.0" and committed["detail"]["seq"] == 1
    assert committed["detail"]["inferences"] >= 20 and committed["detail"]["errors"] == 0
    assert d.tap.states() == INSTALL_STATES
    kinds = [e["type"] for e in d.tap.events if e["type"] not in ("agent_started",)]
    assert kinds == ["desired_accepted", *["install_state"] * len(INSTALL_STATES), "install_committed"]
    d.assert_serves("digits:1.1.0", example_model("better"))

    slots = d.slots()
    assert slots["active"]["release"] == "digits:1.1.0" and slots["active"]["sha256"] == releases["better"].sha256[:12]
    assert slots["previous"] == {"release": "digits:1.0.0", "counter": 0, "factory": True,
                                 "sha256": releases["good"].sha256[:12]}  # fmt: skip
    assert d.install()["last_outcome"]["outcome"] == "install_committed"

    def status_file() -> dict[str, Any] | None:  # what `edge-agent status --json` prints
        digits = json.loads((d.config.state_dir / "status.json").read_text())["models"]["digits"]
        return digits if digits["install"]["state"] == "COMMITTED" else None

    assert wait_for(status_file, 5, "status.json to show the commit")["release"] == "digits:1.1.0"

    # The fleet sees the new release in the device's retained birth.
    birth = retained_birth(broker.url, d.config.device_id)
    assert birth["models"]["digits"]["release"] == "digits:1.1.0"
    # Only the active and previous files are kept (previous is the factory model, outside the state folder).
    kept = sorted(p.name for p in (d.config.state_dir / "models" / "digits").iterdir() if p.is_file())
    assert f"{releases['better'].sha256}.onnx" in kept and sum(k.endswith(".card.json") for k in kept) == 1
    assert len(kept) == 2


# --------------------------------------------------------------------------------------------------------------
# Desired states the device must not act on: rejected with a reason, the device stays on its verified model.


def assert_rejected(d: Device, reason: str, folder: Path) -> None:
    rejected = d.tap.wait_for("desired_rejected")
    assert rejected["detail"]["reason"] == reason
    assert not d.tap.of("desired_accepted", "install_state")
    d.assert_serves("digits:1.0.0", folder)


def test_desired_state_signed_by_the_wrong_key_is_rejected(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"], signer=CryptoSigner.generate_ed25519()))
    assert_rejected(d, "bad_signature", example_model("good"))


def test_desired_state_for_another_device_is_rejected(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device()
    d.deliver(fleet.desired("some-other-device", 1, releases["better"]))
    assert_rejected(d, "wrong_device", example_model("good"))


def test_an_expired_desired_state_is_rejected(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device()
    now = time.time()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"], issued=now - 7200, expires=now - 60))
    assert_rejected(d, "expired", example_model("good"))


def test_a_replayed_older_desired_state_is_rejected_across_a_restart(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 5, releases["good"]))  # what it runs already
    unchanged = d.tap.wait_for("install_committed")
    assert unchanged["detail"] == {"release": "digits:1.0.0", "seq": 5, "reason": "", "detail": "", "unchanged": True}
    d.shutdown()
    d.boot()  # the last seq is persisted: a restart does not reopen the door to older states
    d.deliver(fleet.desired(d.config.device_id, 3, releases["better"]))
    rejected = d.tap.wait_for("desired_rejected")
    assert rejected["detail"]["reason"] == "replayed_seq"
    assert not d.tap.of("install_state")
    d.assert_serves("digits:1.0.0", example_model("good"))


def test_a_clock_set_back_rejects_fresh_states_until_it_is_right_and_does_not_stretch_probation(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    offset = [-2 * DAY]
    d = device(clock=lambda: time.time() + offset[0], probation_s=1.0)
    payload = fleet.desired(d.config.device_id, 1, releases["better"])
    d.deliver(payload)
    assert d.tap.wait_for("desired_rejected")["detail"]["reason"] == "issued_in_future"
    d.assert_serves("digits:1.0.0", example_model("good"))

    offset[0] = 0.0  # the clock is set right; the same signed state, delivered again, is now acted on
    d.deliver(payload)
    d.tap.wait_for("install_state", state="PROBATION")
    started = time.monotonic()
    offset[0] = -2 * DAY  # set back again mid-probation: probation runs on the monotonic clock
    d.tap.wait_for("install_committed")
    assert 0.8 < time.monotonic() - started < 5
    d.assert_serves("digits:1.1.0", example_model("better"))


# --------------------------------------------------------------------------------------------------------------
# Releases TUF or the device refuses before anything is installed


def assert_failed(d: Device, reason: str, folder: Path) -> dict[str, Any]:
    failed = d.tap.wait_for("install_failed")
    assert failed["detail"]["reason"] == reason, failed
    assert d.tap.states()[-2:] == ["REVERTING", "IDLE"]
    assert "ACTIVATING" not in d.tap.states()
    d.assert_serves("digits:1.0.0", folder)
    install = d.install()
    assert install["state"] == "IDLE" and install["last_outcome"]["reason"] == reason
    assert d.slots()["staged"] is None and d.slots()["active"]["factory"]
    incoming = d.config.state_dir / "models" / "digits" / "incoming"
    assert not incoming.exists() or not list(incoming.iterdir())
    return failed


def test_a_revoked_release_below_min_release_is_refused(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    fleet.repo.revoke("digits", "1.1.0")
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    assert_failed(d, "below_min_release", example_model("good"))


def test_a_release_for_a_runtime_the_device_lacks_is_refused(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in ("ai_edge_litert", "tflite_runtime"):  # a device without any TFLite runtime
        monkeypatch.setitem(sys.modules, module, None)
    tflite = fleet.publish(example_model("good") / "int8.tflite", "1.2.0", card_of(example_model("good")))
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, tflite))
    assert_failed(d, "incompatible_runtime", example_model("good"))


def test_target_bytes_tampered_on_the_server_are_refused(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    fleet.tamper(releases["better"])
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    assert_failed(d, "hash_mismatch", example_model("good"))
    assert not list((d.config.state_dir / "tuf" / "partial").iterdir())


def test_a_release_larger_than_the_device_allows_is_never_downloaded(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device(max_download_bytes=releases["better"].length - 1)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    assert "bytes >" in assert_failed(d, "too_large", example_model("good"))["detail"]["detail"]


def test_a_full_disk_during_the_download_fails_the_install_cleanly(
    device: Callable[..., Device], fleet: Fleet, tmp_path: Path, example_model: Callable[..., Path]
) -> None:
    big_file = tmp_path / "big.onnx"
    big_file.write_bytes(os.urandom(400_000))
    big = fleet.publish(big_file, "1.5.0", card_of(example_model("good")))
    device_id = new_device_id()
    with tiny_tmpfs(tmp_path / device_id / "tuf" / "partial") as partial:  # where downloads grow
        d = device(device_id=device_id)
        d.deliver(fleet.desired(device_id, 1, big))
        assert "No space left" in assert_failed(d, "disk_full", example_model("good"))["detail"]["detail"]
        assert not list(partial.iterdir())  # the partial file was removed, freeing the space
        d.shutdown()  # before the unmount


# --------------------------------------------------------------------------------------------------------------
# Signed releases that fail their smoke test in the child process


def test_a_release_that_fails_every_inference_fails_its_smoke_test(
    device: Callable[..., Device], fleet: Fleet, example_model: Callable[..., Path]
) -> None:
    broken = example_model("broken")
    release = fleet.publish(broken / "int8.onnx", "1.4.0", card_of(broken))
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, release))
    failed = assert_failed(d, "smoke_error", example_model("good"))
    assert failed["detail"]["detail"].startswith("InferenceFailed")


def test_a_release_whose_card_expects_another_models_outputs_fails_smoke_mismatch(
    device: Callable[..., Device], fleet: Fleet, example_model: Callable[..., Path]
) -> None:
    """A real mistake: the inaccurate model published with a card whose smoke test was copied from good's card.

    The card describes the inaccurate file (its ``files`` entry, so the fleet accepts the publish) but expects good's
    outputs: the device catches it before serving a single request.
    """
    inaccurate = example_model("inaccurate")
    card = {**card_of(inaccurate), "smoke_test": card_of(example_model("good"))["smoke_test"]}
    release = fleet.publish(inaccurate / "int8.onnx", "1.2.0", card)
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, release))
    failed = assert_failed(d, "smoke_mismatch", example_model("good"))
    rows, total = failed["detail"]["detail"].split()[0].split("/")
    assert total == "16" and int(rows) >= 8


def test_a_release_that_kills_its_smoke_test_process_fails_smoke_crashed(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAULT_SMOKE, "SIGKILL")  # the child loads the model, then dies as a segfaulting runtime would
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    assert assert_failed(d, "smoke_crashed", example_model("good"))["detail"]["detail"] == "signal 9 (SIGKILL)"


def test_a_release_that_hangs_its_smoke_test_fails_smoke_timeout(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAULT_SMOKE, "hang")
    d = device(smoke_timeout_s=2.0)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    assert_failed(d, "smoke_timeout", example_model("good"))


def test_the_smoke_test_judges_latency_against_the_signed_budget(example_model: Callable[..., Path]) -> None:
    good = example_model("good")
    card = card_of(good)
    passed = run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 30)
    assert passed.passed and passed.median_ms is not None and passed.median_ms < 50
    strict = {**card, "smoke_test": {**card["smoke_test"], "latency_budget_ms": 1e-6}}
    slow = run_smoke_test(good / "int8.onnx", "onnxruntime", strict, "int8.onnx", 30)
    assert (slow.passed, slow.reason) == (False, "smoke_too_slow")
    no_expectation = run_smoke_test(good / "int8.onnx", "onnxruntime", card, "other.onnx", 30)
    assert (no_expectation.passed, no_expectation.reason) == (False, "smoke_bad_card")


# --------------------------------------------------------------------------------------------------------------
# Probation, supersession, damage


def batch_one_release(fleet: Fleet, good: Path, tmp_path: Path) -> ReleaseInfo:
    """A real export mistake: good's float network with its batch dimension fixed to 1.

    Its signed samples, run one row at a time, pass the smoke test exactly; an application that sends batches gets
    an error from the runtime on every call.
    """
    import onnx

    model = onnx.load(good / "float.onnx")
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "batch1.onnx"
    onnx.save(model, path)
    return fleet.publish_like(path, "1.1.1", card_of(good), "float.onnx")


def test_errors_in_probation_roll_back_to_the_previous_release(
    device: Callable[..., Device], fleet: Fleet, tmp_path: Path, example_model: Callable[..., Path]
) -> None:
    good = example_model("good")
    release = batch_one_release(fleet, good, tmp_path)
    d = device(probation_s=60)
    d.deliver(fleet.desired(d.config.device_id, 1, release))
    d.tap.wait_for("install_state", state="PROBATION")
    assert d.serving == "digits:1.1.1"
    rows = smoke_rows(good)
    for _ in range(3):
        with contextlib.suppress(Exception):
            d.core.predict("digits", rows[:8])  # the application's batches: every one fails
    rolled_back = d.tap.wait_for("rolled_back")
    assert rolled_back["detail"]["reason"] == "probation_errors"
    assert rolled_back["detail"]["release"] == "digits:1.1.1" and rolled_back["detail"]["to"] == "digits:1.0.0"
    assert d.tap.states() == [*INSTALL_STATES[:-1], "REVERTING", "IDLE"]
    wait_for(lambda: d.serving == "digits:1.0.0", 5, "the previous release to be served again")
    d.assert_serves("digits:1.0.0", good)
    assert d.slots()["active"]["factory"] and d.install()["last_outcome"]["outcome"] == "rolled_back"


def test_probation_judges_error_rate_latency_and_time() -> None:
    """The verdicts, on a real aggregator's counts: errors fail early, latency at the end, quiet passes at T."""
    limits = ProbationLimits(inferences=20, seconds=30.0, max_error_rate=0.05, latency_p95_ms=5.0)
    agg = WindowAggregator("digits", "digits:1.1.0", [[0.0, 1.0]] * 2, 2)
    ok = np.array([[0.9, 0.1]], np.float32)
    assert limits.judge(agg.totals(), 29.0).done is False
    assert limits.judge(agg.totals(), 30.0) == limits.judge(agg.totals(), 31.0) and limits.judge(agg.totals(), 30).done
    for _ in range(19):
        agg.record(np.zeros((1, 2), np.float32), ok, 0.001)
    agg.record(np.zeros((1, 2), np.float32), None, 0.001, error=True)
    assert limits.judge(agg.totals(), 1.0).reason == ""  # 1 error in 20 is 5 %: healthy
    agg.record(np.zeros((1, 2), np.float32), None, 0.001, error=True)
    assert limits.judge(agg.totals(), 1.0).reason == "probation_errors"
    slow = WindowAggregator("digits", "digits:1.1.0", [[0.0, 1.0]] * 2, 2)
    for _ in range(20):
        slow.record(np.zeros((1, 2), np.float32), ok, 0.050)
    verdict = limits.judge(slow.totals(), 1.0)
    assert verdict.reason == "probation_latency" and "p95 latency" in verdict.detail


def test_probation_holds_the_median_against_the_latency_budget_when_time_ends_on_few_inferences() -> None:
    """A p95 of three rows is the slowest one: one pause of a busy machine must not fail a release; a release slow
    on most of its few rows still does."""
    limits = ProbationLimits(inferences=20, seconds=30.0, max_error_rate=0.05, latency_p95_ms=5.0)
    ok = np.array([[0.9, 0.1]], np.float32)
    paused = WindowAggregator("digits", "digits:1.1.0", [[0.0, 1.0]] * 2, 2)
    for latency_s in (0.001, 0.001, 0.080):
        paused.record(np.zeros((1, 2), np.float32), ok, latency_s)
    assert limits.judge(paused.totals(), 30.0) == Verdict(True)
    slow = WindowAggregator("digits", "digits:1.1.0", [[0.0, 1.0]] * 2, 2)
    for latency_s in (0.001, 0.080, 0.080):
        slow.record(np.zeros((1, 2), np.float32), ok, latency_s)
    verdict = limits.judge(slow.totals(), 30.0)
    assert verdict.reason == "probation_latency" and verdict.detail.startswith("median latency"), verdict


def test_a_newer_desired_state_supersedes_a_release_in_probation(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    """The fleet rolls its campaign back while a device is still proving the new release: it goes back at once."""
    d = device(probation_s=60)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    d.tap.wait_for("install_state", state="PROBATION")
    d.deliver(fleet.desired(d.config.device_id, 2, releases["good"]))
    rolled_back = d.tap.wait_for("rolled_back")
    assert (rolled_back["detail"]["reason"], rolled_back["detail"]["seq"]) == ("superseded", 1)
    unchanged = d.tap.wait_for("install_committed", seq=2)
    assert unchanged["detail"]["unchanged"] is True
    d.assert_serves("digits:1.0.0", example_model("good"))


def test_a_clean_restart_in_probation_continues_it_and_is_not_counted_as_a_crash(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device(probation_s=60)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    d.tap.wait_for("install_state", state="PROBATION")
    d.shutdown()
    d.boot()
    resumed = d.tap.wait_for("install_resumed")
    assert (resumed["detail"]["action"], resumed["detail"]["restarts"]) == ("CONTINUE_PROBATION", 0)
    assert d.serving == "digits:1.1.0"
    rows = smoke_rows(example_model("better"))
    d.core.predict("digits", rows)
    d.core.predict("digits", rows[:4])  # probation started over at this start: 20 inferences since
    assert d.tap.wait_for("install_committed")["detail"]["inferences"] == 20
    d.assert_serves("digits:1.1.0", example_model("better"))


def test_a_damaged_active_slot_falls_back_at_start_up(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    d.tap.wait_for("install_committed")
    d.shutdown()
    active = d.config.state_dir / "models" / "digits" / f"{releases['better'].sha256}.onnx"
    data = bytearray(active.read_bytes())
    data[100] ^= 0x01  # one bit of rot on the SD card
    active.write_bytes(bytes(data))
    d.boot()
    rolled_back = d.tap.wait_for("rolled_back")
    assert rolled_back["detail"]["reason"] == "slot_damaged"
    assert rolled_back["detail"]["detail"] == "active digits:1.1.0: hash_mismatch"
    d.assert_serves("digits:1.0.0", example_model("good"))
    assert d.install()["state"] == "IDLE"


# --------------------------------------------------------------------------------------------------------------
# `edge-agent run` killed with SIGKILL at every install state, and crash loops


def agent_toml(tmp_path: Path, device_id: str, broker_url: str, fleet: Fleet, good: Path, **update: Any) -> Path:
    root, director = fleet.enroll(tmp_path / "enrolled")
    settings = {"probation_s": 1, "probation_inferences": 20, "smoke_timeout_s": 30, "crash_loop_limit": 3} | update
    config = tmp_path / f"{device_id}.toml"
    config.write_text(
        f"""
device_id = "{device_id}"
state_dir = "{tmp_path / device_id}"

[mqtt]
broker = "{broker_url}"
keepalive = 5
reconnect_max_s = 1

[api]
enabled = false

[[models]]
name = "digits"
path = "{good / "int8.onnx"}"
card = "{good / "card.json"}"
release = "digits:1.0.0"

[update]
repo_url = "{fleet.server.url}"
trusted_root = "{root}"
director_key = "{director}"
"""
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    )
    return config


def start_agent(config: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **env},
        )


def persisted_install(state_dir: Path) -> dict[str, Any]:
    """The install record as the agent left it on disk."""
    db = sqlite3.connect(state_dir / "install.sqlite")
    try:
        return json.loads(db.execute("SELECT install FROM models WHERE name = 'digits'").fetchone()[0])
    finally:
        db.close()


def agent_status(agent: subprocess.Popen[bytes], state_dir: Path) -> dict[str, Any] | None:
    """The status file, once this agent process wrote it (it has started, and SIGTERM stops it cleanly)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        status = json.loads((state_dir / "status.json").read_text())
        return status if status["pid"] == agent.pid and status["running"] else None
    return None


def stop_agent(agent: subprocess.Popen[bytes], log: Path) -> None:
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0, log.read_text()[-3000:]


#: States whose restart action (agent.update.states.ON_RESTART) another state here already takes: their SIGKILL cases
#: run with `pytest -m slow` (the default run stays under 10 minutes on 2 cores); tests/test_sim_power.py cuts the
#: power at every state, in process, in every run.
SAME_RESTART_AS_DOWNLOADING = ("VERIFYING", "STAGED", "SMOKE_TEST")


@pytest.mark.parametrize(
    "state",
    [pytest.param(s, marks=pytest.mark.slow) if s in SAME_RESTART_AS_DOWNLOADING else s
     for s in (*INSTALL_STATES, "REVERTING")],
)  # fmt: skip
def test_sigkill_at_every_install_state_restarts_into_a_verified_model(
    state: str,
    tmp_path: Path,
    broker: MosquittoBroker,
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
) -> None:
    """The agent SIGKILLs itself right after persisting ``state``; restarted, it completes or cleanly reverts."""
    good = example_model("good")
    device_id = new_device_id("kill")
    state_dir = tmp_path / device_id
    if state == "REVERTING":  # a release that fails its smoke test, so that a revert is what gets cut
        inaccurate = example_model("inaccurate")
        card = {**card_of(inaccurate), "smoke_test": card_of(good)["smoke_test"]}
        release = fleet.publish(inaccurate / "int8.onnx", "1.2.0", card)
        outcome, final, serves, folder, served_file = "install_failed", "IDLE", "digits:1.0.0", good, good / "int8.onnx"
    else:
        release, outcome, final, serves = releases["better"], "install_committed", "COMMITTED", "digits:1.1.0"
        folder = example_model("better")
        served_file = state_dir / "models" / "digits" / f"{release.sha256}.onnx"
    config = agent_toml(tmp_path, device_id, broker.url, fleet, good)
    log = tmp_path / "agent.log"
    tap = EventTap(broker.url, device_id)
    try:
        deliver(broker.url, device_id, fleet.desired(device_id, 1, release))
        killed = start_agent(config, log, **{FAULT_KILL_AT: state})
        assert killed.wait(60) == -signal.SIGKILL, log.read_text()[-3000:]
        assert persisted_install(state_dir)["state"] == state

        agent = start_agent(config, log)
        try:
            wait_for(lambda: agent_status(agent, state_dir), 30, "the agent to start again")
            tap.wait_for(outcome, 60)
        finally:
            stop_agent(agent, log)
    finally:
        tap.close()

    status = json.loads((state_dir / "status.json").read_text())["models"]["digits"]
    assert status["release"] == serves and status["install"]["state"] == final
    assert len(tap.of("install_committed", "install_failed", "rolled_back")) == 1
    states = tap.states()
    assert state in states and states[-1] == final
    if state == "REVERTING":
        assert tap.of("install_failed")[0]["detail"]["reason"] == "smoke_mismatch"
        assert "ACTIVATING" not in states
    # What it serves verifies against the release it reports, and answers that release's signed smoke test.
    assert status["slots"]["active"]["sha256"] == hashlib.sha256(served_file.read_bytes()).hexdigest()[:12]
    assert run_smoke_test(served_file, "onnxruntime", card_of(folder), "int8.onnx", 30).passed


def test_a_crash_loop_in_probation_reverts_at_start_up_without_network(
    tmp_path: Path,
    broker: MosquittoBroker,
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
) -> None:
    good = example_model("good")
    device_id = new_device_id("loop")
    state_dir = tmp_path / device_id
    config = agent_toml(tmp_path, device_id, broker.url, fleet, good, probation_s=60, crash_loop_limit=3)
    log = tmp_path / "agent.log"
    deliver(broker.url, device_id, fleet.desired(device_id, 1, releases["better"]))
    for restarts in range(3):  # the new release crashes the agent in probation, at every start
        crashed = start_agent(config, log, **{FAULT_KILL_AT: "PROBATION"})
        assert crashed.wait(60) == -signal.SIGKILL, log.read_text()[-3000:]
        record = persisted_install(state_dir)
        assert (record["state"], record["restarts"]) == ("PROBATION", restarts)

    fleet.stop()  # no repository, and a broker address where nothing listens
    config.write_text(config.read_text().replace(broker.url, f"mqtt://127.0.0.1:{free_port()}"))
    agent = start_agent(config, log)
    try:

        def settled() -> dict[str, Any] | None:
            digits = (agent_status(agent, state_dir) or {}).get("models", {}).get("digits")
            return digits if digits and digits["install"]["state"] == "IDLE" else None

        digits = wait_for(settled, 30, "the revert at start-up")
    finally:
        stop_agent(agent, log)
    assert digits["release"] == "digits:1.0.0" and digits["slots"]["active"]["factory"]
    assert digits["install"]["last_outcome"]["outcome"] == "rolled_back"
    assert digits["install"]["last_outcome"]["reason"] == "crash_loop"
    # The outcome waits in the outbox for the broker: events are never dropped.
    db = sqlite3.connect(state_dir / "outbox.sqlite")
    try:
        events = [json.loads(row[0]) for row in db.execute("SELECT payload FROM outbox WHERE kind = 'events'")]
    finally:
        db.close()
    rolled_back = [e for e in events if e["type"] == "rolled_back"]
    assert [e["detail"]["reason"] for e in rolled_back] == ["crash_loop"]
    assert rolled_back[0]["detail"]["to"] == "digits:1.0.0"


def test_the_update_table_is_validated_with_errors_that_name_the_key(tmp_path: Path, fleet: Fleet) -> None:
    from agent.config import ConfigError, parse

    base = {"device_id": "dev-1", "state_dir": "state", "mqtt": {"broker": "mqtt://127.0.0.1:1883"}}
    assert parse(base, tmp_path).update is None  # no [update]: the agent never updates
    update = {"repo_url": "https://releases.example/fleet", "trusted_root": "root.json", "director_key": "d.json"}
    config = parse({**base, "update": {**update, "max_download_mb": 2, "probation_s": 5}}, tmp_path)
    assert config.update == UpdateConfig(
        "https://releases.example/fleet", tmp_path / "root.json", tmp_path / "d.json", 2 * 2**20, probation_s=5.0
    )
    for bad, message in (
        ({"repo_url": "ftp://x"}, "repo_url must look like"),
        ({"max_error_rate": 2}, "max_error_rate must be between 0 and 1"),
        ({"crash_loop_limit": 0}, "crash_loop_limit must be an integer between 1 and 100"),
        ({"probation": 1}, "unknown keys ['probation']"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse({**base, "update": {**update, **bad}}, tmp_path)
    # Files are read when the agent starts, with the same kind of message.
    _, director = fleet.enroll(tmp_path / "enrolled")
    missing = AgentConfig(
        "dev-1",
        tmp_path / "state",
        BrokerAddress.parse("mqtt://127.0.0.1:1"),
        update=UpdateConfig(fleet.server.url, tmp_path / "nowhere.json", director),
    )
    with pytest.raises(ConfigError, match=r"cannot read .*nowhere\.json"):
        AgentCore(missing, Reactor())
    swapped = AgentConfig(
        "dev-1",
        tmp_path / "state",
        BrokerAddress.parse("mqtt://127.0.0.1:1"),
        update=UpdateConfig(fleet.server.url, director, director),
    )
    with pytest.raises(ConfigError, match=r"trusted_root .* not a TUF root"):
        AgentCore(swapped, Reactor())


def test_smoke_children_forked_from_a_preloaded_server_are_judged_as_fresh_ones(
    example_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's smoke tests (agent.update.smoke.prefork): each still in a child of its own, same verdicts."""
    monkeypatch.setattr(smoke, "_FORKSERVER", None)
    smoke.prefork()
    good, broken = example_model("good"), example_model("broken")
    card = card_of(good)
    passed = run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 30)
    assert passed.passed and passed.median_ms is not None
    strict = {**card, "smoke_test": {**card["smoke_test"], "latency_budget_ms": 1e-6}}
    assert run_smoke_test(good / "int8.onnx", "onnxruntime", strict, "int8.onnx", 30).reason == "smoke_too_slow"
    failing = run_smoke_test(broken / "int8.onnx", "onnxruntime", card_of(broken), "int8.onnx", 30)
    assert failing.reason in ("smoke_error", "smoke_mismatch"), failing
    monkeypatch.setenv(FAULT_SMOKE, "SIGKILL")  # read from the agent's environment, however the child starts
    crashed = run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 30)
    assert (crashed.reason, crashed.detail) == ("smoke_crashed", "signal 9 (SIGKILL)")
    monkeypatch.setenv(FAULT_SMOKE, "hang")
    assert run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 2).reason == "smoke_timeout"
    monkeypatch.setenv(FAULT_SMOKE, "exit")  # no answer and no signal: a fresh interpreter decides, and agrees
    exited = run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 30)
    assert (exited.reason, exited.detail) == ("smoke_crashed", "exit 3: ")
    monkeypatch.delenv(FAULT_SMOKE)
    assert run_smoke_test(good / "int8.onnx", "onnxruntime", card, "int8.onnx", 30).passed, "the server lives on"
