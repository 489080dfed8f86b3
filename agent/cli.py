"""`edge-agent`: the on-device daemon and its local commands.

argparse, not click: the device installs without the fleet manager's dependencies.

Every failure a person can fix ends in one line on stderr that says what is wrong and what to change (the file, the
agent.toml key), and an exit code that scripts and systemd can trust (:data:`EXIT_CODES`, also in ``--help``); the
structured JSON log lines stay as they are, for machines.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from agent import __version__, runtime
from agent import logs as agent_logs
from agent.config import AgentConfig, ConfigError, load
from agent.errors import EdgefleetError
from agent.pids import pid_alive

if TYPE_CHECKING:
    from http.client import HTTPConnection

    from agent.core import AgentCore
    from agent.reactor import Reactor

DEFAULT_CONFIG = Path(os.environ.get("EDGE_AGENT_CONFIG", "/etc/edge-agent/agent.toml"))

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_MODEL, EXIT_BUSY = 0, 1, 2, 3, 4, 5
#: What each exit code means; stable, so systemd (RestartPreventExitStatus=) and scripts can act on them.
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_FAILURE: "the agent failed (its [api] listen address taken, say), or the local endpoint answered an error",
    EXIT_USAGE: "bad arguments, or agent.toml (or a file or folder it names) cannot be used",
    EXIT_NOT_RUNNING: "no agent is running with this agent.toml (status)",
    EXIT_MODEL: "a model agent.toml names cannot be served (missing, damaged, or its card does not fit)",
    EXIT_BUSY: "another edge-agent is running on the same state_dir (run)",
}
#: The lock file in the state folder: one `edge-agent run` per folder holds it (flock) with its pid written in it.
STATE_LOCK = "agent.lock"
log = logging.getLogger("agent")


class CommandError(EdgefleetError):
    """A command that cannot do its job: ``detail`` says what is wrong, ``fix`` what to change, and it exits with
    ``exit_code``."""

    def __init__(self, reason: str, detail: str, fix: str, exit_code: int) -> None:
        super().__init__(reason, detail)
        self.fix = fix
        self.exit_code = exit_code


def _run(args: argparse.Namespace) -> int:
    from agent.reactor import Reactor
    from agent.server import ApiServer

    config = load(args.config)
    agent_logs.setup(args.log_level or config.log_level)
    _lock_state_dir(config.state_dir, args.config)  # before anything else touches the folder; held until exit
    reactor = Reactor()
    core = _core(config, reactor, args.config)
    server = None
    if config.api.enabled:
        try:  # bound before the core starts, so a taken address fails before the agent announces itself
            server = ApiServer(core, config.api)
        except OSError as exc:
            agent_logs.event(log, "api_bind_failed", logging.ERROR, listen=config.api.listen, reason=str(exc))
            core.close()
            raise _unbindable(config.api.listen, exc, args.config) from None

    def on_signal(signum: int, _frame: Any) -> None:
        agent_logs.event(log, "signal_received", signal=signal.Signals(signum).name)
        reactor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    core.start()
    if server is not None:
        server.start()
    agent_logs.event(log, "agent_running", device_id=config.device_id, broker=config.broker.url,
                     state_dir=str(config.state_dir), models=sorted(core.models),
                     api=server.address if server else None)  # fmt: skip
    try:
        reactor.run()
    finally:
        if server is not None:  # before the core: requests in flight finish on models that are still open
            server.stop()
        core.stop()
        reactor.close()
    agent_logs.event(log, "agent_exit", device_id=config.device_id)
    return EXIT_OK


def _lock_state_dir(state_dir: Path, path: Path) -> None:
    """Make this process the only agent on ``state_dir``: an exclusive, non-blocking flock on its lock file, which
    stays open (close-on-exec) until the process ends. The kernel drops the lock with the process, SIGKILL included,
    so a lock file left behind never blocks a start; a second agent would knock the first off the broker (same client
    id) and write the same outbox and slots."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / STATE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        fix = f"state_dir in {path} must name a folder this user can write"
        raise CommandError("state_dir_unusable", f"cannot use {exc.filename or state_dir} ({exc.strerror})", fix,
                           EXIT_USAGE) from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
        detail = f"another edge-agent ({pid}) is running on state folder {state_dir}"
        fix = f"stop it, or set another state_dir in {path}"
        agent_logs.event(log, "agent_start_failed", logging.ERROR, reason="state_dir_busy", detail=detail)
        raise CommandError("state_dir_busy", detail, fix, EXIT_BUSY) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _core(config: AgentConfig, reactor: Reactor, path: Path) -> AgentCore:
    """The agent core, or a :class:`CommandError` naming what to fix in agent.toml when it cannot be built."""
    from agent.core import AgentCore, CardError
    from agent.outbox import OutboxError

    try:
        return AgentCore(config, reactor)
    except runtime.RuntimeLayerError as exc:  # a factory model: an installed release that fails is reverted instead
        key = "card" if isinstance(exc, CardError) else "path"
        failed = CommandError("model_unavailable", str(exc), f"it is set by [[models]] {key} in {path}", EXIT_MODEL)
    except OSError as exc:  # the state folder (or a file in it) cannot be created or opened
        fix = f"state_dir in {path} must name a folder this user can write"
        detail = f"cannot use {exc.filename or config.state_dir} ({exc.strerror})"
        failed = CommandError("state_dir_unusable", detail, fix, EXIT_USAGE)
    except OutboxError as exc:  # its message names the file and what to do
        failed = CommandError("outbox_unusable", str(exc), "", EXIT_FAILURE)
    agent_logs.event(log, "agent_start_failed", logging.ERROR, reason=failed.reason, detail=failed.detail)
    raise failed


