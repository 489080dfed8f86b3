"""Whether the process a record names (status.json, serve.json, a simulator run's folder) is still running."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists, also when it belongs to another user (signal 0 delivers nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True
