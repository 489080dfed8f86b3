"""The local inference endpoint: the Open Inference Protocol v2 (KServe/Triton "v2" REST) over HTTP/1.1, on
loopback or a Unix socket, so an application on the device can use the served models from any language.

Endpoints::

    GET  /v2                          server metadata (name, version, extensions)
    GET  /v2/health/live              200 while the process answers
    GET  /v2/health/ready             200 when every configured model is loaded, else 503
    GET  /v2/models/{name}            model metadata: versions [release], platform, inputs and outputs
    GET  /v2/models/{name}/ready      200, 404 (unknown) or 503 (configured, not loaded)
    POST /v2/models/{name}/infer      one FP32 input [batch, features], data flat or nested
    POST /v2/models/{name}/feedback   extension: {"prediction_id": "...", "label": 3} -> 204; 404 for an unknown id

Tensors are FP32 on the wire whatever the model file stores: the runtime layer quantizes and dequantizes inside.
The infer response carries one prediction id per row in ``parameters.prediction_ids``, for the feedback call.

Errors are ``{"error": "..."}``: 400 (bad JSON, NaN/Infinity constants, wrong name/shape/datatype, non-finite
values), 404 (unknown model or route), 405, 408 (body too slow), 411 (no Content-Length; chunked bodies are not
accepted), 413 (body over the cap, refused from its Content-Length without reading it), 500 (the model failed),
503 (not ready, stopping, or too many connections).

Every request is one log line: DEBUG when it succeeded, WARNING with the reason when it did not. Input data never
reaches the logs. There is no authentication: bind to loopback or a Unix socket (0660: the agent's group may call
it); any other address is logged as a warning at start.

Models are looked up per request and :meth:`AgentCore.activate` swaps them atomically, so requests made during a
model update are answered by the old model or the new one, never refused.

Size: this module passes the house's 500 lines on purpose: issue 16 replaces its hand-written HTTP/1.1 server with a
well-kept server stack, so it is not split before it is replaced.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import time
import uuid
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from agent import __version__, runtime
from agent.config import ApiConfig, parse_listen
from agent.core import AgentCore, ServedModel, UnknownModel
from agent.logs import event

log = logging.getLogger(__name__)

#: Concurrent connections, each holding a thread; more are answered 503 at once, so a Pi cannot run out of threads.
MAX_CONNECTIONS = 64
#: The one tensor datatype on the wire (see the module docstring).
DATATYPE = "FP32"
EXTENSIONS = ["feedback"]
#: How long a connection closed on an unread body keeps discarding it, so the client gets to read the response.
LINGER_S = 2.0

_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
_MODEL_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/(ready|infer|feedback))?")
_BUSY_BODY = b'{"error":"too many connections: retry shortly"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class ApiError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiServer:
    """The endpoint for one :class:`AgentCore`. Binds at construction (so a taken address fails before the agent
    announces itself), serves after :meth:`start`, drains in-flight requests on :meth:`stop`."""

    def __init__(self, core: AgentCore, config: ApiConfig, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.core = core
        self.config = config
        self.stopping = False
        target = parse_listen(config.listen)
        self._httpd: _HttpServer = (
            _UnixHttpServer(target, self, max_connections)
            if isinstance(target, Path)
            else _TcpHttpServer(target, self, max_connections)
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """Where it listens, with the real port when the config asked for port 0."""
        return self._httpd.address

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="edge-agent-api", daemon=True
        )
        self._thread.start()
        event(log, "api_listening", address=self.address, max_body_bytes=self.config.max_body_bytes)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded by the timeout), close idle connections."""
        self.stopping = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.close_idle_connections()
        self._httpd.server_close()
        event(log, "api_stopped", address=self.address)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def connect(listen: str, timeout: float = 10.0) -> HTTPConnection:
    """An HTTP connection to an endpoint given as in ``[api] listen`` (``host:port`` or ``unix:/path``)."""
    target = parse_listen(listen)
    if isinstance(target, Path):
        return _UnixHTTPConnection(target, timeout)
    host, port = target
    return HTTPConnection(host, port, timeout=timeout)


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


