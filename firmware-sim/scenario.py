"""Scenarios: a TOML file plus a seed make a simulated run reproducible. Pure: text and a seed in, a plan out.

A scenario sets the fleet (size, tags, sites, traffic, feedback) and a schedule of drift and faults, each for the
whole fleet, the devices of one tag, a seeded share of them, or named devices. :meth:`Scenario.plan` resolves it,
with the seed, into what each device gets and from when: the ground truth a run reports beside what the devices
produced. Every random choice (which devices a share picks, a random install step, a flaky link's disconnects) is
made here from the seed and the entry's place in the file, so the same file and seed give the same plan in any
process and any number of shards::

    name = "site outage"
    [fleet]
    devices = 30
    sites = 3
    duration = 300

    [[drift]]
    kind = "brightness"
    size = 0.3
    start = 60
    tag = "site=site-1"

    [[fault]]
    kind = "silent"
    start = 120
    connection = "dropped"
    share = 0.1

Fault kinds and their settings (``start`` and ``end`` in seconds from the run's start; no ``end``: until it ends):

- ``silent``: no telemetry and no events reach the fleet; ``connection = "open"`` (the agent hangs, its MQTT
  keepalive goes on) or ``"dropped"`` (the device loses its network; the broker publishes its last will);
- ``power_loss``: at install step ``state`` (an install state, or ``"random"``) the device's process state is dropped
  and it restarts from what is on disk (needs an enrolled fleet);
- ``flaky_link``: random disconnects (one every ``disconnect_every`` s on average) and black-holed periods (one every
  ``blackhole_every`` s on average, each ``blackhole_s`` long);
- ``slow_download``: release downloads at ``rate`` bytes/s; ``cut_download``: download connections cut after
  ``after`` bytes, ``times`` times, metadata and release files alike (both need an enrolled fleet);
- ``clock_skew``: the device's clock is ``offset`` seconds off (negative: behind);
- ``broker_restart``: the broker stops for ``down`` seconds (fleet-wide; only a broker the simulator started).
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.drift import Drift
from firmware_sim.power import CUT_STATES

FAULT_KINDS = ("silent", "power_loss", "flaky_link", "slow_download", "cut_download", "clock_skew", "broker_restart")
#: Install states a power loss can land on (``state = "random"`` picks one of these per device).
INSTALL_STATES = tuple(state.value for state in CUT_STATES)
#: Faults that act on a device's network: such a device reaches the broker and the repository through the run's
#: fault-injecting proxy (:mod:`firmware_sim.netfaults`).
NETWORK_FAULTS = ("silent", "flaky_link", "slow_download", "cut_download")
#: Faults that only an enrolled device (one that installs releases) can get.
INSTALL_FAULTS = ("power_loss", "slow_download", "cut_download")

#: Each fault kind's settings and their defaults.
_SETTINGS: Mapping[str, Mapping[str, Any]] = {
    "silent": {"connection": "open"},
    "power_loss": {"state": "random"},
    "flaky_link": {"disconnect_every": 30.0, "blackhole_every": 60.0, "blackhole_s": 5.0},
    "slow_download": {"rate": 64 * 1024},
    "cut_download": {"after": 64 * 1024, "times": 3},
    "clock_skew": {"offset": 3600.0},
    "broker_restart": {"down": 2.0},
}
_TARGET_KEYS = ("devices", "tag", "share")
_FLEET_KEYS = {"devices": int, "seed": int, "duration": float, "rate": float, "window": float, "feedback": float,
               "sites": int, "tags": dict, "id_prefix": str}  # fmt: skip


class ScenarioError(ValueError):
    """The scenario file cannot be used; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Target:
    """Which devices an entry is for: named ``devices``, or those with ``tag`` (all when None), of which a seeded
    ``share`` (all when None)."""

    devices: tuple[str, ...] = ()
    tag: tuple[str, str] | None = None
    share: float | None = None

    def pick(self, tags: Mapping[str, Mapping[str, str]], rng: random.Random) -> list[str]:
        """The devices of ``tags`` (device id -> its tags, in fleet order) this target names."""
        if self.devices:
            return [d for d in tags if d in self.devices]
        chosen = [d for d, t in tags.items() if self.tag is None or t.get(self.tag[0]) == self.tag[1]]
        if self.share is not None:
            chosen = sorted(rng.sample(chosen, round(self.share * len(chosen))), key=list(tags).index)
        return chosen


