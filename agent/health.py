"""Device health for telemetry windows, read from the kernel directly so the agent needs no psutil.

Every reading is best effort: a value the platform does not offer is left out (``temperature_c`` is None), and
:meth:`HealthSampler.sample` never raises, because health must not break the telemetry it rides on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

_THERMAL_ROOT = Path("/sys/class/thermal")
#: Readings outside this range are a broken or unpopulated sensor, not a temperature (the protocol's range).
_PLAUSIBLE_C = (-100.0, 200.0)


def _process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class HealthSampler:
    """Samples this process and its device. ``cpu_percent`` covers the time since the previous sample.

    ``thermal_root`` is where thermal zones live (sysfs on Linux; another folder in tests).
    """

    def __init__(self, state_dir: Path, *, thermal_root: Path = _THERMAL_ROOT) -> None:
        self.state_dir = state_dir
        self.thermal_root = thermal_root
        self._lock = threading.Lock()
        self._last = (time.monotonic(), _process_cpu_seconds())

    def sample(self) -> dict[str, Any]:
        """A dict with the fields of ``protocol.Health``; unreadable values are omitted."""
        health: dict[str, Any] = {}
        cpu = self._cpu_percent()
        if cpu is not None:
            health["cpu_percent"] = cpu
        rss = _rss_bytes()
        if rss is not None:
            health["rss_bytes"] = rss
        with contextlib.suppress(OSError):
            health["disk_free_bytes"] = shutil.disk_usage(self.state_dir).free
        health["temperature_c"] = self._temperature_c()
        with contextlib.suppress(OSError):  # no load average on this platform
            health["load1"] = round(os.getloadavg()[0], 2)
        return health

    def _cpu_percent(self) -> float | None:
        """Process CPU time over wall time since the last sample; over 100 when several cores are busy."""
        now, cpu = time.monotonic(), _process_cpu_seconds()
        with self._lock:
            (then, cpu_then), self._last = self._last, (now, cpu)
        elapsed = now - then
        if elapsed <= 0:
            return None
        return round(max(0.0, cpu - cpu_then) / elapsed * 100.0, 1)

    def _temperature_c(self) -> float | None:
        """The hottest readable thermal zone (the one that throttles first), in °C, or None."""
        readings = []
        try:
            zones = sorted(self.thermal_root.glob("thermal_zone*/temp"))
        except OSError:
            return None
        for zone in zones:
            try:
                celsius = int(zone.read_text().strip()) / 1000.0  # sysfs reports millidegrees
            except (OSError, ValueError):
                continue
            if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
                readings.append(celsius)
        return round(max(readings), 1) if readings else None


def _rss_bytes() -> int | None:
    """Resident set size now, from /proc/self/statm (pages); None where there is no procfs."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
