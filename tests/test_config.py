"""agent.toml: a valid file loads; every mistake is refused with a message that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load

GOOD = """
device_id = "pi-01"
state_dir = "state"

[mqtt]
broker = "mqtts://broker.example:8883"
ca = "ca.pem"

[telemetry]
window_s = 5

[[models]]
name = "digits"
path = "models/int8.onnx"
card = "models/card.json"
release = "digits:1.0.0"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_complete_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert config.device_id == "pi-01"
    assert config.state_dir == tmp_path / "state"
    assert config.broker.host == "broker.example" and config.broker.port == 8883 and config.broker.tls
    assert config.tls is not None and config.tls.ca == tmp_path / "ca.pem"
    assert config.window_s == 5
    assert config.models[0].path == tmp_path / "models/int8.onnx"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('device_id = "pi-01"', 'device_id = "pi/01"'), "device_id"),
        (('broker = "mqtts://broker.example:8883"', 'broker = "http://x"'), "broker"),
        (("window_s = 5", "window_s = 0"), "window_s"),
        (("window_s = 5", 'window_s = "5"'), "window_s"),
        (('state_dir = "state"', ""), "state_dir"),
        (('device_id = "pi-01"', 'device_id = "pi-01"\nunknown = 1'), "unknown"),
        (('broker = "mqtts://broker.example:8883"', 'broker = "mqtt://broker.example:1883"'), "mqtts"),
        (('device_id = "pi-01"', 'device_id = "pi-01"\nlog_level = "chatty"'), "log_level must be one of"),
    ],
)
def test_a_broken_config_is_refused_naming_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, GOOD.replace(*change)))


def test_a_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml")


def test_a_config_path_that_cannot_be_read_as_text_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .* \(Is a directory\)"):
        load(tmp_path)
    binary = tmp_path / "agent.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(binary)


def test_the_log_level_is_one_of_loggings_in_any_case(tmp_path: Path) -> None:
    text = GOOD.replace('state_dir = "state"', 'state_dir = "state"\nlog_level = "debug"')
    assert load(write(tmp_path, text)).log_level == "debug"


def test_invalid_toml_is_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "device_id = "))
