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

    [api]                               # the local inference endpoint (Open Inference Protocol v2)
    enabled = true
    listen = "127.0.0.1:8321"           # or "unix:/run/edge-agent/infer.sock"
    max_body_mb = 4
    timeout_s = 10                      # per read/write, and for a whole request body

    [update]                            # over-the-air model releases; without this table the agent never updates
    repo_url = "https://releases.example/fleet"     # the fleet's TUF repository (metadata/ and targets/)
    trusted_root = "/etc/edge-agent/root.json"      # the TUF root this device was enrolled with
    director_key = "/etc/edge-agent/director.json"  # `KeyStore.public_key_json("director")`
    max_download_mb = 100               # a release larger than this is refused before downloading
    download_deadline_s = 600           # per file, resumed downloads included
    smoke_timeout_s = 60                # wall clock for the smoke test's child process
    probation_inferences = 20           # healthy inferences that commit a release (the card may override) ...
    probation_s = 30                    # ... or healthy seconds, whichever comes first
    max_error_rate = 0.05               # failed share of inferences in probation that rolls a release back
    crash_loop_limit = 3                # agent restarts during an install that roll it back, network or not
    commit_watch_s = 3600               # after a commit, unclean restarts (crashes) still count towards
                                        # crash_loop_limit for this long, and roll the release back (the card's
                                        # probation.watch_s overrides it; 0: not after commit)
    retry_min_s = 30                    # first wait before an install that failed for a passing cause (full disk,
    retry_max_s = 3600                  # network, expired metadata) is tried again; doubling up to this
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.logs import LEVELS


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and what to write instead."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    card: Path | None = None
    release: str = ""
    threads: int | None = None
    #: The runtime that runs it ("onnxruntime" or "tflite"): an installed release's, as its signed target says, so
    #: the smoke test and the serving agent run the same one. None (agent.toml's models): chosen by content, then
    #: extension (:func:`agent.runtime.load_model`).
    runtime: str | None = None


@dataclass(frozen=True)
class ApiConfig:
    """The local inference endpoint (agent/server.py); loopback by default, since it has no authentication."""

    enabled: bool = True
    listen: str = "127.0.0.1:8321"
    max_body_bytes: int = 4 * 2**20
    timeout_s: float = 10.0


#: sun_path holds 108 bytes with the NUL; the server binds a temporary name a few bytes longer, then renames it.
_MAX_SOCKET_PATH = 96


def parse_listen(value: str) -> tuple[str, int] | Path:
    """``host:port`` (``[::1]:8321`` for IPv6) -> ``(host, port)``; ``unix:/path`` -> the socket's path."""
    if value.startswith("unix:"):
        path = Path(value.removeprefix("unix:"))
        if not path.is_absolute():
            raise ValueError(f"{value!r}: a Unix socket needs an absolute path, as unix:/run/edge-agent/infer.sock")
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"{value!r}: a Unix socket path must be at most {_MAX_SOCKET_PATH} bytes")
        return path
    host, _, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not host or (":" in host and not bracketed) or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{value!r} is neither host:port (as 127.0.0.1:8321) nor unix:/absolute/path")
    return host, int(port)


