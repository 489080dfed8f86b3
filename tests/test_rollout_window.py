"""Maintenance windows: when a cron-and-duration window is open and when it next opens, in the device's local time.

June 2026 starts on a Monday: Mon 1, Tue 2, Wed 3, Thu 4, Fri 5, Sat 6, Sun 7, Mon 8, Tue 9 ... Mon 15, Tue 16.
"""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from fleet.rollout.window import MaintenanceWindow, check_timezone, local_time, parse_window

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def june(day: int, hour: int, minute: int = 0, second: int = 0, tz: ZoneInfo = UTC) -> datetime:
    return datetime(2026, 6, day, hour, minute, second, tzinfo=tz)


def open_days(window: str, hour: int) -> list[int]:
    """The days of June 1-16 on which ``window`` is open at ``hour``:00."""
    return [day for day in range(1, 17) if parse_window(window).is_open(june(day, hour))]


@pytest.mark.parametrize(
    ("at", "is_open"),
    [
        (june(3, 1, 59, 59), False),
        (june(3, 2), True),  # the start is inside
        (june(3, 5, 59, 59), True),
        (june(3, 6), False),  # the end is not
        (june(3, 12), False),
    ],
)
def test_a_period_is_open_from_its_start_to_just_before_its_end(at: datetime, is_open: bool) -> None:
    assert parse_window("0 2 * * * 4h").is_open(at) is is_open


def test_a_period_that_started_the_evening_before_is_still_open_after_midnight() -> None:
    window = parse_window("0 23 * * * 4h")
    assert window.is_open(june(4, 23, 30))
    assert window.is_open(june(5, 1, 30))
    assert not window.is_open(june(5, 3))
    assert not window.is_open(june(5, 22, 59))


def test_a_period_can_last_a_week() -> None:
    window = parse_window("0 0 * * sun 7d")
    assert all(window.is_open(june(day, hour)) for day in range(1, 17) for hour in (0, 12, 23))


def test_days_of_the_week_may_be_named_in_any_case_and_0_and_7_are_sunday() -> None:
    assert open_days("0 22 * * mon-fri 10h", 23) == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 15, 16]
    assert open_days("0 22 * * MON-Fri 10h", 23) == open_days("0 22 * * 1-5 10h", 23)
    assert open_days("0 22 * * mon-fri 10h", 7) == [2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 16]  # Friday's night runs on
    assert (
        open_days("0 12 * * 0 1h", 12) == open_days("0 12 * * 7 1h", 12) == open_days("0 12 * * sun 1h", 12) == [7, 14]
    )


def test_months_may_be_named_and_stepped() -> None:
    window = parse_window("0 0 1 jan-dec/3 * 1d")  # January, April, July, October
    assert window.is_open(datetime(2026, 7, 1, 12, tzinfo=UTC))
    assert not window.is_open(june(1, 12))


@pytest.mark.parametrize(
    ("window", "at", "is_open"),
    [
        ("*/15 * * * * 5m", june(3, 10, 15), True),
        ("*/15 * * * * 5m", june(3, 10, 19, 59), True),
        ("*/15 * * * * 5m", june(3, 10, 20), False),
        ("*/15 * * * * 5m", june(3, 10, 45), True),
        ("0-30/10 3 * * * 1m", june(3, 3, 30), True),
        ("0-30/10 3 * * * 1m", june(3, 3, 20, 30), True),
        ("0-30/10 3 * * * 1m", june(3, 3, 25), False),
        ("0-30/10 3 * * * 1m", june(3, 3, 40), False),
        ("0 */6 * * * 1h", june(3, 18, 30), True),
        ("0 */6 * * * 1h", june(3, 19, 30), False),
        ("0 1,13 * * * 30m", june(3, 13, 10), True),
        ("0 1,13 * * * 30m", june(3, 12, 10), False),
    ],
)
def test_steps_and_lists_select_every_nth_and_the_named_values(window: str, at: datetime, is_open: bool) -> None:
    assert parse_window(window).is_open(at) is is_open


def test_a_day_matches_its_day_of_month_or_its_day_of_week_when_both_are_restricted() -> None:
    assert open_days("0 2 1,15 * tue 1h", 2) == [1, 2, 9, 15, 16]


