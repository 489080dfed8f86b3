"""The installed `fleet` command. A device install (``pip install 'edgefleet[agent]'``) has the command too, but not
what it runs on: say which extra to install instead of a ``ModuleNotFoundError`` traceback.

Stdlib only: this module must import where the fleet extra is missing.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

#: Top-level modules of the fleet extra that every `fleet` command needs at start (the CLI, its tables, the store).
FLEET_MODULES = ("click", "rich", "sqlite_utils")


def main() -> None:
    if any(find_spec(name) is None for name in FLEET_MODULES):
        sys.exit("fleet needs the fleet extra: pip install 'edgefleet[fleet]'")
    from fleet.cli import main as cli

    cli()
