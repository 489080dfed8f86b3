"""What the installer needs of the agent it updates, and nothing more: :class:`InstallHost`.

The installer runs on its own worker thread and must not reach into the agent core's members (its models, its
reactor, its telemetry), so the core can change without the installer, and the installer can be driven in a test
by a stand-in host with no MQTT, no reactor and no runtime. :class:`agent.core.AgentCore` implements it.
"""

from __future__ import annotations

from typing import Any, Protocol

from agent.config import ModelConfig
from agent.telemetry import Totals


class InstallHost(Protocol):
    """The agent as its installer sees it. Every method is safe to call from the installer's worker thread."""

    @property
    def device_id(self) -> str:
        """This device's id: a desired state must name it."""
        ...

    def clock(self) -> float:
        """The device's wall clock (seconds since the epoch): desired-state expiry and event timestamps."""
        ...

    def emit(self, type_: str, model: str | None = None, **detail: Any) -> int | None:
        """Record an event for the fleet (never dropped); returns its outbox seq, None while a full disk holds it."""
        ...

    def activate(self, cfg: ModelConfig) -> object:
        """Serve ``cfg`` in place of the model of the same name, atomically; raise
        :class:`agent.runtime.RuntimeLayerError` if it cannot be loaded (the old model keeps serving)."""
        ...

    def serving(self, model: str) -> ModelConfig | None:
        """What is served as ``model`` now, or None if nothing is."""
        ...

    def totals(self, model: str) -> Totals:
        """The served ``model``'s counts since it was activated: what probation judges."""
        ...

    def status_changed(self) -> None:
        """The installer's part of the status (slots, install state) changed: rewrite the status file."""
        ...
