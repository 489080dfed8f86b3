"""The `fleet` command. Each command group lives in its own module and is attached here."""

from __future__ import annotations

import click

from agent import __version__, logs
from fleet.cli import assign, audit, devices, drift, enroll, init, model, release, rollout, serve
from fleet.cli.common import FleetGroup


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
def main() -> None:
    """Manage a fleet of edge devices running quantized ML models."""
    # One JSON line per event on stderr, errors only: a command's own message says what went wrong, once.
    # `fleet serve --log-level` sets the service's verbosity.
    logs.setup("ERROR")


def _attach() -> None:
    main.add_command(model.model)
    main.add_command(init.init)
    main.add_command(serve.serve)
    main.add_command(devices.devices)
    main.add_command(devices.telemetry)
    main.add_command(devices.status)
    main.add_command(release.release)
    main.add_command(assign.assign_command)
    main.add_command(assign.desired)
    main.add_command(enroll.enroll)
    main.add_command(audit.audit)
    main.add_command(rollout.rollout)
    main.add_command(drift.drift)


_attach()