# -- HTTP servers -----------------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; non-daemon threads so stop() can drain."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 64
    address: str  # where it listens, set when bound

    def __init__(self, address: Any, api: ApiServer, max_connections: int) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            event(log, "api_busy", logging.WARNING, open_connections=len(self._open))
            request.settimeout(0)
            with contextlib.suppress(OSError):
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        with self._open_lock:  # here, on the accepting thread, so stop() sees every connection it accepted
            self._open.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self._slots.release()

    def close_idle_connections(self) -> None:
        """Shut the read side of every open connection: idle keep-alive waits end now, responses still go out."""
        with self._open_lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection failed outside a request (the client vanished mid-response): a log line, not a traceback."""
        event(log, "api_connection_error", logging.DEBUG, error=repr(sys.exc_info()[1]))


class _TcpHttpServer(_HttpServer):
    def __init__(self, target: tuple[str, int], api: ApiServer, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        super().__init__(target, api, max_connections)
        if not ipaddress.ip_address(self.server_name).is_loopback:
            event(
                log,
                "api_not_loopback",
                logging.WARNING,
                address=self.address,
                warning="the inference endpoint has no authentication and is reachable from other machines: "
                'set [api] listen = "127.0.0.1:8321" or a unix: socket unless a firewall guards it',
            )

    def server_bind(self) -> None:
        """HTTPServer's own server_bind looks up the host's FQDN, which can stall start-up on a device with no DNS."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        host = f"[{self.server_name}]" if ":" in self.server_name else self.server_name
        self.address = f"{host}:{self.server_port}"


