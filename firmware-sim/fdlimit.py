"""Open files for N simulated devices, against the process's limit on them (``RLIMIT_NOFILE``).

Measured by sampling ``/proc/PID/fd`` of `firmware-sim run` against a real mosquitto (every device connected,
windows flushing each second): at most 51 open files with 10 devices, 411 with 100. Each device holds 4 while it
runs: its MQTT socket, and its outbox's SQLite database, write-ahead log and shared-memory index. The process holds
11 of its own: stdio and the like (5), the reactor's epoll and wake-up socket pair (3), and ONNX Runtime's SQLite
telemetry database (3). Writing a device's status file opens one or two more for a moment.
``tests/test_sim_cli.py`` checks the per-device figure.

An enrolled device holds 3 more (its install slots' SQLite database, log and index: 151 open files with 20 enrolled
devices against 91 with 20 plain ones, sampled the same way), and a device with network faults 4 more in the
proxy: its two listening sockets (broker, repository) and both ends of its proxied MQTT connection.
"""

from __future__ import annotations

import resource

#: Files each simulated device keeps open while it runs.
FDS_PER_DEVICE = 4
#: More for each enrolled device (install slots), and for each one whose network goes through the fault proxy.
FDS_PER_ENROLLED = 3
FDS_PER_PROXIED = 4
#: The process's own (11 measured), with room for the brief ones.
FDS_FIXED = 32


class TooManyDevices(Exception):
    """The hard limit on open files is below what the devices need; the message says how to raise it."""


def files_needed(devices: int, enrolled: int = 0, proxied: int = 0) -> int:
    return FDS_PER_DEVICE * devices + FDS_PER_ENROLLED * enrolled + FDS_PER_PROXIED * proxied + FDS_FIXED


def ensure_open_files(devices: int, enrolled: int = 0, proxied: int = 0) -> None:
    """Raise the soft limit on open files to what ``devices`` need (``enrolled`` and ``proxied`` of them hold more),
    up to the hard limit (never lowering it).

    Raises :class:`TooManyDevices`, saying how to raise the limit, when the hard limit is lower than that."""
    needed = files_needed(devices, enrolled, proxied)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        each = needed // devices if devices else FDS_PER_DEVICE
        fit = max(0, (hard - FDS_FIXED) // max(each, FDS_PER_DEVICE))
        raise TooManyDevices(
            f"{devices} devices need {needed} open files (about {each} each, with {FDS_FIXED} for the process), but "
            f"the hard limit "
            f"here is {hard}: raise it and run `ulimit -n {needed}` first (raising the hard limit needs root: "
            f"limits.conf, or LimitNOFILE= for a service), or run at most {fit} devices"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
