"""What every benchmark records about the machine it ran on, so figures from different runs can be compared."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "mosquitto": mosquitto[0] if mosquitto else "?",
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
