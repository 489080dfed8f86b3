"""The local inference endpoint (Open Inference Protocol v2): real models, a real AgentCore, real HTTP over loopback
and a real Unix socket."""

from __future__ import annotations

import json
import logging
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ApiConfig, ConfigError, ModelConfig, load
from agent.core import AgentCore
from agent.reactor import Reactor
from agent.runtime import Model
from agent.server import ApiServer, connect
from fleet.broker import MosquittoBroker
from fleet.examples.modelgen import digits_split

RELEASE = "digits:1.0.0"


@pytest.fixture
def core(tmp_path: Path, broker: MosquittoBroker, example_model: Callable[[str], Path]) -> Iterator[AgentCore]:
    """A real core serving the good int8 ONNX model; not started (inference needs no reactor thread)."""
    folder = example_model("good")
    config = AgentConfig(
        device_id="api-device",
        state_dir=tmp_path / "state",
        broker=BrokerAddress.parse(broker.url),
        models=(ModelConfig("digits", folder / "int8.onnx", folder / "card.json", RELEASE),),
    )
    agent = AgentCore(config, Reactor())
    yield agent
    agent.close()


def serve(core: AgentCore, listen: str = "127.0.0.1:0", max_connections: int = 64, **config: Any) -> ApiServer:
    return ApiServer(core, ApiConfig(listen=listen, **config), max_connections=max_connections)


@pytest.fixture
def server(core: AgentCore) -> Iterator[ApiServer]:
    with serve(core, timeout_s=2.0, max_body_bytes=2**20) as api:
        yield api


def call(api: ApiServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection = connect(api.address, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        connection.close()


def raw_exchange(api: ApiServer, request: bytes, wait: float = 5.0) -> bytes:
    """Send bytes as they are and read until the server closes; for requests http.client will not make."""
    host, port = api.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def infer_request(rows: np.ndarray, nested: bool = False, **extra: Any) -> dict[str, Any]:
    data = rows.tolist() if nested else rows.ravel().tolist()
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": data}
    return {"inputs": [tensor], **extra}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split()
    return x_test, y_test


def test_infer_answers_one_row_and_a_batch_with_a_prediction_id_per_row(
    server: ApiServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    status, one = call(server, "POST", "/v2/models/digits/infer", infer_request(x[:1], nested=True, id="req-1"))
    assert status == 200
    assert one["model_name"] == "digits" and one["model_version"] == RELEASE and one["id"] == "req-1"
    [output] = one["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [1, 10]
    assert sum(output["data"]) == pytest.approx(1.0, abs=0.02)
    assert len(one["parameters"]["prediction_ids"]) == 1

    status, five = call(server, "POST", "/v2/models/digits/infer", infer_request(x[:5]))
    assert status == 200 and five["outputs"][0]["shape"] == [5, 10] and len(five["outputs"][0]["data"]) == 50
    assert five["id"], "a request without an id still gets one"
    assert len(set(five["parameters"]["prediction_ids"])) == 5


def test_held_out_digits_over_http_score_the_accuracy_on_the_model_card(
    server: ApiServer, digits: tuple[np.ndarray, np.ndarray], example_model: Callable[[str], Path]
) -> None:
    x, y = digits
    status, answer = call(server, "POST", "/v2/models/digits/infer", infer_request(x))
    assert status == 200
    probabilities = np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])
    accuracy = round(float((probabilities.argmax(axis=1) == y).mean()), 4)
    card = json.loads((example_model("good") / "card.json").read_text())
    assert accuracy == card["files"]["int8.onnx"]["accuracy"]


def test_metadata_describes_the_server_and_the_models_fp32_tensors(server: ApiServer) -> None:
    status, meta = call(server, "GET", "/v2")
    assert status == 200 and meta["name"] == "edge-agent" and "feedback" in meta["extensions"] and meta["version"]
    status, model = call(server, "GET", "/v2/models/digits")
    assert status == 200
    assert model == {
        "name": "digits",
        "versions": [RELEASE],
        "platform": "onnxruntime",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }


def test_live_and_ready_report_200_and_a_configured_model_that_is_not_loaded_makes_it_503(
    server: ApiServer, core: AgentCore
) -> None:
    assert call(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert call(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert call(server, "GET", "/v2/models/digits/ready") == (200, {"name": "digits", "ready": True})
    assert call(server, "GET", "/v2/models/nope/ready")[0] == 404

    served = core.models.pop("digits")
    try:
        assert call(server, "GET", "/v2/health/ready")[0] == 503
        assert call(server, "GET", "/v2/models/digits/ready")[0] == 503
        assert call(server, "POST", "/v2/models/digits/infer", {})[0] == 503
    finally:
        core.models["digits"] = served


def row(value: float = 0.5) -> list[float]:
    return [value] * 64


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"inputs": [', "not valid JSON"),
        (b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [NaN]}]}', "NaN"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": row()}]}, "datatype"),
        ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": row()[:63]}]}, "shape"),
        ({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": row()}]}, "values"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["0.5"] * 64}]}, "numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row(1e39)}]}, "infinity"),
        ({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row()}]}, "'input'"),
        ({"inputs": [], "extra": 1}, "unknown keys"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row()}], "id": 7}, "'id'"),
        (
            {
                "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row()}],
                "outputs": [{"name": "x"}],
            },
            "output",
        ),
    ],
    ids=["bad-json", "nan", "datatype", "shape", "count", "strings", "overflow-to-inf", "name", "keys", "id", "output"],
)
def test_a_malformed_infer_request_is_a_400_that_says_why(server: ApiServer, body: Any, reason: str) -> None:
    status, answer = call(server, "POST", "/v2/models/digits/infer", body)
    assert status == 400
    assert reason in answer["error"]


