"""The project's one error shape: a stable ``reason`` (a counter key, a test's anchor, never reworded) and a
``detail`` for people.

Each side has one family built on it: the agent's errors (protocol and desired state, trust, install and an illegal
move of its state table, the ``edge-agent`` command's errors) subclass :class:`EdgefleetError` directly, keeping
another base only where callers catch it (a ProtocolError is a ValueError); the fleet's subclass it through
``fleet.errors.FleetError``, which adds the exit code a command ends with.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Something refused or failed, for a reason code can test (``reason``) and a person can read (``detail``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
