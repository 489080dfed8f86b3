"""Maintenance windows: when a device may be updated, as a cron expression for when each period starts and a duration.

A window is read in the device's own local time (its time zone, an IANA name), because "02:00 for 4 hours" means the
quiet hours where the device is, not in UTC. ``0 2 * * * 4h`` opens at 02:00 every day and stays open until 06:00;
``0 22 * * mon-fri 10h`` opens on weekday evenings and stays open overnight. A period that started before a given
time and is still running counts as open.

The five cron fields are those of crontab(5): minute, hour, day of month, month, day of week, each ``*``, a number,
a list (``1,5``), a range (``1-5``) or a step (``*/15``, ``0-30/10``); months and days of the week may be named
(``jan``, ``mon``; 0 and 7 are both Sunday). As in Vixie cron, when both the day of month and the day of week are
restricted (their field does not start with ``*``), a day matches if either does.

Times are compared as wall-clock times of the zone: a period runs from its start to its start plus the duration on
the local clock, so in a spring-forward gap the skipped part of a period is lost, and in a fall-back fold both passes
of the repeated hour fall inside it; a start that falls in a gap is read as zoneinfo reads it (fold=0: as far past
the gap's end as it was into the gap).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet.rollout.plan import parse_duration

_MAX_DURATION_S = 7 * 86400
#: The Gregorian calendar repeats every 400 years: a cron that opens at all opens within this many days.
_CALENDAR_CYCLE_DAYS = 146097
_EXAMPLE = "like '0 2 * * * 4h' (02:00 for 4 hours)"

_MONTHS = {
    name: number
    for number, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_WEEKDAYS = {name: number for number, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
#: One item of a cron field, lowercased: ``*``, ``5``, ``mon``, ``1-5``, each with a step or not (``*/15``).
_ITEM = re.compile(r"(?:\*|([a-z0-9]+)(?:-([a-z0-9]+))?)(?:/([0-9]+))?")


@dataclass(frozen=True, slots=True)
class _Field:
    """One cron field: its name in messages, its bounds, the names it accepts, and a hint on how to write it."""

    name: str
    low: int
    high: int
    names: Mapping[str, int]
    hint: str


_FIELDS = (
    _Field("minute", 0, 59, {}, "0-59, like 0 or */15"),
    _Field("hour", 0, 23, {}, "0-23, like 2 or 22-23"),
    _Field("day of month", 1, 31, {}, "1-31, like 1 or 1-7"),
    _Field("month", 1, 12, _MONTHS, "1-12 or jan-dec, like 1 or jan,jul"),
    _Field("day of week", 0, 7, _WEEKDAYS, "0-7 or sun-sat (0 and 7 are Sunday), like 1-5 or mon-fri"),
)


def _parse_field(text: str, spec: _Field, cron: str) -> frozenset[int]:
    """The values one cron field selects; ValueError naming the field and how to write it if it is not one."""
    values: set[int] = set()
    for item in text.split(","):
        selected = _item_values(item, spec)
        if selected is None:
            raise ValueError(f"bad {spec.name} {text!r} in maintenance window cron {cron!r}; use {spec.hint}")
        values.update(selected)
    return frozenset(values)


def _item_values(item: str, spec: _Field) -> range | None:
    """The values one item of a field selects, or None if it is not an item of that field.

    A step needs a ``*`` or a range before it: Vixie cron reads ``5/15`` as ``5``, which is rarely what was meant.
    """
    match = _ITEM.fullmatch(item)
    if match is None:
        return None
    first, last, step = match.groups()
    if first is None:
        low, high = spec.low, spec.high
    elif step is not None and last is None:
        return None
    else:
        low = _number(first, spec)
        high = low if last is None else _number(last, spec)
    if low is None or high is None or low > high or (step is not None and int(step) == 0):
        return None
    return range(low, high + 1, int(step or 1))


def _number(token: str, spec: _Field) -> int | None:
    """A number or a name of the field (``mon``, ``jan``) within its bounds, or None."""
    value = spec.names.get(token, int(token) if token.isdigit() else None)
    return value if value is not None and spec.low <= value <= spec.high else None


@dataclass(frozen=True, slots=True)
class _Schedule:
    """The start times of a cron expression: the minutes and hours (sorted), and the rule for days."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    #: Days of the week, 0 = Sunday (a 7 is stored as 0).
    weekdays: frozenset[int]
    #: Both the day of month and the day of week are restricted: a day matches if either does (Vixie cron).
    either_day: bool

    @classmethod
    def parse(cls, cron: str) -> _Schedule:
        """The schedule of five lowercased cron fields; ValueError naming the first field that is not one."""
        fields = cron.split()
        minutes, hours, days, months, weekdays = (
            _parse_field(text, spec, cron) for text, spec in zip(fields, _FIELDS, strict=True)
        )
        either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
        return cls(
            tuple(sorted(minutes)), tuple(sorted(hours)), days, months, frozenset(d % 7 for d in weekdays), either_day
        )

    def day_matches(self, day: date) -> bool:
        """Whether periods start on ``day``: its month, and its day of month and (or, see ``either_day``) weekday."""
        if day.month not in self.months:
            return False
        on_day, on_weekday = day.day in self.days, day.isoweekday() % 7 in self.weekdays
        return on_day or on_weekday if self.either_day else on_day and on_weekday

    def first_on(self, day: date, earliest: time) -> datetime | None:
        """The first start on ``day`` at ``earliest`` (a whole minute) or later, or None."""
        for hour in self.hours[bisect_left(self.hours, earliest.hour) :]:
            first = bisect_left(self.minutes, earliest.minute) if hour == earliest.hour else 0
            if first < len(self.minutes):
                return datetime.combine(day, time(hour, self.minutes[first]))
        return None

    def last_on(self, day: date, latest: time) -> datetime | None:
        """The last start on ``day`` at ``latest`` or earlier, or None."""
        for hour in reversed(self.hours[: bisect_right(self.hours, latest.hour)]):
            end = bisect_right(self.minutes, latest.minute) if hour == latest.hour else len(self.minutes)
            if end:
                return datetime.combine(day, time(hour, self.minutes[end - 1]))
        return None

    def next_start(self, wall: datetime) -> datetime | None:
        """The first start at ``wall`` or later (naive wall times), or None if the cron never opens."""
        start = wall.replace(second=0, microsecond=0)
        if start < wall:
            start += timedelta(minutes=1)
        day, earliest, end = start.date(), start.time(), start.date() + timedelta(days=_CALENDAR_CYCLE_DAYS)
        while day < end:
            if self.day_matches(day) and (found := self.first_on(day, earliest)):
                return found
            if day.month in self.months:
                day += timedelta(days=1)
            else:  # skip to the 1st of the next month
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
            earliest = time(0, 0)
        return None

    def last_start(self, wall: datetime, after: datetime) -> datetime | None:
        """The last start at ``wall`` or earlier and later than ``after`` (naive wall times), or None."""
        day, latest = wall.date(), wall.time()
        while day >= after.date():
            if self.day_matches(day) and (found := self.last_on(day, latest)) and found > after:
                return found
            day -= timedelta(days=1)
            latest = time(23, 59)
        return None


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """Recurring periods when devices may be updated: a 5-field cron expression for when each period starts, and how
    long it lasts.

    Built by :func:`parse_window`, or directly from a cron and a duration: the cron is checked (ValueError naming
    the fix) and ``text`` is worked out either way.
    """

    #: The five cron fields, in local time of the device.
    cron: str
    #: How long each period lasts: more than 0 and at most 7 days.
    duration_s: float
    #: The canonical text: the cron fields lowercased and single-spaced, then the duration (``0 2 * * * 4h``).
    text: str = field(init=False)
    _schedule: _Schedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.cron.split()) != 5:
            raise ValueError(f"bad maintenance window cron {self.cron!r}; write five cron fields, {_EXAMPLE}")
        if not 0 < self.duration_s <= _MAX_DURATION_S:
            raise ValueError(
                f"bad maintenance window duration {self.duration_s:g}s; a period lasts more than 0s and at most 7d, "
                "like 4h"
            )
        cron = " ".join(self.cron.lower().split())
        schedule = _Schedule.parse(cron)
        if schedule.next_start(datetime(2000, 1, 1)) is None:
            raise ValueError(
                f"maintenance window cron {cron!r} never opens: no day has its day of month, month and day of week; "
                "fix them"
            )
        object.__setattr__(self, "cron", cron)
        object.__setattr__(self, "text", f"{cron} {_duration_text(self.duration_s)}")
        object.__setattr__(self, "_schedule", schedule)

    def is_open(self, at: datetime) -> bool:
        """Whether a period is running at ``at``, an aware datetime in the device's local time zone.

        A period is open from its start (included) to its start plus the duration (excluded), so a period that
        started the evening before can still be open.
        """
        wall = _wall(at)
        return self._schedule.last_start(wall, after=wall - timedelta(seconds=self.duration_s)) is not None

    def next_open(self, at: datetime) -> datetime:
        """``at`` itself if the window is open then, else the start of the next period (aware, in ``at``'s zone)."""
        if self.is_open(at):
            return at
        start = self._schedule.next_start(_wall(at))
        if start is None:
            raise AssertionError("unreachable: a MaintenanceWindow's cron opens within the calendar's cycle")
        aware = start.replace(tzinfo=at.tzinfo)
        if aware.timestamp() < at.timestamp():  # `at` is in the second pass of a fall-back fold, and so is the start
            aware = aware.replace(fold=1)
        # Through UTC and back: a start in a spring-forward gap comes out as a time that exists.
        return aware.astimezone(UTC).astimezone(at.tzinfo)