@dataclass(frozen=True)
class Fault:
    kind: str
    start_s: float = 0.0
    end_s: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def setting(self, name: str) -> Any:
        return self.settings.get(name, _SETTINGS[self.kind][name])


@dataclass(frozen=True)
class Scheduled:
    """A fault as one device gets it: the fault, and what the seed decided for that device (the install state a power
    loss lands on, a flaky link's disconnect times and black-holed periods)."""

    fault: Fault
    state: str | None = None
    disconnects: tuple[float, ...] = ()
    blackholes: tuple[tuple[float, float], ...] = ()

    def active(self, elapsed_s: float) -> bool:
        return self.fault.start_s <= elapsed_s and (self.fault.end_s is None or elapsed_s < self.fault.end_s)

    def to_json(self) -> dict[str, Any]:
        f = self.fault
        out: dict[str, Any] = {"kind": f.kind, "from_s": f.start_s, "until_s": f.end_s,
                               **{k: f.setting(k) for k in _SETTINGS[f.kind]}}  # fmt: skip
        if self.state is not None:
            out["state"] = self.state
        if f.kind == "flaky_link":
            out["disconnects_at_s"] = list(self.disconnects)
            out["blackholes_s"] = [list(b) for b in self.blackholes]
        return out


@dataclass(frozen=True)
class DevicePlan:
    """What one device gets in a run: its tags, its sensors' drift and its faults."""

    tags: Mapping[str, str] = field(default_factory=dict)
    drifts: tuple[Drift, ...] = ()
    faults: tuple[Scheduled, ...] = ()

    def of(self, *kinds: str) -> list[Scheduled]:
        return [s for s in self.faults if s.fault.kind in kinds]

    @property
    def network_faults(self) -> bool:
        return bool(self.of(*NETWORK_FAULTS))

    def silent_at(self, elapsed_s: float) -> bool:
        """Whether the device is silent at that moment (and so owes the fleet nothing then)."""
        return any(s.active(elapsed_s) for s in self.of("silent"))

    def to_json(self) -> dict[str, Any]:
        return {
            "tags": dict(self.tags),
            "drifts": [{"kind": d.kind, "size": d.size, "from_s": d.start_s} for d in self.drifts],
            "faults": [s.to_json() for s in self.faults],
        }