def _unbindable(listen: str, exc: OSError, path: Path) -> CommandError:
    """The endpoint cannot listen: say where, why, and the key that moves it."""
    if exc.errno == errno.EADDRINUSE:
        detail = f"{listen} is already in use (another edge-agent running?)"
    else:
        detail = f"cannot listen at {listen} ({exc.strerror})"
    fix = f"set [api] listen in {path} to a free host:port or a unix:/path, or enabled = false"
    return CommandError("api_unavailable", detail, fix, EXIT_FAILURE)


def _status(args: argparse.Namespace) -> int:
    config = load(args.config)
    path = config.state_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        status = {"device_id": config.device_id, "running": False, "note": "the agent has not run yet"}
    except PermissionError:
        fix = "run it as the agent's user (or with sudo)"
        raise CommandError("status_unreadable", f"{path} is not readable by this user", fix, EXIT_FAILURE) from None
    except (OSError, ValueError) as exc:  # a running agent replaces it whole, so a bad one was left by something else
        fix = "remove it; the agent writes it again when it runs"
        raise CommandError("status_unreadable", f"cannot read {path} ({exc})", fix, EXIT_FAILURE) from None
    status["running"] = bool(status.get("running")) and pid_alive(int(status.get("pid", 0)))
    if status.get("updated_at"):
        status["age_s"] = round(time.time() - float(status["updated_at"]), 1)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(f"device   {status['device_id']}  ({'running' if status['running'] else 'stopped'})")
        if "broker" in status:
            print(f"broker   {status['broker']}  ({'connected' if status.get('connected') else 'disconnected'})")
        for name, m in status.get("models", {}).items():
            print(f"model    {name}  {m.get('release') or '-'}  [{m.get('runtime')}] {m.get('file')}")
            for slot, record in (m.get("slots") or {}).items():
                if record:
                    print(f"  {slot:9s}{record['release']}  sha256 {record['sha256']}")
            if install := m.get("install"):
                why = f"  ({install['reason']})" if install.get("reason") else ""
                print(f"  install  {install['state']}  {install.get('release') or ''}{why}")
                if outcome := install.get("last_outcome"):
                    print(f"  last     {outcome.get('outcome')}  {outcome.get('release') or ''}")
                if retry := install.get("next_retry"):
                    wait = max(0.0, float(retry["at"]) - time.time())
                    print(f"  retry    {retry['release']} in {wait:.0f} s (attempt {retry['attempt']}, "
                          f"after {retry['after']})")  # fmt: skip
        if "outbox" in status:
            o = status["outbox"]
            print(f"outbox   {o.get('rows')} queued, {o.get('dropped_total')} dropped in all")
    if not status["running"]:
        since = f" (last seen {status['age_s']:g} s ago)" if "age_s" in status else ""
        start = f"start it: edge-agent run --config {args.config} (or systemctl start edge-agent)"
        print(f"edge-agent: the agent of {status['device_id']} is not running{since}; {start}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


def _infer(args: argparse.Namespace) -> int:
    """Ask the running agent over its local endpoint: a check for integrators, and the endpoint's own example."""
    from agent.server import connect

    config = load(args.config)
    try:
        given = json.loads(sys.stdin.read() if args.input == "-" else Path(args.input).read_text())
    except (OSError, ValueError) as exc:
        print(f"edge-agent: cannot read the input ({exc})", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(given, dict | list) or not given:
        print(
            "edge-agent: the input must be an OIP infer request, a row of features or a list of rows", file=sys.stderr
        )
        return EXIT_USAGE
    path = f"/v2/models/{quote(args.model, safe='')}"
    connection = connect(config.api.listen)
    try:
        request = given
        if isinstance(given, list):
            rows = given if isinstance(given[0], list) else [given]
            status, meta = _call(connection, "GET", path)
            if status != 200:
                print(f"edge-agent: {meta.get('error')}", file=sys.stderr)
                return EXIT_FAILURE
            tensor = {"name": meta["inputs"][0]["name"], "datatype": "FP32", "shape": [len(rows), len(rows[0])]}
            request = {"inputs": [{**tensor, "data": rows}]}
        status, answer = _call(connection, "POST", f"{path}/infer", request)
    except OSError as exc:
        print(
            f"edge-agent: no agent answers at {config.api.listen} ({exc}): is `edge-agent run` running?",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        connection.close()
    if status != 200:
        print(f"edge-agent: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    output = answer["outputs"][0]
    classes = output["shape"][1]
    for i, prediction_id in enumerate(answer["parameters"]["prediction_ids"]):
        row = output["data"][i * classes : (i + 1) * classes]
        best = max(range(classes), key=row.__getitem__)
        print(f"{i}  class {best}  p={row[best]:.3f}  id {prediction_id}")
    return EXIT_OK


def _call(connection: HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def _log_level(value: str) -> str:
    if value.upper() not in agent_logs.LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(agent_logs.LEVELS)}")
    return value.upper()


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run quantized models on this device and report aggregated telemetry to the fleet over MQTT. "
        "Raw inputs never leave the device.",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent in the foreground (systemd-ready; stops cleanly on SIGTERM)",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"agent.toml (default {DEFAULT_CONFIG})")
    run.add_argument("--log-level", type=_log_level, help="override the config's log level (DEBUG, INFO, ...)")
    run.set_defaults(func=_run)

    status = sub.add_parser(
        "status",
        help="show what the agent on this device is doing",
        epilog=f"exits {EXIT_NOT_RUNNING} when the agent is not running (the last status it left is still shown)",
    )
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"agent.toml (default {DEFAULT_CONFIG})")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)

    infer = sub.add_parser("infer", help="run inputs through a model of the running agent, over its local endpoint")
    infer.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"agent.toml (default {DEFAULT_CONFIG})")
    infer.add_argument("model", metavar="MODEL", help="the model's name in agent.toml")
    infer.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="JSON: a row of features, a list of rows, or an OIP request; - reads stdin",
    )
    infer.add_argument("--json", action="store_true", help="print the endpoint's whole JSON response")
    infer.set_defaults(func=_infer)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"edge-agent: {exc.detail}; {exc.fix}" if exc.fix else f"edge-agent: {exc.detail}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
