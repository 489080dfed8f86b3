"""`edge-agent` on bad input: no traceback, one line that names the fix, an exit code scripts can trust.

`run` is started as a real process (it sets up logging for the whole process); the JSON log lines stay beside the
one line for people.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import EXIT_FAILURE, EXIT_MODEL, EXIT_NOT_RUNNING, EXIT_USAGE, main
from fleet.broker import free_port


def agent_toml(
    tmp_path: Path, *, model: Path | None = None, card: Path | None = None, extra: str = "", listen: str = ""
) -> Path:
    """A config whose broker is never reached (nothing here gets that far) and whose API takes a free port."""
    config = tmp_path / "agent.toml"
    listen = listen or f"127.0.0.1:{free_port()}"
    models = f'[[models]]\nname = "digits"\npath = "{model}"\nrelease = "digits:1.0.0"\n' if model else ""
    models += f'card = "{card}"\n' if card else ""
    config.write_text(
        f'device_id = "cli-1"\nstate_dir = "{tmp_path / "state"}"\n{extra}\n'
        f'[mqtt]\nbroker = "mqtt://127.0.0.1:1"\n\n[api]\nlisten = "{listen}"\n\n{models}'
    )
    return config


def run_agent(config: Path, *args: str) -> tuple[int, list[str], list[dict[str, object]]]:
    """Exit code, the lines for people, and the JSON log lines of `edge-agent run` (which must fail fast here)."""
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, [x for x in lines if not x.startswith("{")], [json.loads(x) for x in lines if x[:1] == "{"]


def test_a_missing_model_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = agent_toml(tmp_path, model=tmp_path / "nowhere.onnx")
    code, said, logged = run_agent(config)
    assert code == EXIT_MODEL
    assert said == [
        f"edge-agent: no model file at {tmp_path / 'nowhere.onnx'}: check the path or reinstall the release; "
        f"it is set by [[models]] path in {config}"
    ]
    assert {"model_load_failed", "agent_start_failed"} <= {line["event"] for line in logged}


def test_a_corrupt_model_names_the_file_and_the_key(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08" + os.urandom(512))  # starts like an ONNX file, is not one
    code, said, _ = run_agent(agent_toml(tmp_path, model=corrupt))
    assert code == EXIT_MODEL and len(said) == 1
    assert said[0].startswith("edge-agent: corrupt.onnx is not a loadable ONNX model")
    assert said[0].endswith(f"it is set by [[models]] path in {tmp_path / 'agent.toml'}")


@pytest.mark.parametrize("card_text", ["{not json", "[1, 2]", '{"drift": {"edges": 5}}'])
def test_a_bad_card_points_at_the_card_key(
    tmp_path: Path, example_model: Callable[[str], Path], card_text: str
) -> None:
    card = tmp_path / "card.json"
    card.write_text(card_text)
    code, said, _ = run_agent(agent_toml(tmp_path, model=example_model("good") / "int8.onnx", card=card))
    assert code == EXIT_MODEL and len(said) == 1
    assert said[0].endswith(f"it is set by [[models]] card in {tmp_path / 'agent.toml'}")


def test_a_taken_api_address_names_it_and_the_key_that_moves_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = agent_toml(tmp_path, listen=address)
        code, said, logged = run_agent(config)
    assert code == EXIT_FAILURE
    assert said == [
        f"edge-agent: {address} is already in use (another edge-agent running?); "
        f"set [api] listen in {config} to a free host:port or a unix:/path, or enabled = false"
    ]
    assert [line["listen"] for line in logged if line["event"] == "api_bind_failed"] == [address]


def test_a_state_dir_that_cannot_be_a_folder_names_the_key(tmp_path: Path) -> None:
    config = agent_toml(tmp_path)
    (tmp_path / "state").write_text("a file where the state folder should be")
    code, said, _ = run_agent(config)
    assert code == EXIT_USAGE
    assert said == [
        f"edge-agent: cannot use {tmp_path / 'state'} (File exists); "
        f"state_dir in {config} must name a folder this user can write"
    ]


def test_a_bad_log_level_is_refused_before_anything_starts(tmp_path: Path) -> None:
    code, said, _ = run_agent(agent_toml(tmp_path, extra='log_level = "chatty"'))
    assert code == EXIT_USAGE
    assert said == [
        "edge-agent: configuration error: log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'chatty'"
    ]
    code, said, _ = run_agent(agent_toml(tmp_path), "--log-level", "chatty")
    assert code == EXIT_USAGE
    assert said[-1].endswith("argument --log-level: 'chatty' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "cannot read config file {path} (Is a directory)"),
        (lambda p: p.write_bytes(b"\xff\xfe device_id"), "{path} is not UTF-8 text"),
        (lambda p: None, "config file {path} not found"),
    ],
)
def test_a_config_path_that_is_no_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "agent.toml"
    make(path)
    for command in ("status", "run", "infer"):
        extra = ["digits", "--input", "-"] if command == "infer" else []
        assert main([command, "--config", str(path), *extra]) == EXIT_USAGE
        said = capsys.readouterr().err.splitlines()
        assert len(said) == 1 and said[0].startswith("edge-agent: configuration error: " + message.format(path=path))


def test_status_exits_3_with_one_line_when_the_agent_is_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = agent_toml(tmp_path)
    assert main(["status", "--config", str(config)]) == EXIT_NOT_RUNNING
    out = capsys.readouterr()
    assert "device   cli-1  (stopped)" in out.out
    fix = f"start it: edge-agent run --config {config} (or systemctl start edge-agent)"
    assert out.err.splitlines() == [f"edge-agent: the agent of cli-1 is not running; {fix}"]

    # An agent that was killed leaves "running": true behind; its pid is gone.
    (tmp_path / "state").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = {"device_id": "cli-1", "pid": int(dead.stdout), "running": True, "updated_at": 1.0}
    (tmp_path / "state" / "status.json").write_text(json.dumps(left))
    assert main(["status", "--config", str(config), "--json"]) == EXIT_NOT_RUNNING
    out = capsys.readouterr()
    assert json.loads(out.out)["running"] is False
    assert len(out.err.splitlines()) == 1 and "is not running (last seen " in out.err


def test_status_of_an_unreadable_status_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = agent_toml(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text("{half a")
    assert main(["status", "--config", str(config)]) == EXIT_FAILURE
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith(f"edge-agent: cannot read {tmp_path / 'state' / 'status.json'}")
    assert said[0].endswith("remove it; the agent writes it again when it runs")


HELP = [
    ([], "  3  no agent is running"),
    (["run"], "  4  a model agent.toml names cannot be served"),
    (["status"], "exits 3 when the agent is not running"),
]


@pytest.mark.parametrize(("command", "documented"), HELP)
def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str], command: list[str], documented: str) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert documented in capsys.readouterr().out