class _UnixHttpServer(_HttpServer):
    address_family = socket.AF_UNIX

    def __init__(self, path: Path, api: ApiServer, max_connections: int) -> None:
        self._inode = 0
        super().__init__(str(path), api, max_connections)

    def server_bind(self) -> None:
        """Bind a temporary name, set 0660, then rename over the final path: no moment with wider permissions, and
        a stale socket from a crashed agent is replaced in one step. A live one, or a file that is not a socket,
        is left alone and the bind fails."""
        path = Path(self.server_address)
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        _refuse_live_socket(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, 0o660)
            os.rename(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._inode = path.stat().st_ino
        self.server_name, self.server_port = "localhost", 0
        self.address = f"unix:{path}"

    def server_close(self) -> None:
        super().server_close()
        path = Path(self.server_address)
        with contextlib.suppress(OSError):
            if path.stat().st_ino == self._inode:  # still ours, not a successor's
                path.unlink()


def _refuse_live_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens
    finally:
        probe.close()
    raise OSError(f"another process is serving on {path}: stop it or choose another [api] listen")


# -- requests ---------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edge-agent/{__version__}"
    server: _HttpServer

    def setup(self) -> None:
        self.timeout = self.server.api.config.timeout_s  # every read and write; a silent client loses its thread
        super().setup()
        if self.server.address_family != socket.AF_UNIX:  # headers and body are two writes: no Nagle delay between
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_expect_100(self) -> bool:
        """A client that asks before sending its body learns of a 413 without sending it."""
        length = self.headers.get("Content-Length", "")
        if _CONTENT_LENGTH.fullmatch(length) and int(length) > self.server.api.config.max_body_bytes:
            self._dispatch()
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        started = time.perf_counter()
        self._body_read = False
        path = urlsplit(self.path).path
        route = _MODEL_ROUTE.fullmatch(path)
        model, action = (unquote(route[1]), route[2]) if route else (None, None)
        try:
            if self.server.api.stopping:
                self.close_connection = True
                raise ApiError(503, "the agent is stopping")
            status, payload = self._route(path) if model is None else self._model_route(model, action)
        except ApiError as exc:
            status, payload = exc.status, {"error": str(exc)}
        except Exception as exc:  # a bug must cost one request, not the connection's thread
            status, payload = 500, {"error": f"internal error ({type(exc).__name__})"}
        # Logged before the reply goes out, so the line exists even if the client has vanished.
        fields = {"method": self.command, "path": path, "status": status, "model": model}
        fields["ms"] = round((time.perf_counter() - started) * 1000, 3)
        if status < 400:
            event(log, "api_request", logging.DEBUG, **fields)
        else:
            event(log, "api_error", logging.WARNING, **fields, error=payload["error"])
        self._reply(status, payload)

    def _route(self, path: str) -> tuple[int, dict[str, Any]]:
        api = self.server.api
        if path in ("/v2", "/v2/"):
            self._allow("GET")
            return 200, {"name": "edge-agent", "version": __version__, "extensions": EXTENSIONS}
        if path == "/v2/health/live":
            self._allow("GET")
            return 200, {"live": True}
        if path == "/v2/health/ready":
            self._allow("GET")
            missing = sorted({m.name for m in api.core.config.models} - set(api.core.models))
            if missing:
                raise ApiError(503, f"models not loaded yet: {missing}")
            return 200, {"ready": True}
        raise ApiError(404, f"no route {path}: see /v2 and the Open Inference Protocol v2")

    def _model_route(self, name: str, action: str | None) -> tuple[int, dict[str, Any] | None]:
        """/v2/models/{name}[/action]; only POST routes read a body, after the model is found."""
        if action is None:
            self._allow("GET")
            return 200, _model_metadata(name, self._served(name))
        if action == "ready":
            self._allow("GET")
            self._served(name)
            return 200, {"name": name, "ready": True}
        self._allow("POST")
        served = self._served(name)
        body = self._read_json()
        if action == "infer":
            return 200, _infer(self.server.api.core, name, served, body)
        _feedback(self.server.api.core, served, body)
        return 204, None

    def _allow(self, method: str) -> None:
        if self.command != method:
            raise ApiError(405, f"{self.command} is not allowed here; use {method}")

    def _served(self, name: str) -> ServedModel:
        core = self.server.api.core
        served = core.models.get(name)
        if served is not None:
            return served
        if any(m.name == name for m in core.config.models):
            raise ApiError(503, f"model {name!r} is not loaded yet")
        raise ApiError(404, f"no model named {name!r}; served: {sorted(core.models)}")

    def _read_json(self) -> Any:
        """Size cap first (from Content-Length, before reading a byte), then strict JSON: no NaN or Infinity."""
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411 if not lengths else 400, "chunked bodies are not accepted: send Content-Length")
        if not lengths:
            raise ApiError(411, "Content-Length is required")
        if len(lengths) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0]):
            raise ApiError(400, "invalid Content-Length")
        size, cap = int(lengths[0]), self.server.api.config.max_body_bytes
        if size > cap:
            raise ApiError(413, f"body of {size} bytes is over the {cap}-byte cap: send smaller batches")
        body = self._read_body(size)
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None

    def _read_body(self, size: int) -> bytes:
        """Read exactly ``size`` bytes within the timeout in all: a client trickling bytes cannot hold the thread."""
        deadline = time.monotonic() + self.server.api.config.timeout_s
        chunks, remaining = [], size
        try:
            while remaining:
                if time.monotonic() > deadline:
                    raise ApiError(408, f"the body did not arrive within {self.server.api.config.timeout_s} s")
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    raise ApiError(400, "the body ended before Content-Length bytes")
                chunks.append(chunk)
                remaining -= len(chunk)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.server.api.config.timeout_s} s") from None
        self._body_read = True
        return b"".join(chunks)

    def _reply(self, status: int, payload: dict[str, Any] | None) -> None:
        # An unread body would be parsed as the next request: such a connection is closed after the reply. A POST
        # without Content-Length may have a body of unknown length too.
        has_body = (
            self.command == "POST"
            or self.headers.get("Content-Length", "0") != "0"
            or "Transfer-Encoding" in self.headers
        )
        unread = has_body and not self._body_read
        self.close_connection = self.close_connection or unread
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if unread:
            self._linger()

    def _linger(self) -> None:
        """Discard what the client still sends, briefly, before closing: closing on unread data resets the
        connection, and a client still sending its body would then lose the response (the 413 above all)."""
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (bad request line, oversized headers, unknown method): JSON, then close.
        The log gets the status phrase only: http.server's message may quote the request line."""
        self.close_connection = True
        phrase = self.responses.get(code, ("error",))[0]
        body = json.dumps({"error": message or phrase}).encode()
        with contextlib.suppress(OSError):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        event(log, "api_error", logging.WARNING, method=self.command, status=code, error=phrase)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """_dispatch logs each request once, as a structured line."""

    def log_message(self, format: str, *args: Any) -> None:
        event(log, "api_connection", logging.DEBUG, message=format % args)