def test_a_connection_stays_open_after_a_400_whose_body_was_read(server: ApiServer) -> None:
    connection = connect(server.address)
    try:
        connection.request("POST", "/v2/models/digits/infer", body=b"{")
        first = connection.getresponse()
        first.read()
        assert first.status == 400 and not first.will_close
        connection.request("POST", "/v2/models/digits/infer", body=json.dumps(infer_request(np.zeros((1, 64)))))
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_an_unknown_model_or_route_is_404_and_a_wrong_method_405(server: ApiServer) -> None:
    status, answer = call(server, "POST", "/v2/models/nope/infer", infer_request(np.zeros((1, 64))))
    assert status == 404 and "digits" in answer["error"], "the error lists the served models"
    assert call(server, "GET", "/v2/nothing")[0] == 404
    assert call(server, "GET", "/v2/models/digits/infer")[0] == 405
    assert call(server, "POST", "/v2/health/ready", {})[0] == 405


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["plain", "expect-100-continue"])
def test_an_oversized_body_is_refused_413_from_its_content_length_without_being_sent(
    server: ApiServer, expect: bytes
) -> None:
    headers = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (expect, 2**20 + 1)
    started = time.monotonic()
    answer = raw_exchange(server, headers)  # no body follows: a server that waited for it would time out
    assert answer.startswith(b"HTTP/1.1 413 ") and b"cap" in answer, "413 at once, never 100 Continue"
    assert time.monotonic() - started < 1.5


def test_a_client_that_sends_an_oversized_body_anyway_still_reads_the_413(server: ApiServer) -> None:
    status, answer = call(server, "POST", "/v2/models/digits/infer", b"[" + b"0," * 2**20 + b"0]")
    assert status == 413 and "cap" in answer["error"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"", b"411"),
        (b"Transfer-Encoding: chunked\r\n", b"411"),
        (b"Content-Length: ten\r\n", b"400"),
        (b"Content-Length: 2\r\nContent-Length: 2\r\n", b"400"),
    ],
    ids=["missing", "chunked", "not-a-number", "twice"],
)
def test_a_body_without_one_valid_content_length_is_refused(server: ApiServer, headers: bytes, expected: bytes) -> None:
    request = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}"
    answer = raw_exchange(server, request)
    assert answer.split(b" ", 2)[1] == expected and b'"error"' in answer


def test_a_client_too_slow_to_send_its_body_gets_408(core: AgentCore) -> None:
    with serve(core, timeout_s=0.5) as api:
        headers = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        started = time.monotonic()
        assert raw_exchange(api, headers).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 4


def test_connections_over_the_cap_get_503_at_once(core: AgentCore) -> None:
    with serve(core, timeout_s=5.0, max_connections=1) as api:
        held = connect(api.address)
        held.request("GET", "/v2/health/live")
        held.getresponse().read()  # a keep-alive connection now holds the only slot
        try:
            assert call(api, "GET", "/v2/health/live")[0] == 503
        finally:
            held.close()
        deadline = time.monotonic() + 5
        while call(api, "GET", "/v2/health/live")[0] != 200:
            assert time.monotonic() < deadline, "the slot came back when the connection closed"
            time.sleep(0.05)


