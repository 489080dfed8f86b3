"""Open files for N simulated devices, against the process's limit on them (``RLIMIT_NOFILE``).

Measured by sampling ``/proc/PID/fd`` of `firmware-sim run` against a real mosquitto (every device connected,
windows flushing each second): at most 51 open files with 10 devices, 411 with 100. Each device holds 4 while it
runs: its MQTT socket, and its outbox's SQLite database, write-ahead log and shared-memory index. The process holds
11 of its own: stdio and the like (5), the reactor's epoll and wake-up socket pair (3), and ONNX Runtime's SQLite
telemetry database (3). Writing a device's status file opens one or two more for a moment.
``tests/test_sim_cli.py`` checks the per-device figure.
"""

from __future__ import annotations

import resource

#: Files each simulated device keeps open while it runs.
FDS_PER_DEVICE = 4
#: The process's own (11 measured), with room for the brief ones.
FDS_FIXED = 32


class TooManyDevices(Exception):
    """The hard limit on open files is below what the devices need; the message says how to raise it."""


def files_needed(devices: int) -> int:
    return FDS_PER_DEVICE * devices + FDS_FIXED


def ensure_open_files(devices: int) -> None:
    """Raise the soft limit on open files to what ``devices`` need, up to the hard limit (never lowering it).

    Raises :class:`TooManyDevices`, saying how to raise the limit, when the hard limit is lower than that."""
    needed = files_needed(devices)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        fit = max(0, (hard - FDS_FIXED) // FDS_PER_DEVICE)
        raise TooManyDevices(
            f"{devices} devices need {needed} open files ({FDS_PER_DEVICE} each + {FDS_FIXED}), but the hard limit "
            f"here is {hard}: raise it and run `ulimit -n {needed}` first (raising the hard limit needs root: "
            f"limits.conf, or LimitNOFILE= for a service), or run at most {fit} devices"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
