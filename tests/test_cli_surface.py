"""Every command explains itself, and every command that reads state can answer in JSON."""

from __future__ import annotations

from collections.abc import Iterator

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