def test_feedback_feeds_the_confusion_counts_and_an_unknown_id_is_404(
    server: ApiServer, core: AgentCore, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    status, answer = call(server, "POST", "/v2/models/digits/infer", infer_request(x[:20]))
    assert status == 200
    predicted = np.asarray(answer["outputs"][0]["data"]).reshape(20, 10).argmax(axis=1)
    ids = answer["parameters"]["prediction_ids"]
    for prediction_id, label in zip(ids, y[:20].tolist(), strict=True):
        status, body = call(
            server, "POST", "/v2/models/digits/feedback", {"prediction_id": prediction_id, "label": label}
        )
        assert (status, body) == (204, None)

    window = core.models["digits"].telemetry.flush()
    confusion = np.asarray(window["feedback"])
    assert confusion.sum() == 20
    assert np.trace(confusion) == int((predicted == y[:20]).sum())

    assert call(server, "POST", "/v2/models/digits/feedback", {"prediction_id": ids[0], "label": 1})[0] == 404
    assert call(server, "POST", "/v2/models/digits/feedback", {"prediction_id": "nope", "label": 1})[0] == 404
    for bad in ({"prediction_id": "x", "label": 10}, {"prediction_id": "x", "label": True}, {"label": 1}):
        assert call(server, "POST", "/v2/models/digits/feedback", bad)[0] == 400


def test_the_unix_socket_is_0660_replaces_a_stale_one_and_refuses_a_live_one(
    tmp_path: Path, core: AgentCore, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "run" / "infer.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # what a crashed agent leaves behind
    with serve(core, f"unix:{path}") as api:
        assert api.address == f"unix:{path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        status, answer = call(api, "POST", "/v2/models/digits/infer", infer_request(digits[0][:3]))
        assert status == 200 and answer["outputs"][0]["shape"] == [3, 10]
        with pytest.raises(OSError, match="another process is serving"):
            serve(core, f"unix:{path}")
    assert not path.exists(), "the socket is removed on stop"

    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        serve(core, f"unix:{path}")
    assert path.read_text() == "not a socket"


def test_requests_during_model_switches_never_fail(
    core: AgentCore, example_model: Callable[[str], Path], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    good, better = example_model("good"), example_model("better")
    releases = [
        ModelConfig("digits", good / "int8.onnx", good / "card.json", "digits:1.0.0"),
        ModelConfig("digits", better / "int8.onnx", better / "card.json", "digits:1.1.0"),
        ModelConfig("digits", good / "int8.tflite", good / "card.json", "digits:1.0.0-tflite"),
    ]
    body = json.dumps(infer_request(digits[0][:4])).encode()
    failures: list[str] = []
    versions: set[str] = set()
    answered = [0]
    done = threading.Event()

    def hammer() -> None:
        connection = connect(api.address)
        try:
            while not done.is_set():
                connection.request("POST", "/v2/models/digits/infer", body=body)
                response = connection.getresponse()
                answer = json.loads(response.read())
                output = answer.get("outputs", [{}])[0]
                if response.status != 200 or output.get("shape") != [4, 10] or len(output["data"]) != 40:
                    failures.append(f"{response.status}: {answer}")
                    continue
                versions.add(answer["model_version"])
                answered[0] += 1
        except Exception as exc:  # a dropped connection is a failure too
            failures.append(repr(exc))
        finally:
            connection.close()

    replaced: list[Model] = []
    with serve(core) as api:
        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for client in clients:
            client.start()
        for i in range(45):
            old = core.activate(releases[(i + 1) % len(releases)])
            assert old is not None
            replaced.append(old.model)  # closed only when no request can still hold it
            time.sleep(0.01)
        done.set()
        for client in clients:
            client.join(10)
    for model in replaced:
        model.close()
    assert failures == []
    assert answered[0] > 100
    assert versions == {r.release for r in releases}


def test_each_request_is_one_log_line_without_input_data(server: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.server")
    marker = 0.123456789
    call(server, "POST", "/v2/models/digits/infer", infer_request(np.full((1, 64), marker)))
    call(server, "POST", "/v2/models/digits/infer", {"inputs": [{"name": "input", "data": [marker]}]})
    lines = [r for r in caplog.records if r.name == "agent.server" and r.getMessage().startswith("api_")]
    assert [(r.getMessage(), r.levelno) for r in lines] == [
        ("api_request", logging.DEBUG),
        ("api_error", logging.WARNING),
    ]
    fields = [r.edgefleet_fields for r in lines]  # type: ignore[attr-defined]
    assert fields[0]["status"] == 200 and fields[1]["status"] == 400 and fields[1]["model"] == "digits"
    assert "0.1234" not in caplog.text and all("0.1234" not in json.dumps(f, default=str) for f in fields)


def test_a_non_loopback_address_is_served_with_a_loud_warning(
    core: AgentCore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.server")  # whatever level an earlier in-process CLI left
    with serve(core, "0.0.0.0:0") as api:
        assert call(api, "GET", "/v2/health/live")[0] == 200
    assert any(r.getMessage() == "api_not_loopback" and r.levelno == logging.WARNING for r in caplog.records)


def test_stop_does_not_wait_for_idle_keep_alive_connections(core: AgentCore) -> None:
    api = serve(core, timeout_s=30.0)
    api.start()
    idle = connect(api.address)
    idle.request("GET", "/v2/health/live")
    idle.getresponse().read()
    started = time.monotonic()
    api.stop()
    idle.close()
    assert time.monotonic() - started < 2


def test_the_api_table_is_parsed_and_checked(tmp_path: Path) -> None:
    base = 'device_id = "pi"\nstate_dir = "s"\n[mqtt]\nbroker = "mqtt://localhost:1883"\n'
    path = tmp_path / "agent.toml"
    path.write_text(base)
    assert load(path).api == ApiConfig(enabled=True, listen="127.0.0.1:8321", max_body_bytes=4 * 2**20)
    path.write_text(base + '[api]\nlisten = "unix:/run/edge-agent/infer.sock"\nmax_body_mb = 0.5\nenabled = false\n')
    assert load(path).api == ApiConfig(enabled=False, listen="unix:/run/edge-agent/infer.sock", max_body_bytes=2**19)
    for table, key in [
        ('listen = "8321"', "listen"),
        ('listen = "unix:relative.sock"', "absolute"),
        ("max_body_mb = 0", "max_body_mb"),
        ('enabled = "yes"', "enabled"),
        ("port = 1", "unknown"),
    ]:
        path.write_text(base + "[api]\n" + table + "\n")
        with pytest.raises(ConfigError, match=key):
            load(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def edge_agent(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())", *args]


def test_edge_agent_run_serves_the_endpoint_and_stops_on_sigterm(
    tmp_path: Path, broker: MosquittoBroker, example_model: Callable[[str], Path], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    folder = example_model("good")
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
device_id = "api-cli"
state_dir = "{tmp_path / "state"}"

[mqtt]
broker = "{broker.url}"

[[models]]
name = "digits"
path = "{folder / "int8.onnx"}"
card = "{folder / "card.json"}"
release = "{RELEASE}"

[api]
listen = "{listen}"
"""
    )
    agent = subprocess.Popen(edge_agent("run", "--config", str(config)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                connection = connect(listen, timeout=2)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the agent never became ready"
                time.sleep(0.1)
            finally:
                connection.close()
        x, y = digits
        request = json.dumps(infer_request(x[:8])).encode()
        connection = connect(listen)
        connection.request("POST", "/v2/models/digits/infer", body=request)
        answer = json.loads(connection.getresponse().read())
        connection.close()
        predicted = np.asarray(answer["outputs"][0]["data"]).reshape(8, 10).argmax(axis=1)
        assert answer["model_version"] == RELEASE and (predicted == y[:8]).mean() >= 0.75

        rows = tmp_path / "rows.json"
        rows.write_text(json.dumps(x[:2].tolist()))
        cli = subprocess.run(edge_agent("infer", "--config", str(config), "digits", "--input", str(rows)),
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert [line.split()[2] for line in cli.stdout.splitlines()] == [str(v) for v in predicted[:2]]

        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=15)
        assert agent.returncode == 0
        events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
        assert events.index("api_listening") < events.index("api_stopped") < events.index("agent_exit")
    finally:
        agent.kill()


def test_edge_agent_run_exits_1_when_its_api_address_is_taken(
    tmp_path: Path, broker: MosquittoBroker, example_model: Callable[[str], Path]
) -> None:
    folder = example_model("good")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'device_id = "api-taken"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{broker.url}"\n'
            f'[[models]]\nname = "digits"\npath = "{folder / "int8.onnx"}"\n'
            f'[api]\nlisten = "127.0.0.1:{taken.getsockname()[1]}"\n'
        )
        run = subprocess.run(edge_agent("run", "--config", str(config)), capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "api_bind_failed" in run.stderr
    assert "agent_started" not in run.stderr, "a taken address fails before the agent announces itself"


def test_a_wrong_label_or_model_keeps_the_prediction_id_for_a_corrected_call(
    core: AgentCore, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    pid = core.infer("digits", x[:1]).prediction_ids[0]
    with pytest.raises(ValueError):
        core.feedback(pid, 10)
    with pytest.raises(KeyError):
        core.feedback(pid, 1, model_name="other")
    core.feedback(pid, 1, model_name="digits")
    with pytest.raises(KeyError):
        core.feedback(pid, 1)
    assert np.asarray(core.models["digits"].telemetry.flush()["feedback"]).sum() == 1