def _wall(at: datetime) -> datetime:
    """``at`` as a naive local wall time; ValueError for a naive ``at``, whose zone nothing says."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("maintenance window times must be aware datetimes; make them with local_time(ts, tz)")
    return at.replace(tzinfo=None)


def _duration_text(seconds: float) -> str:
    """``seconds`` the way :func:`parse_duration` reads it back, largest units first: 5400 -> ``1h30m``."""
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def parse_window(text: str) -> MaintenanceWindow:
    """The window of ``CRON DURATION``: five cron fields, then the duration (:func:`parse_duration`, like ``4h``).

    ``0 2 * * * 4h`` is 02:00 every day for 4 hours; ``*/30 9-17 * * mon-fri 10m`` every half hour of office hours for
    10 minutes. Raises ValueError naming the fix.
    """
    tokens = text.split()
    if len(tokens) != 6:
        raise ValueError(f"bad maintenance window {text!r}; write five cron fields and a duration, {_EXAMPLE}")
    return MaintenanceWindow(" ".join(tokens[:5]), parse_duration(tokens[5]))


def check_timezone(tz: str) -> str:
    """``tz`` if it is an IANA time zone name this machine knows (Europe/Berlin, UTC...), else ValueError."""
    _zone(tz)
    return tz


def local_time(ts: float, tz: str | None) -> datetime:
    """Unix seconds as an aware datetime in the IANA zone ``tz`` (UTC when None): what windows are checked against."""
    return datetime.fromtimestamp(ts, UTC if tz is None else _zone(tz))


def _zone(tz: str) -> tzinfo:
    """The zone named ``tz``; ValueError for a name that is not one (zoneinfo raises a KeyError or a ValueError)."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r}; use an IANA name like Europe/Berlin") from None