def test_a_day_of_month_starting_with_a_star_is_not_restricted_so_both_must_match() -> None:
    # As in Vixie cron: "*/2" (the odd days) with "tue" means odd Tuesdays, not odd days or Tuesdays.
    assert open_days("0 2 */2 * tue 1h", 2) == [9]


def test_next_open_is_now_when_the_window_is_open() -> None:
    at = june(3, 3, 17, 5)
    assert parse_window("0 2 * * * 4h").next_open(at) is at


def test_next_open_is_the_next_start_on_the_minute() -> None:
    assert parse_window("0 2 * * * 4h").next_open(june(3, 1, 59, 30)) == june(3, 2)
    assert parse_window("*/15 * * * * 1m").next_open(june(3, 10, 1, 0)) == june(3, 10, 15)
    assert parse_window("*/15 * * * * 1m").next_open(june(3, 10, 59, 1)) == june(3, 11, 0)


def test_next_open_crosses_a_month_end_and_a_year_end() -> None:
    window = parse_window("0 2 1 * * 4h")
    assert window.next_open(datetime(2026, 1, 31, 12, tzinfo=UTC)) == datetime(2026, 2, 1, 2, tzinfo=UTC)
    assert window.next_open(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2027, 1, 1, 2, tzinfo=UTC)
    leap_day = parse_window("0 2 29 2 * 1h")
    assert leap_day.next_open(datetime(2026, 3, 1, tzinfo=UTC)) == datetime(2028, 2, 29, 2, tzinfo=UTC)


def test_next_open_from_a_weekend_is_the_weekday_window_on_monday() -> None:
    window = parse_window("0 22 * * mon-fri 10h")
    assert window.next_open(june(6, 12)) == june(8, 22)  # Saturday noon: Friday's night is over
    assert window.next_open(june(6, 7, 59)) == june(6, 7, 59)  # Saturday morning: Friday's night still runs


def test_the_same_instant_is_open_in_one_time_zone_and_closed_in_another() -> None:
    window = parse_window("0 2 * * * 4h")
    ts = june(3, 0, 30).timestamp()
    assert window.is_open(local_time(ts, "Europe/Berlin"))  # 02:30 CEST
    assert not window.is_open(local_time(ts, "America/New_York"))  # 20:30 the evening before
    assert not window.is_open(local_time(ts, None))  # 00:30 UTC
    assert window.next_open(local_time(ts, "America/New_York")) == datetime(
        2026, 6, 3, 2, tzinfo=ZoneInfo("America/New_York")
    )


def test_local_time_is_an_aware_time_in_the_zone_and_utc_without_one() -> None:
    ts = june(3, 0, 30).timestamp()
    assert local_time(ts, "Europe/Berlin") == june(3, 2, 30, tz=BERLIN)
    assert local_time(ts, "Europe/Berlin").utcoffset() is not None
    assert local_time(ts, None) == june(3, 0, 30) and local_time(ts, None).utcoffset() is not None


def test_a_start_in_the_spring_forward_gap_opens_as_far_past_the_gap_as_it_was_into_it() -> None:
    # Berlin, 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 never happens on the clock.
    window = parse_window("30 2 * * * 1h")
    start = window.next_open(datetime(2026, 3, 29, 1, 0, tzinfo=BERLIN))
    assert (start.hour, start.minute, start.utcoffset()) == (3, 30, june(1, 0, tz=BERLIN).utcoffset())
    assert window.is_open(datetime(2026, 3, 29, 3, 15, tzinfo=BERLIN))  # the wall clock is inside 02:30-03:30
    assert not window.is_open(datetime(2026, 3, 29, 3, 30, tzinfo=BERLIN))


def test_both_passes_of_a_fall_back_hour_are_inside_a_period_and_next_open_finds_the_second() -> None:
    # Berlin, 25 October 2026: 03:00 CEST goes back to 02:00 CET; 02:00-02:59 happens twice.
    window = parse_window("30 2 * * * 20m")
    first, second = (datetime(2026, 10, 25, 2, 40, tzinfo=BERLIN, fold=fold) for fold in (0, 1))
    assert window.is_open(first) and window.is_open(second)
    start = window.next_open(datetime(2026, 10, 25, 2, 10, tzinfo=BERLIN, fold=1))
    assert start.timestamp() == datetime(2026, 10, 25, 1, 30, tzinfo=UTC).timestamp()  # 02:30 CET, the second pass


