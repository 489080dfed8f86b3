"""Every command explains itself, and every command that reads state can answer in JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.cli import main as edge_agent
from firmware_sim.cli import main as firmware_sim
from fleet.cli import main as fleet

#: Commands that change state or run a service; every other leaf command reads, and must offer --json.
WRITERS = {"fleet serve", "fleet release revoke", "fleet release publish", "fleet assign", "fleet enroll",
           "fleet init", "fleet model example", "firmware-sim run"}  # fmt: skip


def leaves(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from leaves(command, path)
        else:
            yield path, command


COMMANDS = [*leaves(fleet, "fleet"), *leaves(firmware_sim, "firmware-sim")]


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_has_help_and_reads_offer_json(path: str, command: click.Command) -> None:
    root = fleet if path.startswith("fleet") else firmware_sim
    result = CliRunner().invoke(root, [*path.split()[1:], "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    assert path in WRITERS or "--json" in options, f"{path} reads state but has no --json"


@pytest.mark.parametrize("command", ["run", "status", "infer"])
def test_every_edge_agent_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        edge_agent([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: edge-agent" in capsys.readouterr().out


def test_edge_agent_status_shows_slots_and_the_install_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The human view renders what a running agent leaves in status.json (its shape is Installer._save's)."""
    (tmp_path / "state").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pi-1"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1"\n'
    )
    slot = {"release": "digits:1.1.0", "counter": 2, "sha256": "abc123abc123", "factory": False}
    factory = {"release": "digits:1.0.0", "counter": 0, "sha256": "def456def456", "factory": True}
    install = {"state": "PROBATION", "release": "digits:1.1.0", "seq": 3, "reason": "", "detail": "", "restarts": 1,
               "last_outcome": {"outcome": "rolled_back", "release": "digits:1.0.5"}}  # fmt: skip
    status = {"device_id": "pi-1", "pid": os.getpid(), "running": True, "broker": "mqtt://127.0.0.1:1",
              "models": {"digits": {"release": "digits:1.1.0", "runtime": "onnxruntime", "file": "m.onnx",
                                    "slots": {"active": slot, "previous": factory, "staged": None},
                                    "install": install}}}  # fmt: skip
    (tmp_path / "state" / "status.json").write_text(json.dumps(status))
    assert edge_agent(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "active   digits:1.1.0  sha256 abc123abc123" in out
    assert "previous digits:1.0.0" in out
    assert "install  PROBATION  digits:1.1.0" in out
    assert "last     rolled_back  digits:1.0.5" in out
