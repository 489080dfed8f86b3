"""An MQTT broker the fleet manager starts itself when none is given.

The `mosquitto` binary is preferred (it is what production runs); without it, the pure-Python amqtt broker runs
in-process on its own event-loop thread. Both listen on loopback only, on a free port unless one is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

from agent.logs import event

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as servers bind: SO_REUSEADDR, so connections of an
    earlier run still closing do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


class Broker(Protocol):
    host: str
    port: int

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class MosquittoBroker:
    """A `mosquitto` process on loopback, with persistence so sessions survive a restart of the broker.

    ``stop()`` is a graceful SIGTERM (mosquitto saves its state); ``kill()`` is SIGKILL, for fault injection.
    ``persistence=False`` is Mosquitto's default configuration: a restart forgets every session.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, binary: str | None = None, *, persistence: bool = True
    ) -> None:
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    # As root, mosquitto would switch to the `mosquitto` user, who cannot write our workdir.
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    f"persistence {'true' if self.persistence else 'false'}",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 5",
                    "max_queued_messages 100000",
                    "max_inflight_messages 100",
                    "max_packet_size 1048576",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> None:
        if self.proc and self.proc.poll() is None:
            return
        conf = self._write_config()
        log_file = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=log_file, stderr=log_file, start_new_session=True
        )
        log_file.close()
        try:
            wait_for_port(self.host, self.port)
            time.sleep(0.05)
            if self.proc.poll() is not None:  # something else listens there: mosquitto could not bind and exited
                raise TimeoutError
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"mosquitto did not start; see {self.workdir / 'mosquitto.log'}") from None

    def _end(self, sig: signal.Signals) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


class AmqttBroker:
    """The pure-Python fallback: amqtt's broker on a private asyncio loop in a daemon thread."""

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        from amqtt.broker import Broker as _AmqttBroker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._broker = _AmqttBroker(config, loop=loop)
            loop.run_until_complete(self._broker.start())  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("the embedded amqtt broker did not start")
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout=10)
        self._loop = None
        self._broker = None


def embedded_broker(workdir: Path, port: int | None = None) -> Broker:
    """Start the best broker this machine has and return it running."""
    broker: Broker
    if MosquittoBroker.available():
        broker = MosquittoBroker(workdir, port)
    else:
        event(log, "broker_fallback", logging.WARNING, reason="mosquitto not on PATH; using in-process amqtt")
        broker = AmqttBroker(port)
    broker.start()
    return broker
