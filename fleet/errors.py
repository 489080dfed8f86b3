"""The fleet's one error family: every refusal and failure of the library is a :class:`FleetError`.

Each carries a stable ``reason`` (tests and scripts key on it), a ``detail`` saying what was wrong and a ``fix`` saying
what to do. The CLI prints ``error: <detail>; <fix>`` on one line and exits with :attr:`FleetError.exit_code`: 1 for
a refusal or failure, 2 for a request that cannot succeed as given (as click does for usage errors), 3 for
something that does not exist.
"""

from __future__ import annotations

from agent.errors import EdgefleetError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class FleetError(EdgefleetError):
    """A fleet operation refused or failed; nothing it would have changed was changed unless ``detail`` says so."""

    exit_code = EXIT_FAILED

    def __init__(self, reason: str, detail: str = "", fix: str = "") -> None:
        super().__init__(reason, detail)
        self.fix = fix

    def message(self) -> str:
        """One line for a person: what was wrong, then how to fix it."""
        text = self.detail or self.reason
        return f"{text}; {self.fix}" if self.fix else text


class NotFound(FleetError):
    """A device, release, campaign or home that the fleet does not know."""

    exit_code = EXIT_NOT_FOUND


class StoreUnavailable(FleetError):
    """The store cannot be read or written right now (locked too long, disk full, read-only, corrupt)."""


class Invalid(FleetError):
    """A request that cannot succeed as given (a bad argument): exit code 2, as for click's usage errors."""

    exit_code = EXIT_USAGE
