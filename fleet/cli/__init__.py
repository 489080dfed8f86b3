"""The `fleet` command. Each command group lives in its own module and is attached here."""

from __future__ import annotations

import click

from agent import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
def main() -> None:
    """Manage a fleet of edge devices running quantized ML models."""


def _attach() -> None:
    from fleet.cli import model

    main.add_command(model.model)


_attach()
