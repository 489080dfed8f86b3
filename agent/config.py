"""Agent configuration: one TOML file (``agent.toml``), validated once at start-up with errors that name the fix.

Example::

    device_id = "pi-kitchen-01"
    state_dir = "/var/lib/edge-agent"

    [mqtt]
    broker = "mqtts://broker.example:8883"
    prefix = "edgefleet/v1"
    ca = "/etc/edge-agent/ca.pem"
    cert = "/etc/edge-agent/device.pem"
    key = "/etc/edge-agent/device.key"

    [telemetry]
    window_s = 60

    [[models]]
    name = "digits"
    path = "/opt/models/digits/int8.onnx"
    card = "/opt/models/digits/card.json"
    release = "digits:1.0.0"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import protocol
from agent.link import BrokerAddress, TlsFiles


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and what to write instead."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    card: Path | None = None
    release: str = ""
    threads: int | None = None


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    broker: BrokerAddress
    prefix: str = protocol.DEFAULT_PREFIX
    keepalive: int = 30
    reconnect_max_s: float = 60.0
    tls: TlsFiles | None = None
    window_s: float = 60.0
    outbox_max_rows: int = 10_000
    outbox_max_bytes: int = 20 * 2**20
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)
    log_level: str = "INFO"


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def parse(data: dict[str, Any], base: Path) -> AgentConfig:
    """Build a config from parsed TOML; relative paths are taken relative to ``base`` (the file's folder)."""
    known = {"device_id", "state_dir", "mqtt", "telemetry", "models", "log_level"}
    if unknown := set(data) - known:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}; known keys are {sorted(known)}")
    device_id = _get(data, "device_id", str, "agent.toml")
    if not protocol.valid_device_id(device_id):
        raise ConfigError(f"device_id {device_id!r} must match {protocol.DEVICE_ID_PATTERN}")
    state_dir = _path(base, _get(data, "state_dir", str, "agent.toml"))
    assert state_dir is not None

    mqtt = _get(data, "mqtt", dict, "agent.toml")
    try:
        broker = BrokerAddress.parse(_get(mqtt, "broker", str, "[mqtt]"))
    except ValueError as exc:
        raise ConfigError(f"[mqtt] broker: {exc}") from None
    tls_paths = {k: _path(base, _get(mqtt, k, str, "[mqtt]", None)) for k in ("ca", "cert", "key")}
    tls = TlsFiles(**tls_paths) if any(tls_paths.values()) else None
    if tls and bool(tls.cert) != bool(tls.key):
        raise ConfigError("[mqtt]: set both cert and key for mutual TLS, or neither")

    telemetry = _get(data, "telemetry", dict, "agent.toml", {})
    window_s = float(_get(telemetry, "window_s", (int, float), "[telemetry]", 60.0))
    if not 1.0 <= window_s <= 3600.0:
        raise ConfigError(f"[telemetry] window_s must be between 1 and 3600 seconds, got {window_s}")

    models = []
    for i, m in enumerate(_get(data, "models", list, "agent.toml", [])):
        where = f"[[models]] #{i + 1}"
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: must be a table")
        model_path = _path(base, _get(m, "path", str, where))
        assert model_path is not None
        models.append(
            ModelConfig(
                name=_get(m, "name", str, where),
                path=model_path,
                card=_path(base, _get(m, "card", str, where, None)),
                release=_get(m, "release", str, where, ""),
                threads=_get(m, "threads", int, where, None),
            )
        )
    if len({m.name for m in models}) != len(models):
        raise ConfigError("[[models]]: model names must be unique")

    return AgentConfig(
        device_id=device_id,
        state_dir=state_dir,
        broker=broker,
        prefix=_get(mqtt, "prefix", str, "[mqtt]", protocol.DEFAULT_PREFIX),
        keepalive=_get(mqtt, "keepalive", int, "[mqtt]", 30),
        reconnect_max_s=float(_get(mqtt, "reconnect_max_s", (int, float), "[mqtt]", 60.0)),
        tls=tls,
        window_s=window_s,
        outbox_max_rows=_get(telemetry, "outbox_max_rows", int, "[telemetry]", 10_000),
        outbox_max_bytes=_get(telemetry, "outbox_max_bytes", int, "[telemetry]", 20 * 2**20),
        models=tuple(models),
        log_level=_get(data, "log_level", str, "agent.toml", "INFO"),
    )


def load(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; create it (see `edge-agent --help`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse(data, path.parent.resolve())
