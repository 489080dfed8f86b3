"""What a campaign targets and in which waves: selectors, wave sizes, durations and seeded plans, worked out by hand."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fleet.rollout.plan import (
    Selector,
    WaveSize,
    parse_duration,
    parse_selector,
    parse_waves,
    plan_waves,
)
from fleet.store.rows import Device

IDS = [f"dev-{i:02d}" for i in range(30)]
DEFAULT = parse_waves("10,50,100")


def device(
    tags: dict[str, str] | None = None, machine: str | None = "aarch64", releases: dict[str, str | None] | None = None
) -> Device:
    models: dict[str, Any] = {model: {"release": ref} for model, ref in (releases or {}).items()}
    return Device(
        device_id="dev-1",
        first_seen=0.0,
        last_seen=0.0,
        online=True,
        boot_id=None,
        agent_version=None,
        hardware=None if machine is None else {"machine": machine},
        runtimes=None,
        models=models,
        offline_reason=None,
        windows=0,
        tags=tags or {},
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0), ("1h30m", 5400.0), ("0s", 0.0), ("30", 30.0),
     ("1d2h3m4s", 93784.0), ("1.5h", 5400.0), (" 4h ", 14400.0)],
)  # fmt: skip
def test_a_duration_is_read_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "-5s", "5 minutes", "10M", "1m1h", "h", "1h1h", "1.5.2s", "inf"])
def test_a_bad_duration_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"^bad duration .*; use a number with s, m, h or d, like 90s, 10m or 1h30m$"):
        parse_duration(text)


def test_the_same_seed_gives_the_same_plan_and_another_seed_another_order() -> None:
    plan = plan_waves(IDS, DEFAULT, seed=7)
    assert plan_waves(IDS, DEFAULT, seed=7) == plan
    other = plan_waves(IDS, DEFAULT, seed=8)
    assert other != plan
    assert sorted(d for wave in other for d in wave) == sorted(d for wave in plan for d in wave) == IDS


def test_the_order_the_devices_are_given_in_does_not_change_the_plan() -> None:
    assert plan_waves(list(reversed(IDS)), DEFAULT, seed=3) == plan_waves(IDS, DEFAULT, seed=3)
    assert plan_waves(IDS + IDS[:5], DEFAULT, seed=3) == plan_waves(IDS, DEFAULT, seed=3)  # duplicates count once


def test_a_plan_is_pinned_by_its_seed_across_releases_of_this_code() -> None:
    # A campaign's plan is worked out again after a restart: changing the shuffle would move devices between waves.
    assert plan_waves(IDS[:6], DEFAULT, seed=1) == [["dev-02"], ["dev-03", "dev-05"], ["dev-00", "dev-04", "dev-01"]]
    sites = {device_id: "ab"[i % 2] for i, device_id in enumerate(IDS[:6])}
    assert plan_waves(IDS[:6], parse_waves("100"), seed=1, groups=sites) == [
        ["dev-02", "dev-05", "dev-04", "dev-01", "dev-00", "dev-03"]
    ]


def test_thirty_devices_in_waves_of_10_50_100_percent_come_in_3_12_and_15() -> None:
    assert [len(wave) for wave in plan_waves(IDS, DEFAULT, seed=1)] == [3, 12, 15]


def test_device_counts_and_percents_mix() -> None:
    assert [len(wave) for wave in plan_waves(IDS, parse_waves("5d,50%,100%"), seed=1)] == [5, 10, 15]


@pytest.mark.parametrize(
    ("count", "waves", "sizes"),
    [
        (0, "10,50,100", []),
        (1, "10,50,100", [1]),  # every wave reaches the one device: the later ones are empty and dropped
        (2, "10,50,100", [1, 1]),  # ceil(0.2) = 1, ceil(1.0) = 1, 2
        (3, "10,50,100", [1, 1, 1]),  # ceil(0.3) = 1, ceil(1.5) = 2, 3
        (4, "5d,50%,100%", [4]),  # a count is capped at the fleet: 50% reaches no further
        (10, "5d,50%,100%", [5, 5]),
    ],
)
def test_tiny_fleets_get_no_empty_wave(count: int, waves: str, sizes: list[int]) -> None:
    assert [len(wave) for wave in plan_waves(IDS[:count], parse_waves(waves), seed=5)] == sizes


def test_with_sites_the_first_wave_holds_one_device_of_each_site() -> None:
    sites = {device_id: f"site-{i % 3}" for i, device_id in enumerate(IDS)}
    for seed in range(20):
        plan = plan_waves(IDS, DEFAULT, seed=seed, groups=sites)
        assert sorted(sites[d] for d in plan[0]) == ["site-0", "site-1", "site-2"]
        assert Counter(sites[d] for d in plan[0] + plan[1]) == {"site-0": 5, "site-1": 5, "site-2": 5}


def test_groups_are_spread_in_proportion_and_unnamed_devices_form_their_own_group() -> None:
    groups = {device_id: "big" for device_id in IDS[:20]} | {device_id: "small" for device_id in IDS[20:25]}
    (order,) = plan_waves(IDS, parse_waves("100"), seed=2, groups=groups)
    assert sorted(order) == IDS
    named = {d: groups.get(d, "") for d in order}
    # 20 big, 5 small and 5 unnamed devices: every 6 in a row hold 4 big, 1 small and 1 unnamed.
    for start in range(0, 30, 6):
        assert Counter(named[d] for d in order[start : start + 6]) == {"big": 4, "small": 1, "": 1}


def test_shuffling_within_groups_still_depends_on_the_seed() -> None:
    sites = {device_id: f"site-{i % 3}" for i, device_id in enumerate(IDS)}
    assert plan_waves(IDS, DEFAULT, seed=1, groups=sites) != plan_waves(IDS, DEFAULT, seed=2, groups=sites)


def test_a_plan_whose_last_wave_is_not_100_percent_is_refused() -> None:
    with pytest.raises(ValueError, match="the last wave must reach 100%"):
        plan_waves(IDS, [WaveSize(50.0, True)], seed=1)


@pytest.mark.parametrize(
    ("text", "waves"),
    [
        ("10,50,100", (WaveSize(10.0, True), WaveSize(50.0, True), WaveSize(100.0, True))),
        ("10%, 50%, 100%", (WaveSize(10.0, True), WaveSize(50.0, True), WaveSize(100.0, True))),
        ("5d,50%,100%", (WaveSize(5.0, False), WaveSize(50.0, True), WaveSize(100.0, True))),
        ("100", (WaveSize(100.0, True),)),
        ("0.5,100", (WaveSize(0.5, True), WaveSize(100.0, True))),
    ],
)
def test_waves_are_read_as_cumulative_percents_or_counts(text: str, waves: tuple[WaveSize, ...]) -> None:
    assert parse_waves(text) == waves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"^bad --waves item ''; write cumulative percents or device counts \(5d\) separated by commas, like 10,"),
        ("10,,100", r"^bad --waves item ''; write"),
        ("ten,100", r"^bad --waves item 'ten'; write"),
        ("1.5d,100", r"^bad --waves item '1.5d'; write"),
        ("-10,100", r"^bad --waves item '-10'; write"),
        ("0,100", r"^bad --waves item '0'; write a percent above 0 and at most 100, or a count of 1d or more$"),
        ("0d,100", r"^bad --waves item '0d'; write a percent above 0"),
        ("50,150", r"^bad --waves item '150'; write a percent above 0"),
        ("50,10,100", r"^--waves '50,10,100' does not grow at '10'; waves are cumulative, like 10,50,100"),
        ("5d,5d,100", r"^--waves '5d,5d,100' does not grow at '5d'"),
        ("10,50", r"^the last wave must reach 100%; end --waves with 100, like 10,50,100 or 5d,50%,100%$"),
        ("10,50d", r"^the last wave must reach 100%"),
    ],
)
def test_bad_waves_say_how_to_write_them(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_waves(text)


@pytest.mark.parametrize("text", [None, "", "  "])
def test_no_selector_selects_every_device(text: str | None) -> None:
    selector = parse_selector(text)
    assert selector == Selector({}, frozenset(), frozenset(), "")
    assert selector.matches(device()) and selector.matches(device(machine=None))


def test_every_term_must_match_and_any_of_its_values_may() -> None:
    selector = parse_selector("site=north|south,tier=a")
    assert selector.matches(device({"site": "north", "tier": "a"}))
    assert selector.matches(device({"site": "south", "tier": "a", "hw": "pi4"}))
    assert not selector.matches(device({"site": "east", "tier": "a"}))
    assert not selector.matches(device({"site": "north"}))  # no tier tag


@pytest.mark.parametrize("key", ["hardware", "machine"])
def test_hardware_selects_on_the_machine_the_device_reported(key: str) -> None:
    selector = parse_selector(f"{key}=aarch64|armv7l")
    assert selector.machines == {"aarch64", "armv7l"} and not selector.tags
    assert selector.matches(device(machine="armv7l"))
    assert not selector.matches(device(machine="x86_64"))
    assert not selector.matches(device(machine=None))
    assert not selector.matches(device({key: "aarch64"}, machine=None))  # a tag of that name is not the hardware


@pytest.mark.parametrize(
    ("term", "releases", "matches"),
    [
        ("digits:1.0.0", {"digits": "digits:1.0.0"}, True),
        ("digits:1", {"digits": "digits:1.0.0"}, True),
        ("digits:1", {"digits": "digits:1.2"}, True),
        ("digits:1", {"digits": "digits:1"}, True),
        ("digits:1", {"digits": "digits:10.0"}, False),  # a prefix stops at a dot
        ("digits:1.2", {"digits": "digits:1.20"}, False),
        ("digits:1", {"digits": "digitsx:1.0"}, False),
        ("digits:1", {"kws": "kws:1.0", "digits": "digits:1.3"}, True),  # any model's release
        ("digits:1", {}, False),
        ("digits:1|kws:2", {"kws": "kws:2.1"}, True),
        ("digits:none", {}, True),
        ("digits:none", {"digits": None}, True),
        ("digits:none", {"kws": "kws:1.0"}, True),
        ("digits:none", {"digits": "digits:1.0"}, False),
    ],
)
def test_a_release_term_matches_a_version_or_a_prefix_at_a_dot_or_none(
    term: str, releases: dict[str, str | None], matches: bool
) -> None:
    assert parse_selector(f"release={term}").matches(device(releases=releases)) is matches


def test_a_selector_has_one_canonical_text() -> None:
    selector = parse_selector(" site=south|north , machine=x86_64,release=digits:1, hw=pi4")
    assert selector.text == "hardware=x86_64,hw=pi4,release=digits:1,site=north|south"
    assert parse_selector(selector.text) == selector
    assert dict(selector.tags) == {"hw": frozenset({"pi4"}), "site": frozenset({"north", "south"})}
    assert selector.releases == {"digits:1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site", r"^bad --select term 'site'; write KEY=VALUE terms separated by commas, like site=north,release=dig"),
        ("site=", r"^bad --select term 'site='; write KEY=VALUE"),
        ("=north", r"^bad --select term '=north'; write KEY=VALUE"),
        ("site=north,", r"^bad --select term ''; write KEY=VALUE"),
        ("site=north||south", r"^bad --select term 'site=north\|\|south'; write KEY=VALUE"),
        ("site=no rth", r"^bad --select term 'site=no rth'; write KEY=VALUE"),
        ("site=north;rm", r"^bad --select term 'site=north;rm'; write KEY=VALUE"),
        ("site=north,site=south", r"^--select names 'site' twice; give its values once, joined by \|, like site=n"),
        ("hardware=aarch64,machine=x86_64", r"^--select names 'hardware/machine' twice"),
        ("release=digits", r"^bad --select release 'digits'; write release=NAME:VERSION, a version prefix or NAME:no"),
        ("release=:1", r"^bad --select release ':1'; write release=NAME:VERSION"),
        ("release=digits:", r"^bad --select release 'digits:'; write"),
        ("release=digits:1:2", r"^bad --select release 'digits:1:2'; write"),
    ],
)
def test_a_bad_selector_says_how_to_write_one(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_selector(text)
