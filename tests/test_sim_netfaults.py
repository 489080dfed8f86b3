"""Network faults through the simulator's TCP proxy, against the real Mosquitto and the fleet's real repository
server: MQTT passes through it unchanged, and each fault (disconnect, down, blackhole, throttle, cut) does to real
clients what the same fault on a real network would.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fleet_fixtures import wait_for
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.netfaults import FaultyLink, Proxy
from fleet.broker import MosquittoBroker
from fleet.trust.repo_server import RepoServer

BLOB = 2 * 1024 * 1024


class Mqtt:
    """A real paho client on its own loop thread that records its connections, disconnections and messages."""

    def __init__(self, host: str, port: int, subscribe: str | None = None, will: str | None = None) -> None:
        self.connects = self.disconnects = self.subscribed = 0
        self.messages: list[bytes] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"netfaults-{uuid.uuid4().hex[:10]}")
        self.client.reconnect_delay_set(1, 1)
        if will:
            self.client.will_set(will, b"offline", qos=1)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            self.connects += 1
            if subscribe:
                client.subscribe(subscribe, qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed += 1

        def on_disconnect(*_: Any) -> None:
            self.disconnects += 1

        self.client.on_connect, self.client.on_subscribe = on_connect, on_subscribe
        self.client.on_disconnect = on_disconnect
        self.client.on_message = lambda _c, _u, message: self.messages.append(message.payload)
        self.client.connect_async(host, port, keepalive=60)
        self.client.loop_start()

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def publish(self, topic: str, count: int) -> None:
        for i in range(count):
            self.client.publish(topic, f"m{i}".encode(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as p:
        yield p


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RepoServer, bytes]]:
    """The fleet's real repository server, serving a 2 MiB target; yields (server, the target's bytes)."""
    root = tmp_path_factory.mktemp("repo")
    (root / "targets").mkdir()
    data = os.urandom(BLOB)
    (root / "targets" / "blob.bin").write_bytes(data)
    with RepoServer(root) as server:
        yield server, data


def repo_link(proxy: Proxy, server: RepoServer) -> FaultyLink:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return proxy.link(host, int(port), "repo")


def broker_link(proxy: Proxy, broker: MosquittoBroker) -> FaultyLink:
    return proxy.link(broker.host, broker.port, "broker")


def topic() -> str:
    return f"netfaults/{uuid.uuid4().hex[:10]}"


def download(link: FaultyLink, size: int) -> bytes:
    """The first ``size`` bytes of the target, through ``link``, by a Range request."""
    request = urllib.request.Request(f"http://{link.host}:{link.port}/targets/blob.bin")
    request.add_header("Range", f"bytes=0-{size - 1}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def test_a_client_publishes_and_subscribes_through_the_proxy_as_through_the_broker(
    proxy: Proxy, broker: MosquittoBroker
) -> None:
    link, down, up = broker_link(proxy, broker), topic(), topic()
    direct, device = Mqtt(broker.host, broker.port, subscribe=up), Mqtt(link.host, link.port, subscribe=down)
    try:
        wait_for(lambda: direct.subscribed and device.subscribed, 15, "both clients subscribed")
        direct.publish(down, 20)
        device.publish(up, 30)
        wait_for(lambda: len(device.messages) == 20 and len(direct.messages) == 30, 15, "messages both ways")
        stats = link.stats()
        assert stats["connections"] == 1 and stats["disconnects"] == 0 and stats["open"] == 1
        assert stats["bytes_up"] > 30 * 10 and stats["bytes_down"] > 20 * 10
    finally:
        direct.close()
        device.close()


def test_disconnect_drops_a_connected_client_and_the_broker_publishes_its_last_will(
    proxy: Proxy, broker: MosquittoBroker
) -> None:
    link, will = broker_link(proxy, broker), topic()
    watcher = Mqtt(broker.host, broker.port, subscribe=will)
    device = Mqtt(link.host, link.port, will=will)
    try:
        wait_for(lambda: watcher.subscribed and device.connected, 15, "watcher subscribed, device connected")
        link.disconnect()
        wait_for(lambda: device.disconnects, 15, "the device to see its connection drop")
        wait_for(lambda: watcher.messages == [b"offline"], 15, "the device's last will")
        assert link.stats()["disconnects"] == 1
        wait_for(lambda: device.connected, 15, "the device to reconnect through the link")
    finally:
        watcher.close()
        device.close()


def test_down_drops_a_client_and_keeps_it_from_connecting_until_the_link_is_up(
    proxy: Proxy, broker: MosquittoBroker
) -> None:
    link = broker_link(proxy, broker)
    device = Mqtt(link.host, link.port)
    try:
        wait_for(lambda: device.connected, 15, "the device connected")
        link.down(True)
        wait_for(lambda: device.disconnects, 15, "the device dropped")
        wait_for(lambda: link.stats()["refused"] >= 2, 15, "the device's retries refused")
        assert not device.connected and device.connects == 1
        link.down(False)
        wait_for(lambda: device.connected, 15, "the device back once the link is up")
        assert device.connects == 2 and link.stats()["disconnects"] == 1
    finally:
        device.close()


def test_blackhole_delivers_nothing_for_its_duration_and_the_bytes_arrive_after_it(
    proxy: Proxy, broker: MosquittoBroker
) -> None:
    link, down = broker_link(proxy, broker), topic()
    direct, device = Mqtt(broker.host, broker.port), Mqtt(link.host, link.port, subscribe=down)
    late: Mqtt | None = None
    try:
        wait_for(lambda: direct.connected and device.subscribed, 15, "both clients ready")
        link.blackhole(True)
        late = Mqtt(link.host, link.port)  # a new connection is held, not refused
        direct.publish(down, 5)
        time.sleep(1.5)  # well below the 60 s keepalive: nobody gives up on the link
        assert device.messages == [] and not late.connected
        link.blackhole(False)
        wait_for(lambda: len(device.messages) == 5, 15, "the held messages after the blackhole")
        wait_for(lambda: late.connected, 15, "the held connection to reach the broker")
        assert device.disconnects == 0 and link.stats()["disconnects"] == 0
    finally:
        for client in (direct, device, late):
            if client is not None:
                client.close()


def test_throttle_slows_a_download_to_its_rate_and_lifting_it_restores_full_speed(
    proxy: Proxy, repo: tuple[RepoServer, bytes]
) -> None:
    server, data = repo
    link, size, rate = repo_link(proxy, server), 1024 * 1024, 512 * 1024
    start = time.monotonic()
    assert download(link, size) == data[:size]
    fast = time.monotonic() - start
    link.throttle(rate)
    start = time.monotonic()
    assert download(link, size) == data[:size]
    slow = time.monotonic() - start
    assert slow >= 0.75 * size / rate, f"{size} bytes at {rate} B/s took {slow:.2f} s"
    assert slow < 30 and fast < slow / 4, f"unthrottled {fast:.2f} s, throttled {slow:.2f} s"
    link.throttle(None)
    start = time.monotonic()
    assert download(link, size) == data[:size]
    assert time.monotonic() - start < slow / 4


def test_cut_after_delivers_exactly_that_many_bytes_and_a_resumed_download_gets_the_rest(
    proxy: Proxy, repo: tuple[RepoServer, bytes]
) -> None:
    server, data = repo
    link, cut = repo_link(proxy, server), 700_000
    link.cut_after(cut)
    with socket.create_connection((link.host, link.port), timeout=30) as sock:
        sock.sendall(b"GET /targets/blob.bin HTTP/1.1\r\nHost: repo\r\nConnection: close\r\n\r\n")
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    assert len(received) == cut and link.stats()["disconnects"] == 1
    got = bytearray(received.split(b"\r\n\r\n", 1)[1])
    for _ in range(10):  # each new connection is cut too: resume until complete
        if len(got) == len(data):
            break
        conn = http.client.HTTPConnection(link.host, link.port, timeout=30)
        conn.request("GET", "/targets/blob.bin", headers={"Range": f"bytes={len(got)}-"})
        response = conn.getresponse()
        assert response.status == 206
        try:
            got += response.read()
        except http.client.IncompleteRead as e:
            got += e.partial
        conn.close()
    assert got == data
    stats = link.stats()  # 2 MiB and three sets of headers: two cuts, and a third connection that ends on its own
    assert stats["connections"] == 3 and stats["disconnects"] == stats["cuts"] == 2


def test_cuts_limited_in_number_stop_after_that_many_and_downloads_then_go_through_whole(
    proxy: Proxy, repo: tuple[RepoServer, bytes]
) -> None:
    server, data = repo
    link = repo_link(proxy, server)
    link.cut_after(1000, times=1)
    conn = http.client.HTTPConnection(link.host, link.port, timeout=30)
    conn.request("GET", "/targets/blob.bin")
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    conn.close()
    assert download(link, len(data)) == data, "the second connection is not cut"
    assert link.stats()["cuts"] == 1


def test_two_hundred_links_share_the_proxy_thread_and_all_pass_traffic(proxy: Proxy, broker: MosquittoBroker) -> None:
    threads = threading.active_count()
    links = [proxy.link(broker.host, broker.port, f"device-{i}") for i in range(200)]
    socks = [socket.create_connection((link.host, link.port), timeout=30) for link in links]
    try:
        for i, sock in enumerate(socks):
            client_id = f"netfaults-many-{i}-{uuid.uuid4().hex[:6]}".encode()
            body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
            sock.sendall(bytes([0x10, len(body)]) + body + b"\xc0\x00")  # CONNECT, then PINGREQ
        for sock in socks:
            assert recv_exactly(sock, 6) == b"\x20\x02\x00\x00\xd0\x00"  # CONNACK accepted, PINGRESP
        assert threading.active_count() == threads
        assert all(link.stats()["open"] == 1 for link in links)
    finally:
        for sock in socks:
            sock.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def test_closing_the_proxy_closes_its_connections_and_joins_its_thread(broker: MosquittoBroker) -> None:
    before = threading.active_count()
    proxy = Proxy().start()
    link = broker_link(proxy, broker)
    sock = socket.create_connection((link.host, link.port), timeout=30)
    wait_for(lambda: link.stats()["open"] == 1, 15, "the connection proxied")
    proxy.close()
    assert sock.recv(1) == b"" and threading.active_count() == before
    sock.close()


def test_a_peer_that_does_not_read_stops_the_proxy_reading_the_sender(proxy: Proxy) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        link = proxy.link("127.0.0.1", server.getsockname()[1], "sink")
        client = socket.create_connection((link.host, link.port), timeout=30)
        sink, _ = server.accept()  # never reads
        client.setblocking(False)
        sent, last_progress, block = 0, time.monotonic(), b"x" * 65536
        while time.monotonic() - last_progress < 0.5 and sent < 256 * 1024 * 1024:
            try:
                sent += client.send(block)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        # Kernel buffers (a few MiB each way on loopback) and the proxy's 256 KiB hold it all; the sender is stuck.
        assert sent < 32 * 1024 * 1024 and link.stats()["bytes_up"] <= sent
        client.close()
        sink.close()


def test_a_side_that_died_during_a_blackhole_is_closed_on_the_other_when_it_ends(proxy: Proxy) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        link = proxy.link("127.0.0.1", server.getsockname()[1], "sink")
        client = socket.create_connection((link.host, link.port), timeout=30)
        upstream, _ = server.accept()
        client.sendall(b"hello")
        assert recv_exactly(upstream, 5) == b"hello"
        link.blackhole(True)
        upstream.sendall(b"held")
        upstream.close()  # as a broker gives up on a silent client
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(1)
        link.blackhole(False)
        client.settimeout(30)
        assert recv_exactly(client, 5) == b"held"  # what was sent before it died, then the close
        wait_for(lambda: link.stats()["open"] == 0, 15, "the pipe closed")
        client.close()