def _brief(value: Any) -> str:
    """A client's value quoted in an error (which is also logged): short, so it cannot carry a batch of data."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON: send finite numbers only")


def _fields(value: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    if unknown := set(value) - allowed:
        raise ApiError(400, f"{what}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def _shape(spec: runtime.TensorSpec) -> list[int]:
    return [-1 if d is None else d for d in spec.shape]


def _model_metadata(name: str, served: ServedModel) -> dict[str, Any]:
    model = served.model
    return {
        "name": name,
        "versions": [served.config.release] if served.config.release else [],
        "platform": model.runtime,
        "inputs": [{"name": s.name, "datatype": DATATYPE, "shape": _shape(s)} for s in model.inputs],
        # predict() returns the first output only, so that is the one the endpoint offers
        "outputs": [{"name": model.outputs[0].name, "datatype": DATATYPE, "shape": _shape(model.outputs[0])}],
    }


def _input_batch(served: ServedModel, request: dict[str, Any]) -> np.ndarray:
    """The request's one input tensor as float32 [batch, features], or a 400 that says what to send instead."""
    spec = served.model.inputs[0]
    features = spec.shape[1]
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ApiError(400, f"'inputs' must be a list of one tensor, named {spec.name!r}")
    tensor = _fields(inputs[0], "inputs[0]", {"name", "shape", "datatype", "data", "parameters"})
    if tensor.get("name") != spec.name:
        raise ApiError(400, f"input {_brief(tensor.get('name'))} is unknown: the model's input is {spec.name!r}")
    if tensor.get("datatype") != DATATYPE:
        raise ApiError(400, f"input datatype {_brief(tensor.get('datatype'))} is not supported: send {DATATYPE}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[0] < 1
        or shape[1] != features
    ):
        raise ApiError(400, f"input shape {_brief(shape)} does not fit the model: send [batch, {features}], batch >= 1")
    try:
        data = np.asarray(tensor.get("data"))
    except ValueError:
        raise ApiError(400, "input data is ragged: send a flat list or one nested as the shape") from None
    if data.dtype.kind not in "iuf":
        raise ApiError(400, "input data must be a list of numbers")
    if data.size != shape[0] * shape[1] or (data.ndim != 1 and list(data.shape) != shape):
        raise ApiError(400, f"input data has {data.size} values in shape {list(data.shape)}; shape {shape} needs "
                            f"{shape[0] * shape[1]}, flat or nested as the shape")  # fmt: skip
    with np.errstate(over="ignore"):  # a value beyond float32 becomes infinity, which the runtime then refuses
        return data.astype(np.float32).reshape(shape)


def _infer(core: AgentCore, name: str, served: ServedModel, body: Any) -> dict[str, Any]:
    request = _fields(body, "the request", {"id", "inputs", "outputs", "parameters"})
    request_id = request.get("id", uuid.uuid4().hex[:16])
    if not isinstance(request_id, str):
        raise ApiError(400, "'id' must be a string")
    output = served.model.outputs[0].name
    for wanted in request.get("outputs") or []:
        if _fields(wanted, "outputs[]", {"name", "parameters"}).get("name") != output:
            raise ApiError(
                400, f"requested output {_brief(wanted.get('name'))} is unknown: the model's output is {output!r}"
            )
    x = _input_batch(served, request)
    try:
        result = core.infer(name, x)
    except UnknownModel as exc:
        raise ApiError(404, str(exc.args[0])) from None
    except runtime.InputError as exc:  # NonFiniteInput included: the rows are named, the values are not
        raise ApiError(400, str(exc)) from None
    except runtime.RuntimeLayerError as exc:
        raise ApiError(500, str(exc)) from None
    outputs = result.outputs
    if not np.isfinite(outputs).all():
        raise ApiError(500, f"{name} returned NaN or infinity: the model is faulty, roll back to the previous release")
    return {
        "model_name": name,
        "model_version": result.release,
        "id": request_id,
        "outputs": [
            {"name": output, "shape": list(outputs.shape), "datatype": DATATYPE, "data": outputs.ravel().tolist()}
        ],
        "parameters": {"prediction_ids": result.prediction_ids},
    }


def _feedback(core: AgentCore, served: ServedModel, body: Any) -> None:
    request = _fields(body, "feedback", {"prediction_id", "label"})
    prediction_id, label = request.get("prediction_id"), request.get("label")
    if not isinstance(prediction_id, str):
        raise ApiError(400, "'prediction_id' must be a string from an infer response's parameters.prediction_ids")
    classes = served.telemetry.n_classes
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < classes:
        raise ApiError(400, f"'label' must be an integer class in [0, {classes})")
    try:
        core.feedback(prediction_id, label, model_name=served.config.name)
    except ValueError as exc:
        raise ApiError(400, f"'label': {exc}") from None
    except KeyError:
        raise ApiError(
            404, f"unknown prediction id {_brief(prediction_id)}: never issued, already labelled or too old"
        ) from None
