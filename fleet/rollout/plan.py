"""What a rollout campaign targets and in which waves: its selector, its wave sizes, its durations, and the plan.

A campaign is planned once, from its arguments and a seed, and the plan must come out the same wherever and whenever
it is worked out again (the controller after a restart, an operator's dry run): so nothing here reads a clock, the
store or the environment, and the order of devices depends only on the seed and the set of device ids.

* :func:`parse_selector` reads ``--select``: ``KEY=VALUE`` terms, all of which must match a device. ``release``
  matches what a device runs, ``hardware`` (or ``machine``) its CPU architecture, any other key one of its tags.
* :func:`parse_waves` reads ``--waves``: cumulative percents of the campaign's devices, or device counts (``5d``).
* :func:`plan_waves` shuffles the devices with the seed, spread across groups (sites) so that every wave holds them in
  proportion, and cuts the order into waves.
* :func:`parse_duration` reads the durations of the campaign's arguments (``90s``, ``10m``, ``1h30m``).

Bad arguments raise ValueError with a one-line message that says how to fix them: the CLI shows it as a usage error.
"""

from __future__ import annotations

import heapq
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from fleet.store.rows import Device

_NUMBER = r"\d+(?:\.\d+)?"
#: A plain number of seconds, or amounts of days, hours, minutes and seconds in that order (each at most once).
_DURATION = re.compile(rf"({_NUMBER})|(?:({_NUMBER})d)?(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?")
_DURATION_UNITS_S = (1, 86400, 3600, 60, 1)

#: What a selector key or value may be made of.
_WORD = re.compile(r"[A-Za-z0-9_.:-]+")
_RELEASE = "release"
_HARDWARE = "hardware"
#: The keys that select on a device's CPU architecture rather than a tag: both name the same term.
_HARDWARE_KEYS = frozenset({_HARDWARE, "machine"})
#: The version of a release term that selects the devices running no release of the model.
_NO_RELEASE = "none"
_SELECT_EXAMPLE = "like site=north,release=digits:1"

