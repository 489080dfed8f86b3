"""A campaign's options, checked once, kept as canonical texts: what `fleet rollout create` was given and what the
controller reads back from the store after a restart. Pure.

Defaults are what an operator who gives nothing else should get: three waves (10 %, 50 %, 100 %), ten minutes of soak
after each, a wave stops the campaign when more than 10 % of its finished devices failed or 20 % timed out (once 3
have finished, or the whole wave when it is smaller), the KPI gates of :data:`fleet.rollout.kpi.DEFAULT_KPIS`, a
rollback on failure, 30 minutes of silence before a device times out, two retries.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.rollout.kpi import DEFAULT_KPIS, Kpi, parse_kpi
from fleet.rollout.plan import Selector, WaveSize, parse_duration, parse_selector, parse_waves
from fleet.rollout.window import MaintenanceWindow, parse_window

ON_FAILURE = ("rollback", "pause")
#: The KPI gate that asks the drift detector (:mod:`fleet.drift`) instead of comparing a figure.
DRIFT_GATE = "drift"
#: Inferences (labelled rows, for accuracy) a KPI gate needs on each side before it decides.
DEFAULT_KPI_MIN_COUNT = 200


@dataclass(frozen=True)
class CampaignSpec:
    """Every option of a campaign, as texts and numbers (what is stored); the parsed forms are properties."""

    select: str = ""
    waves: str = "10,50,100"
    soak_s: float = 600.0
    max_failed: float = 10.0
    max_timed_out: float = 20.0
    min_devices: int = 3
    kpis: tuple[str, ...] = field(default_factory=lambda: tuple(k.text for k in DEFAULT_KPIS))
    kpi_min_count: int = DEFAULT_KPI_MIN_COUNT
    on_failure: str = "rollback"
    device_timeout_s: float = 1800.0
    retries: int = 2
    window: str | None = None
    spread_by: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.selector  # noqa: B018 - each property parses, and raises ValueError naming the fix
        self.wave_sizes  # noqa: B018
        self.kpi_gates  # noqa: B018
        self.maintenance  # noqa: B018
        checks = (
            (self.soak_s >= 0, f"--soak must not be negative ({self.soak_s:g} s)"),
            (0 <= self.max_failed <= 100, f"--max-failed is a percentage, 0 to 100, not {self.max_failed:g}"),
            (0 <= self.max_timed_out <= 100, f"--max-timed-out is a percentage, 0 to 100, not {self.max_timed_out:g}"),
            (self.min_devices >= 1, f"--min-devices must be 1 or more, not {self.min_devices}"),
            (self.kpi_min_count >= 1, f"--kpi-min-count must be 1 or more, not {self.kpi_min_count}"),
            (self.on_failure in ON_FAILURE, f"--on-failure is rollback or pause, not {self.on_failure!r}"),
            (self.device_timeout_s > 0, "--device-timeout must be more than 0 s"),
            (self.retries >= 0, f"--retries must be 0 or more, not {self.retries}"),
        )  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def selector(self) -> Selector:
        return parse_selector(self.select)

    @property
    def wave_sizes(self) -> tuple[WaveSize, ...]:
        return parse_waves(self.waves)

    @property
    def kpi_gates(self) -> tuple[Kpi, ...]:
        return tuple(parse_kpi(text) for text in self.kpis if text != DRIFT_GATE)

    @property
    def drift_gate(self) -> bool:
        """Whether the campaign stops when the drift detector finds drift on its release (``--kpi drift``)."""
        return DRIFT_GATE in self.kpis

    @property
    def maintenance(self) -> MaintenanceWindow | None:
        return parse_window(self.window) if self.window else None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kpis"] = list(self.kpis)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> CampaignSpec:
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        if "kpis" in known:
            known["kpis"] = tuple(known["kpis"])
        return cls(**known)


def parse_spec(
    *,
    select: str | None = None,
    waves: str | None = None,
    soak: str | None = None,
    max_failed: float | None = None,
    max_timed_out: float | None = None,
    min_devices: int | None = None,
    kpis: Sequence[str] = (),
    kpi_min_count: int | None = None,
    on_failure: str | None = None,
    device_timeout: str | None = None,
    retries: int | None = None,
    window: str | None = None,
    spread_by: str | None = None,
    seed: int | None = None,
) -> CampaignSpec:
    """A spec from the command line's texts (None: the default); ValueError names the option to fix. ``kpis``
    replace the default gates; ``["none"]`` turns KPI gates off. Without a seed, one is drawn and kept, so the plan
    can be made again."""
    given: dict[str, Any] = {
        "select": parse_selector(select).text if select else None,
        "waves": waves,
        "soak_s": _duration("--soak", soak),
        "max_failed": max_failed,
        "max_timed_out": max_timed_out,
        "min_devices": min_devices,
        "kpi_min_count": kpi_min_count,
        "on_failure": on_failure,
        "device_timeout_s": _duration("--device-timeout", device_timeout),
        "retries": retries,
        "window": parse_window(window).text if window else None,
        "spread_by": spread_by,
        "seed": seed if seed is not None else secrets.randbelow(2**31),
    }
    if "none" in kpis and len(kpis) > 1:
        raise ValueError("--kpi none turns every KPI gate off: give it alone, or only the gates you want")
    if kpis:
        given["kpis"] = () if list(kpis) == ["none"] else tuple(
            DRIFT_GATE if k.strip() == DRIFT_GATE else parse_kpi(k).text for k in kpis
        )
    return CampaignSpec(**{k: v for k, v in given.items() if v is not None})


def _duration(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None
