"""Where a broker is and how to reach it: its URL and the TLS files. Stdlib only; paho is not loaded here."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Accept ``mqtt://host:port`` and ``mqtts://host:port`` (the port defaults to 1883 and 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL must look like mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"broker URL takes only a host and a port: {url!r}")
        try:
            port = parts.port
        except ValueError:  # not a number, or above 65535
            port = 0
        if port == 0:
            given = parts.netloc.rpartition(":")[2]
            raise ValueError(f"broker URL port must be 1-65535, as in mqtt://HOST:PORT, not {given!r} in {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """CA to trust and, for mutual TLS, the client's certificate (a device's CN = its device id) and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def apply(self, client: mqtt.Client) -> None:
        """Make ``client`` speak TLS 1.2+ and verify the broker (against ``ca``, else the system's CAs)."""
        client.tls_set(
            ca_certs=str(self.ca) if self.ca else None,
            certfile=str(self.cert) if self.cert else None,
            keyfile=str(self.key) if self.key else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
