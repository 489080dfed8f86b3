"""Device health samples: plausible values in the protocol's ranges, real CPU accounting, thermal zones."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from agent.health import HealthSampler
from agent.protocol import Health


def test_sample_has_sane_values_that_pass_the_protocol_checks(tmp_path: Path) -> None:
    health = HealthSampler(tmp_path).sample()

    msgspec.convert(health, Health)  # raises if a key is unknown or a value out of the protocol's range
    assert 1 << 20 < health["rss_bytes"] < 1 << 40
    assert health["disk_free_bytes"] > 0
    assert health["load1"] >= 0
    assert health["cpu_percent"] >= 0


def test_cpu_percent_rises_under_a_busy_loop(tmp_path: Path) -> None:
    sampler = HealthSampler(tmp_path)
    time.sleep(0.3)
    idle = sampler.sample()["cpu_percent"]
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        pass
    busy = sampler.sample()["cpu_percent"]

    assert busy >= 50, busy
    assert idle < busy


def test_temperature_is_the_hottest_plausible_thermal_zone(tmp_path: Path) -> None:
    readings = {"thermal_zone0": "45000\n", "thermal_zone1": "61234\n", "thermal_zone2": "-273000\n"}
    for zone, text in readings.items():
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "temp").write_text(text)
    (tmp_path / "thermal_zone3").mkdir()
    (tmp_path / "thermal_zone3" / "temp").write_text("not a number")

    assert HealthSampler(tmp_path, thermal_root=tmp_path).sample()["temperature_c"] == 61.2


def test_unreadable_values_are_left_out_rather_than_raised(tmp_path: Path) -> None:
    health = HealthSampler(tmp_path / "missing", thermal_root=tmp_path / "no-thermal").sample()

    assert "disk_free_bytes" not in health
    assert health["temperature_c"] is None
