"""The installed `firmware-sim` command. A device install (``pip install 'edgefleet[agent]'``) has the command too,
but not what it runs on: say which extra to install instead of a ``ModuleNotFoundError`` traceback.

Stdlib only: this module must import where the sim extra is missing.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

#: Top-level modules of the sim extra that firmware-sim imports (its own, and those of the agent and fleet parts
#: it uses): click, the agent's runtime and link, and the example model's training and export.
SIM_MODULES = ("click", "numpy", "paho", "msgspec", "onnxruntime", "sklearn", "onnx", "flatbuffers", "tflite")


def main() -> None:
    if any(find_spec(name) is None for name in SIM_MODULES):
        sys.exit("firmware-sim needs the sim extra: pip install 'edgefleet[sim]'")
    from firmware_sim.cli import main as cli

    cli()