@dataclass(frozen=True)
class UpdateConfig:
    """Model updates (agent/update/): where releases come from, whom to trust, and how a release must behave."""

    repo_url: str
    trusted_root: Path
    director_key: Path
    max_download_bytes: int = 100 * 2**20
    download_deadline_s: float = 600.0
    smoke_timeout_s: float = 60.0
    probation_inferences: int = 20
    probation_s: float = 30.0
    max_error_rate: float = 0.05
    crash_loop_limit: int = 3
    commit_watch_s: float = 3600.0
    retry_min_s: float = 30.0
    retry_max_s: float = 3600.0


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
    api: ApiConfig = field(default_factory=ApiConfig)
    update: UpdateConfig | None = None


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
    known = {"device_id", "state_dir", "mqtt", "telemetry", "models", "log_level", "api", "update"}
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
    if tls and not broker.tls:
        raise ConfigError("[mqtt]: ca, cert and key are for TLS; use an mqtts:// broker URL")
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

    api = _get(data, "api", dict, "agent.toml", {})
    if unknown := set(api) - {"enabled", "listen", "max_body_mb", "timeout_s"}:
        raise ConfigError(f"[api]: unknown keys {sorted(unknown)}; known: enabled, listen, max_body_mb, timeout_s")
    listen = _get(api, "listen", str, "[api]", ApiConfig.listen)
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"[api] listen: {exc}") from None
    max_body_mb = _get(api, "max_body_mb", (int, float), "[api]", ApiConfig.max_body_bytes / 2**20)
    if not 0 < max_body_mb <= 64:
        raise ConfigError(f"[api] max_body_mb must be more than 0 and at most 64, got {max_body_mb}")
    api_timeout_s = float(_get(api, "timeout_s", (int, float), "[api]", ApiConfig.timeout_s))
    if not 0.1 <= api_timeout_s <= 300:
        raise ConfigError(f"[api] timeout_s must be between 0.1 and 300 seconds, got {api_timeout_s}")

    log_level = _get(data, "log_level", str, "agent.toml", "INFO")
    if log_level.upper() not in LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LEVELS)}, got {log_level!r}")

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
        log_level=log_level,
        api=ApiConfig(
            enabled=_get(api, "enabled", bool, "[api]", True),
            listen=listen,
            max_body_bytes=int(max_body_mb * 2**20),
            timeout_s=api_timeout_s,
        ),
        update=_update(data, base),
    )


_UPDATE_KEYS = frozenset(
    {"repo_url", "trusted_root", "director_key", "max_download_mb", "download_deadline_s", "smoke_timeout_s",
     "probation_inferences", "probation_s", "max_error_rate", "crash_loop_limit", "commit_watch_s", "retry_min_s",
     "retry_max_s"}
)  # fmt: skip


def _update(data: dict[str, Any], base: Path) -> UpdateConfig | None:
    table = _get(data, "update", dict, "agent.toml", None)
    if table is None:
        return None
    where = "[update]"
    if unknown := set(table) - _UPDATE_KEYS:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(_UPDATE_KEYS))}")
    repo_url = _get(table, "repo_url", str, where)
    parts = urlsplit(repo_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{where} repo_url must look like https://HOST/PATH, not {repo_url!r}")

    def number(key: str, default: float, low: float, high: float) -> float:
        value = float(_get(table, key, (int, float), where, default))
        if not low <= value <= high:
            raise ConfigError(f"{where} {key} must be between {low:g} and {high:g}, got {value:g}")
        return value

    def count(key: str, default: int, low: int, high: int) -> int:
        value = _get(table, key, int, where, default)
        if not low <= value <= high:
            raise ConfigError(f"{where} {key} must be an integer between {low} and {high}, got {value}")
        return int(value)

    trusted_root = _path(base, _get(table, "trusted_root", str, where))
    director_key = _path(base, _get(table, "director_key", str, where))
    assert trusted_root is not None and director_key is not None
    defaults = UpdateConfig(repo_url, trusted_root, director_key)
    retry_min_s = number("retry_min_s", defaults.retry_min_s, 0.1, 86400)
    return UpdateConfig(
        repo_url=repo_url,
        trusted_root=trusted_root,
        director_key=director_key,
        max_download_bytes=int(number("max_download_mb", defaults.max_download_bytes / 2**20, 0.001, 65536) * 2**20),
        download_deadline_s=number("download_deadline_s", defaults.download_deadline_s, 1, 86400),
        smoke_timeout_s=number("smoke_timeout_s", defaults.smoke_timeout_s, 1, 3600),
        probation_inferences=count("probation_inferences", defaults.probation_inferences, 1, 10**9),
        probation_s=number("probation_s", defaults.probation_s, 0.1, 7 * 86400),
        max_error_rate=number("max_error_rate", defaults.max_error_rate, 0, 1),
        crash_loop_limit=count("crash_loop_limit", defaults.crash_loop_limit, 1, 100),
        commit_watch_s=number("commit_watch_s", defaults.commit_watch_s, 0, 7 * 86400),
        retry_min_s=retry_min_s,
        retry_max_s=number("retry_max_s", defaults.retry_max_s, retry_min_s, 7 * 86400),
    )


def load(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; create it (see `edge-agent --help`)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror}); pass a readable agent.toml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; agent.toml is TOML, which is UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse(data, path.parent.resolve())