#: A wave: a percent (``10`` or ``10%``) or a device count (``5d``).
_WAVE = re.compile(rf"({_NUMBER})%?|(\d+)d")
_WAVES_EXAMPLE = "like 10,50,100 or 5d,50%,100%"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``10m``, ``2h``, ``1d``, ``1h30m``, or a plain number of seconds (``30``).

    Units come largest first, each at most once, so that one duration has one spelling to read; amounts may have
    decimals (``1.5h``). Zero is a duration (``0s``); a negative, empty or otherwise spelt one raises ValueError.
    """
    stripped = text.strip()
    match = _DURATION.fullmatch(stripped)
    if not stripped or match is None:
        raise ValueError(f"bad duration {text!r}; use a number with s, m, h or d, like 90s, 10m or 1h30m")
    amounts = zip(match.groups(), _DURATION_UNITS_S, strict=True)
    return float(sum(float(amount) * unit for amount, unit in amounts if amount is not None))


@dataclass(frozen=True, slots=True)
class Selector:
    """Which devices a campaign targets: tags, hardware and current release, all of which must match.

    Each term accepts any of its values. An empty selector (no term) matches every device.
    """

    #: Tag key -> the values accepted for it; a device without the tag does not match.
    tags: Mapping[str, frozenset[str]]
    #: ``name:version``, ``name:prefix`` (a version prefix at a dot boundary) or ``name:none``.
    releases: frozenset[str]
    #: CPU architectures (``platform.machine()``: aarch64, x86_64...); a device that reported none does not match.
    machines: frozenset[str]
    #: The canonical text: keys sorted, ``machine`` spelt ``hardware``, each key's values sorted; "" for every device.
    text: str

    def matches(self, device: Device) -> bool:
        """Whether ``device`` is targeted: its machine, every tag term, and one of its releases match."""
        if self.machines and device.machine not in self.machines:
            return False
        if any(device.tags.get(key) not in values for key, values in self.tags.items()):
            return False
        return not self.releases or any(_runs(device.releases, term) for term in self.releases)


def _runs(releases: Mapping[str, str | None], term: str) -> bool:
    """Whether a device running ``releases`` (model -> ``name:version`` or None) matches one release term.

    ``digits:1`` matches ``digits:1``, ``digits:1.0.0`` and ``digits:1.2`` but not ``digits:10.0``: a prefix stops at
    a dot, or ``1`` would also select release 10. ``digits:none`` matches a device that reports no release of the
    model ``digits`` (it does not have the model, or names no release for it).
    """
    name, _, version = term.partition(":")
    if version == _NO_RELEASE:
        return releases.get(name) is None
    return any(ref is not None and (ref == term or ref.startswith(f"{term}.")) for ref in releases.values())


def parse_selector(text: str | None) -> Selector:
    """The selector of ``--select``: ``KEY=VALUE`` terms separated by commas, alternatives joined by ``|``.

    ``site=north|south,release=digits:1,hardware=aarch64`` targets the devices tagged site north or south, running a
    release 1.x of digits, on aarch64. A key given twice is refused rather than merged: ``site=north,site=south``
    reads as "both", which no device is. None or an empty text selects every device.
    """
    if text is None or not text.strip():
        return Selector(MappingProxyType({}), frozenset(), frozenset(), "")
    terms: dict[str, frozenset[str]] = {}
    for raw in text.split(","):
        term = raw.strip()
        given, sep, value = term.partition("=")
        values = value.split("|")
        if not sep or not _WORD.fullmatch(given) or not all(_WORD.fullmatch(v) for v in values):
            raise ValueError(
                f"bad --select term {term!r}; write KEY=VALUE terms separated by commas, {_SELECT_EXAMPLE}"
            )
        key = _HARDWARE if given in _HARDWARE_KEYS else given
        if key in terms:
            shown = "hardware/machine" if key == _HARDWARE else key
            raise ValueError(
                f"--select names {shown!r} twice; give its values once, joined by |, like site=north|south"
            )
        terms[key] = frozenset(values)
    for ref in terms.get(_RELEASE, frozenset()):
        name, _, version = ref.partition(":")
        if not name or not version or ":" in version:
            raise ValueError(
                f"bad --select release {ref!r}; write release=NAME:VERSION, a version prefix or NAME:none, "
                "like release=digits:1"
            )
    ordered = sorted(terms.items())
    return Selector(
        tags=MappingProxyType({key: values for key, values in ordered if key not in (_RELEASE, _HARDWARE)}),
        releases=terms.get(_RELEASE, frozenset()),
        machines=terms.get(_HARDWARE, frozenset()),
        text=",".join(f"{key}={'|'.join(sorted(values))}" for key, values in ordered),
    )


@dataclass(frozen=True, slots=True)
class WaveSize:
    """How far a campaign has gone once a wave is done, cumulatively: a percent of its devices, or a device count."""

    value: float
    #: True: ``value`` is a cumulative percent of the campaign's devices; False: a cumulative device count.
    percent: bool

    def reach(self, total: int) -> int:
        """How many of ``total`` devices have been reached once this wave is done (a count is capped at ``total``).

        A percent rounds up, so any wave of a non-empty campaign reaches at least one device. The product is
        rounded to 9 decimals first: float error must not turn an exact 3.0 devices into 4.
        """
        if not self.percent:
            return min(int(self.value), total)
        return math.ceil(round(self.value * total / 100, 9))


def parse_waves(text: str) -> tuple[WaveSize, ...]:
    """The waves of ``--waves``: cumulative percents (``10,50,100`` or ``10%,50%,100%``) or counts (``5d,50%,100%``).

    Values are above 0, percents at most 100 and counts whole. Percents must grow from one to the next, and so must
    counts; whether a count and a percent grow depends on the number of devices, and :func:`plan_waves` drops a wave
    that reaches no further than the one before. The last wave must be 100%, so no targeted device is left out.
    """
    waves: list[WaveSize] = []
    for raw in text.split(","):
        item = raw.strip()
        match = _WAVE.fullmatch(item)
        if match is None:
            raise ValueError(
                f"bad --waves item {item!r}; write cumulative percents or device counts (5d) separated by commas, "
                f"{_WAVES_EXAMPLE}"
            )
        percent, count = match.groups()
        wave = WaveSize(float(percent), True) if percent is not None else WaveSize(float(count), False)
        if wave.value <= 0 or (wave.percent and wave.value > 100):
            raise ValueError(
                f"bad --waves item {item!r}; write a percent above 0 and at most 100, or a count of 1d or more"
            )
        previous = [w.value for w in waves if w.percent == wave.percent]
        if previous and wave.value <= previous[-1]:
            raise ValueError(f"--waves {text!r} does not grow at {item!r}; waves are cumulative, {_WAVES_EXAMPLE}")
        waves.append(wave)
    _check_last(waves)
    return tuple(waves)


def _check_last(waves: Sequence[WaveSize]) -> None:
    """Raise ValueError unless the last wave is 100%: every targeted device must be in a wave."""
    if not waves or waves[-1] != WaveSize(100.0, True):
        raise ValueError(f"the last wave must reach 100%; end --waves with 100, {_WAVES_EXAMPLE}")


def plan_waves(
    device_ids: Sequence[str], waves: Sequence[WaveSize], seed: int, groups: Mapping[str, str] | None = None
) -> list[list[str]]:
    """The devices of each wave, in the order the campaign updates them: a seeded shuffle cut at the waves' reach.

    The shuffle runs ``random.Random(seed)`` over the sorted, de-duplicated ids, so the plan depends only on the seed
    and the set of devices: not on their order, the machine or the Python version (3.11+). Wave ``k`` holds the
    devices from the reach of wave ``k - 1`` to its own (:meth:`WaveSize.reach`); a wave that reaches no further
    than the one before (3 devices leave no room for 10 waves) is dropped, so no wave is empty.

    With ``groups`` (device id -> a group such as its site; devices it does not name form the group ""), each
    group is shuffled on its own, in group-name order, and the groups are interleaved so that every prefix of the
    order holds them in proportion to their sizes: the next device comes from the group with the smallest share
    taken so far (ties by group name). So the first wave touches every group once it has as many devices as there
    are groups, and a bad release shows up at every site early rather than at one site wholly.

    Raises ValueError if the last wave is not 100% (devices would be left out). No devices, no waves.
    """
    _check_last(waves)
    order = sorted(set(device_ids))
    rng = random.Random(seed)
    if groups is None:
        rng.shuffle(order)
    else:
        order = _spread(order, groups, rng)
    plan: list[list[str]] = []
    done = 0
    for wave in waves:
        reach = wave.reach(len(order))
        if reach > done:
            plan.append(order[done:reach])
            done = reach
    return plan


def _spread(ids: Sequence[str], groups: Mapping[str, str], rng: random.Random) -> list[str]:
    """``ids`` shuffled within their groups and interleaved by the share of each group taken so far (see above)."""
    members: dict[str, list[str]] = {}
    for device_id in ids:
        members.setdefault(groups.get(device_id, ""), []).append(device_id)
    names = sorted(members)
    for name in names:
        rng.shuffle(members[name])
    # (share of the group taken, group name, index of its next device): a list sorted by name is already a heap.
    heap = [(Fraction(0), name, 0) for name in names]
    order: list[str] = []
    while heap:
        _, name, index = heapq.heappop(heap)
        group = members[name]
        order.append(group[index])
        if index + 1 < len(group):
            heapq.heappush(heap, (Fraction(index + 1, len(group)), name, index + 1))
    return order
