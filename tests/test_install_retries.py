"""Installs that fail for a cause that passes by itself are tried again by the device, with back-off, once the cause is
gone; failures of the release itself never are. Real agent cores, real signed TUF metadata over HTTP, a real broker,
real tmpfs mounts filled to the last byte as full disks, and a device clock set wrong (a fake clock: allowed).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_install
from fleet_fixtures import Fleet, fill_disk, new_device_id, tiny_tmpfs, wait_for
from test_install import DAY, Device

from agent.update.retry import JITTER, Backoff, is_retryable
from fleet.trust.releases import ReleaseInfo

FAST_RETRIES = {"retry_min_s": 0.3, "retry_max_s": 1.0}
# The install tests' fixtures: a fleet with a repository served over HTTP, its two releases, and devices enrolled in it.
fleet, releases, device = test_install.fleet, test_install.releases, test_install.device


def test_the_back_off_doubles_from_the_first_wait_up_to_the_cap_with_jitter_taken_off() -> None:
    backoff = Backoff(30, 3600)
    assert [backoff.delay(n, 0.0) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff.delay(1, 0.999) == pytest.approx(30 * (1 - JITTER * 0.999))
    assert backoff.delay(10**6, 0.5) == pytest.approx(3600 * (1 - JITTER / 2))
    with pytest.raises(ValueError, match="from 1"):
        backoff.delay(0, 0.0)


def test_only_failures_whose_cause_passes_by_itself_are_retried() -> None:
    for reason in ("disk_full", "io_error"):
        assert is_retryable(reason)
    for reason in ("hash_mismatch", "length_mismatch", "below_min_release", "smoke_mismatch", "superseded"):
        assert not is_retryable(reason)
    for reason in ("tuf_refresh_failed", "download_failed", "download_deadline"):  # the error itself says whether
        assert is_retryable(reason, transient=True) and not is_retryable(reason)


def test_a_full_disk_when_the_desired_state_arrives_is_reported_and_acted_on_once_there_is_room(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    tmp_path: Path,
    example_model: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    device_id = new_device_id()
    with tiny_tmpfs(tmp_path / device_id, size="8m") as state_dir:
        d = device(device_id=device_id, **FAST_RETRIES)
        filler = fill_disk(state_dir)
        d.deliver(fleet.desired(device_id, 1, releases["better"]))
        # Nothing can be written: the refusal waits in memory, the agent goes on serving its model.
        wait_for(lambda: d.core.outbox.stats()["held_events"] >= 1, 10, "the desired_deferred event held in memory")
        assert d.reactor.thread is not None and d.reactor.thread.is_alive()
        d.assert_serves("digits:1.0.0", example_model("good"))
        assert not d.tap.of("desired_accepted")
        d.core.status_changed()  # the status file cannot be rewritten either: logged, not raised
        wait_for(lambda: "status_write_failed" in caplog.messages, 10, "status_write_failed")
        assert "reactor_callback_failed" not in caplog.messages

        filler.unlink()  # room again: no operator action, no new desired state
        deferred = d.tap.wait_for("desired_deferred")
        assert (deferred["detail"]["reason"], deferred["detail"]["seq"]) == ("disk_full", 1)
        assert "free space" in deferred["detail"]["detail"]
        d.tap.wait_for("install_committed")
        d.assert_serves("digits:1.1.0", example_model("better"))
        assert d.core.outbox.stats()["held_events"] == 0
        d.shutdown()  # before the unmount


def test_an_install_that_failed_on_a_full_disk_is_tried_again_by_itself_once_there_is_room(
    device: Callable[..., Device],
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    tmp_path: Path,
    example_model: Callable[..., Path],
) -> None:
    device_id = new_device_id()
    with tiny_tmpfs(tmp_path / device_id / "tuf" / "partial", size="4m") as partial:  # where downloads grow
        filler = fill_disk(partial)
        d = device(device_id=device_id, retry_min_s=1.0, retry_max_s=2.0)
        d.deliver(fleet.desired(device_id, 1, releases["better"]))
        failed = d.tap.wait_for("install_failed")["detail"]
        assert (failed["reason"], failed["retrying"]) == ("disk_full", True), "the outcome says it will be retried"
        scheduled = d.tap.wait_for("install_retry_scheduled")["detail"]
        assert (scheduled["reason"], scheduled["attempt"], scheduled["release"]) == ("disk_full", 1, "digits:1.1.0")
        assert 0.8 * 1.0 <= scheduled["in_s"] <= 1.0
        retry = d.install()["next_retry"]
        assert (retry["attempt"], retry["after"]) == (2, "disk_full")
        assert time.time() - 1 <= retry["at"] <= time.time() + 1.0

        d.tap.wait_for("install_retry_scheduled", attempt=2)  # still full: tried again, later
        assert len(d.tap.of("install_retry_scheduled")) == 2
        filler.unlink()
        d.tap.wait_for("install_committed", timeout=20)
        d.assert_serves("digits:1.1.0", example_model("better"))
        assert d.install()["next_retry"] is None
        d.shutdown()


def test_edge_agent_status_shows_when_a_failed_install_is_tried_again(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], tmp_path: Path
) -> None:
    device_id = new_device_id()
    with tiny_tmpfs(tmp_path / device_id / "tuf" / "partial", size="1m") as partial:
        fill_disk(partial)
        d = device(device_id=device_id, retry_min_s=600.0, retry_max_s=3600.0)
        d.deliver(fleet.desired(device_id, 1, releases["better"]))
        d.tap.wait_for("install_retry_scheduled")
        d.core.write_status()
        config = tmp_path / "agent.toml"
        model = d.config.models[0]
        config.write_text(
            f'device_id = "{device_id}"\nstate_dir = "{d.config.state_dir}"\n[mqtt]\nbroker = "{d.broker_url}"\n'
            f'[[models]]\nname = "digits"\npath = "{model.path}"\ncard = "{model.card}"\n'
        )
        shown = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--config", str(config)], capture_output=True, text=True
        )
        assert shown.returncode == 0, shown.stderr
        retry_line = next(line for line in shown.stdout.splitlines() if line.strip().startswith("retry"))
        wait = int(retry_line.split(" in ")[1].split(" s")[0])
        assert 0.8 * 600 - 5 <= wait <= 600, retry_line
        assert "attempt 2" in retry_line and "after disk_full" in retry_line and "digits:1.1.0" in retry_line
        d.shutdown()


def test_an_install_refused_for_metadata_a_clock_ahead_calls_expired_is_tried_again_once_the_clock_is_right(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    offset = [2 * DAY]  # the timestamp role expires after a day: to this device, the repository looks expired
    d = device(clock=lambda: time.time() + offset[0], **FAST_RETRIES)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"], expires=time.time() + 7 * DAY))
    failed = d.tap.wait_for("install_failed")["detail"]
    assert failed["reason"] == "tuf_refresh_failed" and "xpired" in failed["detail"] and failed["retrying"], failed
    d.tap.wait_for("install_retry_scheduled")
    offset[0] = 0.0  # the clock is set right (NTP came back)
    d.tap.wait_for("install_committed", timeout=20)
    d.assert_serves("digits:1.1.0", example_model("better"))


def test_a_release_whose_bytes_fail_their_hash_is_never_tried_again(
    device: Callable[..., Device], fleet: Fleet, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    fleet.tamper(releases["better"])
    d = device(**FAST_RETRIES)
    d.deliver(fleet.desired(d.config.device_id, 1, releases["better"]))
    failed = d.tap.wait_for("install_failed")["detail"]
    assert (failed["reason"], failed["retrying"]) == ("hash_mismatch", False), "a verdict on the release: no retry"
    time.sleep(3 * FAST_RETRIES["retry_max_s"])  # three retry periods: none may come
    assert not d.tap.of("install_retry_scheduled")
    assert [e["detail"]["state"] for e in d.tap.of("install_state")].count("DOWNLOADING") == 1
    assert d.install()["next_retry"] is None
    d.assert_serves("digits:1.0.0", example_model("good"))
    assert os.listdir(d.config.state_dir / "tuf" / "partial") == []