def test_a_window_has_one_canonical_text_and_may_be_built_from_its_parts() -> None:
    window = parse_window(" 0  2 * * MON-fri   90m ")
    assert (window.cron, window.duration_s, window.text) == ("0 2 * * mon-fri", 5400.0, "0 2 * * mon-fri 1h30m")
    assert parse_window(window.text) == window == MaintenanceWindow("0 2 * * MON-fri", 5400.0)
    assert parse_window("0 2 * * * 90s").text == "0 2 * * * 1m30s"
    assert parse_window("0 2 * * * 1d").text == "0 2 * * * 1d"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 2 * *", r"^bad maintenance window '0 2 \* \*'; write five cron fields and a duration, "
                    r"like '0 2 \* \* \* 4h' \(02:00 for 4 hours\)$"),
        ("", r"^bad maintenance window ''; write five cron fields and a duration"),
        ("0 2 * * * * 4h", r"^bad maintenance window '0 2 \* \* \* \* 4h'; write five cron fields"),
        ("0 2 * * * 4 h", r"^bad maintenance window '0 2 \* \* \* 4 h'; write five cron fields"),
        ("60 2 * * * 4h", r"^bad minute '60' in maintenance window cron '60 2 \* \* \*'; use 0-59, like 0 or \*/15$"),
        ("5/15 * * * * 1m", r"^bad minute '5/15' in .*; use 0-59"),
        ("*/0 * * * * 1m", r"^bad minute '\*/0' in .*; use 0-59"),
        ("30-10 * * * * 1m", r"^bad minute '30-10' in .*; use 0-59"),
        ("0,,5 * * * * 1m", r"^bad minute '0,,5' in .*; use 0-59"),
        ("0 24 * * * 4h", r"^bad hour '24' in .*; use 0-23, like 2 or 22-23$"),
        ("0 -1 * * * 4h", r"^bad hour '-1' in .*; use 0-23"),
        ("0 2 0 * * 4h", r"^bad day of month '0' in .*; use 1-31, like 1 or 1-7$"),
        ("0 2 * 13 * 4h", r"^bad month '13' in .*; use 1-12 or jan-dec, like 1 or jan,jul$"),
        ("0 2 * june * 4h", r"^bad month 'june' in .*; use 1-12 or jan-dec"),
        ("0 2 * * 8 4h", r"^bad day of week '8' in .*; use 0-7 or sun-sat \(0 and 7 are Sunday\), "
                         r"like 1-5 or mon-fri$"),
        ("0 2 * * mun 4h", r"^bad day of week 'mun' in .*; use 0-7 or sun-sat"),
        ("0 2 * * mon, 4h", r"^bad day of week 'mon,' in .*; use 0-7 or sun-sat"),
        ("0 2 * * * 0s", r"^bad maintenance window duration 0s; a period lasts more than 0s and at most 7d, like 4h$"),
        ("0 2 * * * 7d1s", r"^bad maintenance window duration 604801s; a period lasts more than 0s and at most 7d"),
        ("0 2 * * * 4x", r"^bad duration '4x'; use a number with s, m, h or d, like 90s, 10m or 1h30m$"),
        ("0 0 30 2 * 1h", r"^maintenance window cron '0 0 30 2 \*' never opens: no day has its day of month, month and "
                          r"day of week; fix them$"),
    ],
)  # fmt: skip
def test_a_bad_window_says_how_to_write_one(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_window(text)


def test_a_window_refuses_a_time_without_a_zone() -> None:
    with pytest.raises(
        ValueError, match=r"^maintenance window times must be aware datetimes; make them with local_time"
    ):
        parse_window("0 2 * * * 4h").is_open(datetime(2026, 6, 3, 2, 30))


def test_a_known_time_zone_is_accepted_as_given() -> None:
    assert check_timezone("Europe/Berlin") == "Europe/Berlin"
    assert check_timezone("UTC") == "UTC"


@pytest.mark.parametrize("tz", ["Mars/Base", "", "../etc/passwd", "Europe/Berlin "])
def test_an_unknown_time_zone_says_to_use_an_iana_name(tz: str) -> None:
    message = "^" + re.escape(f"unknown time zone {tz!r}; use an IANA name like Europe/Berlin") + "$"
    with pytest.raises(ValueError, match=message):
        check_timezone(tz)
    with pytest.raises(ValueError, match=message):
        local_time(0.0, tz)