@dataclass(frozen=True)
class Plan:
    """A resolved scenario: each device's plan (fleet order) and the fleet-wide broker restarts (start, down)."""

    devices: Mapping[str, DevicePlan]
    broker_restarts: tuple[tuple[float, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": {d: p.to_json() for d, p in self.devices.items()},
            "broker_restarts": [{"from_s": s, "down_s": d} for s, d in self.broker_restarts],
        }


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file. ``fleet`` holds the ``[fleet]`` table's settings (the run's defaults)."""

    name: str = ""
    fleet: Mapping[str, Any] = field(default_factory=dict)
    drifts: tuple[tuple[Drift, Target], ...] = ()
    faults: tuple[tuple[Fault, Target], ...] = ()

    @classmethod
    def load(cls, path: Path) -> Scenario:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ScenarioError(f"cannot read the scenario {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"scenario {path} is not TOML ({exc}); see firmware-sim/scenarios/") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str = "scenario") -> Scenario:
        unknown = set(data) - {"name", "description", "fleet", "drift", "fault"}
        if unknown:
            raise ScenarioError(f"{where}: unknown table or key {sorted(unknown)[0]!r}; use name, description, "
                                "[fleet], [[drift]], [[fault]]")  # fmt: skip
        fleet = dict(data.get("fleet", {}))
        for key, value in fleet.items():
            kind = _FLEET_KEYS.get(key)
            if kind is None:
                raise ScenarioError(f"{where} [fleet]: unknown key {key!r}; use {', '.join(_FLEET_KEYS)}")
            if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
                raise ScenarioError(f"{where} [fleet]: {key} must be a {kind.__name__}, not {value!r}")
        drifts = tuple(_drift(e, f"{where} [[drift]] #{i + 1}") for i, e in enumerate(data.get("drift", [])))
        faults = tuple(_fault(e, f"{where} [[fault]] #{i + 1}") for i, e in enumerate(data.get("fault", [])))
        return cls(str(data.get("name", "")), fleet, drifts, faults)

    def plan(self, tags: Mapping[str, Mapping[str, str]], seed: int, duration_s: float) -> Plan:
        """Resolve the schedule for the fleet ``tags`` (device id -> its tags, in fleet order) with ``seed``.
        :class:`ScenarioError` if an entry names a device that is not in the fleet."""
        per_device: dict[str, tuple[list[Drift], list[Scheduled]]] = {d: ([], []) for d in tags}
        for n, (_, target) in enumerate((*self.drifts, *self.faults)):
            unknown = [d for d in target.devices if d not in tags]
            if unknown:
                entry = f"[[drift]] #{n + 1}" if n < len(self.drifts) else f"[[fault]] #{n + 1 - len(self.drifts)}"
                first = next(iter(tags), "")
                raise ScenarioError(f"{entry} names {unknown[0]}, which is not in this fleet of {len(tags)} "
                                    f"({first}, ...): name its devices, or mind --id-prefix")  # fmt: skip
        for n, (drift, target) in enumerate(self.drifts):
            for device in target.pick(tags, random.Random(f"{seed}:drift:{n}")):
                per_device[device][0].append(drift)
        restarts = []
        for n, (fault, target) in enumerate(self.faults):
            if fault.kind == "broker_restart":
                restarts.append((fault.start_s, float(fault.setting("down"))))
                continue
            for device in target.pick(tags, random.Random(f"{seed}:fault:{n}")):
                rng = random.Random(f"{seed}:fault:{n}:{device}")
                per_device[device][1].append(_schedule(fault, rng, duration_s))
        return Plan(
            {d: DevicePlan(tags[d], tuple(dr), tuple(fa)) for d, (dr, fa) in per_device.items()}, tuple(restarts)
        )


def shipped(name: str) -> Path:
    """The scenario ``name`` that ships with the simulator (firmware-sim/scenarios/NAME.toml)."""
    return Path(__file__).parent / "scenarios" / f"{name}.toml"


def device_tags(ids: Sequence[str], tags: Mapping[str, str], sites: int | None) -> dict[str, dict[str, str]]:
    """Each device's tags: ``tags`` on every one, and with ``sites`` a ``site`` tag spreading them over that many
    sites in turn (``site-0``, ``site-1``, ...)."""
    return {d: {**tags, **({"site": f"site-{i % sites}"} if sites else {})} for i, d in enumerate(ids)}


def _schedule(fault: Fault, rng: random.Random, duration_s: float) -> Scheduled:
    if fault.kind == "power_loss":
        state = str(fault.setting("state"))
        return Scheduled(fault, state=rng.choice(INSTALL_STATES) if state == "random" else state)
    if fault.kind != "flaky_link":
        return Scheduled(fault)
    end = min(duration_s, fault.end_s if fault.end_s is not None else math.inf)

    def times(every: float) -> list[float]:
        out, t = [], fault.start_s
        while (t := t + rng.expovariate(1.0 / every)) < end:
            out.append(round(t, 3))
        return out

    disconnects = times(float(fault.setting("disconnect_every")))
    length = float(fault.setting("blackhole_s"))
    blackholes = tuple((t, round(min(length, end - t), 3)) for t in times(float(fault.setting("blackhole_every"))))
    return Scheduled(fault, disconnects=tuple(disconnects), blackholes=blackholes)


def _target(entry: dict[str, Any], where: str) -> Target:
    devices, tag, share = entry.pop("devices", ()), entry.pop("tag", None), entry.pop("share", None)
    if devices and (tag is not None or share is not None):
        raise ScenarioError(f"{where}: give devices, or tag and/or share, not both")
    if not isinstance(devices, list | tuple) or not all(isinstance(d, str) for d in devices):
        raise ScenarioError(f"{where}: devices must be a list of device ids")
    parsed_tag = None
    if tag is not None:
        key, sep, value = str(tag).partition("=")
        if not (isinstance(tag, str) and sep and key and value):
            raise ScenarioError(f"{where}: tag {tag!r} is not KEY=VALUE")
        parsed_tag = (key, value)
    if share is not None and not (isinstance(share, int | float) and 0.0 <= share <= 1.0):
        raise ScenarioError(f"{where}: share {share!r} must be between 0 and 1")
    return Target(tuple(devices), parsed_tag, None if share is None else float(share))


def _seconds(entry: dict[str, Any], key: str, where: str) -> float | None:
    value = entry.pop(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
        raise ScenarioError(f"{where}: {key} must be 0 or more seconds, not {value!r}")
    return float(value)


def _drift(raw: Mapping[str, Any], where: str) -> tuple[Drift, Target]:
    entry = dict(raw)
    target = _target(entry, where)
    start = _seconds(entry, "start", where) or 0.0
    kind, size = entry.pop("kind", None), entry.pop("size", None)
    if entry:
        raise ScenarioError(f"{where}: unknown key {sorted(entry)[0]!r}; use kind, size, start, devices, tag, share")
    try:
        return Drift(str(kind), float(size), start), target  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _fault(raw: Mapping[str, Any], where: str) -> tuple[Fault, Target]:
    entry = dict(raw)
    kind = entry.pop("kind", None)
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}: kind {kind!r} is not a fault; use one of {', '.join(FAULT_KINDS)}")
    target = _target(entry, where)
    if kind == "broker_restart" and target != Target():
        raise ScenarioError(f"{where}: a broker restart is fleet-wide; remove devices, tag and share")
    start, end = _seconds(entry, "start", where) or 0.0, _seconds(entry, "end", where)
    if end is not None and end <= start:
        raise ScenarioError(f"{where}: end ({end:g} s) must come after start ({start:g} s)")
    defaults = _SETTINGS[kind]
    for key, value in entry.items():
        if key not in defaults:
            allowed = ", ".join(["kind", "start", "end", *_TARGET_KEYS, *defaults])
            raise ScenarioError(f"{where}: {kind} has no setting {key!r}; use {allowed}")
        if type(value) is not type(defaults[key]) and not (isinstance(defaults[key], float) and type(value) is int):
            raise ScenarioError(f"{where}: {key} must be a {type(defaults[key]).__name__}, not {value!r}")
    fault = Fault(kind, start, end, entry)
    _check(fault, where)
    return fault, target


def _check(fault: Fault, where: str) -> None:
    problem = ""
    match fault.kind:
        case "silent" if fault.setting("connection") not in ("open", "dropped"):
            problem = 'connection must be "open" or "dropped"'
        case "power_loss" if fault.setting("state") not in ("random", *INSTALL_STATES):
            problem = f"state must be random or one of {', '.join(INSTALL_STATES)}"
        case "flaky_link" if min(fault.setting(k) for k in _SETTINGS["flaky_link"]) <= 0:
            problem = "disconnect_every, blackhole_every and blackhole_s must be above 0"
        case "slow_download" if fault.setting("rate") <= 0:
            problem = "rate must be above 0 bytes/s"
        case "cut_download" if fault.setting("after") < 0 or fault.setting("times") < 1:
            problem = "after must be 0 or more bytes, and times 1 or more"
        case "broker_restart" if not 0 < fault.setting("down") <= 3600:
            problem = "down must be above 0 and at most 3600 s"
        case _:
            return
    raise ScenarioError(f"{where}: {problem}")
