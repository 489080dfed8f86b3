"""`fleet rollout` as an operator meets it when something is wrong: one line, the right exit code, no traceback; and
the JSON of create and list. In-process through click's runner, on a real home (signed releases, SQLite)."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from test_release_cli import fleet, ok_json, publish

from agent import protocol
from fleet.store import open_store
from fleet.trust.repository import Repository

OLD, NEW = "digits:1.0.0", "digits:1.1.0"
SUBCOMMANDS = ("create", "list", "status", "pause", "resume", "abort", "rollback")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, example_model: Callable[[str], Path]) -> Path:
    """A home with digits 1.0.0 and 1.1.0 published and three devices on 1.0.0, tagged site=north."""
    home = tmp_path_factory.mktemp("rollout-cli") / "home"
    ok_json("init", "--home", home)
    publish(home, example_model("good") / "int8.onnx", OLD)
    publish(home, example_model("better") / "int8.onnx", NEW)
    with contextlib.closing(open_store(home / "fleet.db")) as store:
        runtime = Repository(home, ledger=store).release("digits", "1.1.0")["runtime"]
        ids = [f"cli-{uuid.uuid4().hex[:10]}" for _ in range(3)]
        store.write_batch(
            status=[{"v": protocol.SCHEMA_VERSION, "device_id": d, "state": "online", "boot_id": "c" * 32,
                     "agent_version": "0.4.0", "hardware": {"machine": platform.machine()}, "runtimes": [runtime],
                     "models": {"digits": {"release": OLD}}} for d in ids]
        )  # fmt: skip
        for d in ids:
            store.record_enrollment(d, "test", {"tags": {"site": "north"}})
    return home


@pytest.fixture
def home(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    return copy


def one_error_line(result: Result, code: int) -> str:
    """The command failed with ``code`` and said why in one line (no traceback, no usage text)."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def create(home: Path, *args: str) -> Result:
    """`fleet rollout create` of digits:1.1.0, without KPI gates unless ``args`` give some."""
    kpis = () if "--kpi" in args else ("--kpi", "none")
    return fleet("rollout", "create", "--release", NEW, *kpis, "--seed", "1", *args, "--home", home)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(("--soak", "5 minutes"), "--soak", id="soak"),
        pytest.param(("--max-failed", "150"), "--max-failed", id="max-failed"),
        pytest.param(("--min-devices", "0"), "--min-devices", id="min-devices"),
        pytest.param(("--retries", "-1"), "--retries", id="retries"),
        pytest.param(("--kpi", "p99 < 3"), "KPI metric 'p99'", id="kpi"),
        pytest.param(("--window", "0 2 * *"), "maintenance window '0 2 * *'", id="window"),
        pytest.param(("--waves", "50,10,100"), "--waves '50,10,100'", id="waves"),
    ],
)
def test_an_option_that_does_not_parse_exits_2_with_one_line_naming_it(
    home: Path, args: tuple[str, ...], named: str
) -> None:
    line = one_error_line(create(home, *args), 2)
    assert named in line
    assert line.endswith("see `fleet rollout create --help`")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--on-failure", "explode"), "'--on-failure'"),
        (("--max-failed", "lots"), "'--max-failed'"),
        (("--retries", "two"), "'--retries'"),
    ],
)
def test_an_option_click_refuses_exits_2_naming_it(home: Path, args: tuple[str, ...], named: str) -> None:
    result = create(home, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert named in result.stderr.strip().splitlines()[-1]


def test_a_release_not_written_name_colon_version_exits_2(home: Path) -> None:
    result = fleet("rollout", "create", "--release", "digits", "--home", home)
    assert result.exit_code == 2
    assert "'--release': 'digits' is not NAME:VERSION" in result.stderr


def test_an_unknown_release_exits_3_and_creates_nothing(home: Path) -> None:
    line = one_error_line(fleet("rollout", "create", "--release", "digits:9.9.9", "--home", home), 3)
    assert "digits:9.9.9" in line
    assert ok_json("rollout", "list", "--home", home) == []


def test_the_status_of_an_unknown_campaign_exits_3(home: Path) -> None:
    line = one_error_line(fleet("rollout", "status", "rollout-99", "--home", home), 3)
    assert line == "Error: no campaign 'rollout-99'; create one with `fleet rollout create`"


@pytest.mark.parametrize("action", ["pause", "resume", "abort", "rollback"])
def test_an_action_on_an_unknown_campaign_exits_3_naming_the_known_ones(home: Path, action: str) -> None:
    made = json.loads(create(home, "--json").stdout)["id"]
    line = one_error_line(fleet("rollout", action, "rollout-99", "--home", home), 3)
    assert line == f"Error: no campaign 'rollout-99'; known: {made}"


def test_pausing_a_succeeded_campaign_exits_1_saying_it_only_takes_rollback(home: Path) -> None:
    made = json.loads(create(home, "--json").stdout)["id"]
    with contextlib.closing(open_store(home / "fleet.db")) as store:
        assert store.move_campaign(made, "pending", "running", actor="test", action="rollout_start", detail={})
        assert store.move_campaign(made, "running", "succeeded", actor="test", action="rollout_complete", detail={})
    line = one_error_line(fleet("rollout", "pause", made, "--home", home), 1)
    assert line == f"Error: a succeeded campaign cannot pause: it takes rollback; see `fleet rollout status {made}`"
    assert ok_json("rollout", "status", made, "--home", home)["state"] == "succeeded"


def test_create_with_no_matching_device_exits_2_no_devices_and_creates_nothing(home: Path) -> None:
    line = one_error_line(create(home, "--select", "site=nowhere"), 2)
    assert line.startswith("Error: no device matches --select site=nowhere")
    assert ok_json("rollout", "list", "--home", home) == []


def test_create_when_every_selected_device_already_runs_the_release_exits_2(home: Path) -> None:
    line = one_error_line(fleet("rollout", "create", "--release", OLD, "--kpi", "none", "--home", home), 2)
    assert f"already runs {OLD}" in line


def test_create_json_gives_the_id_and_list_shows_it_pending_while_no_fleet_serve_runs(home: Path) -> None:
    made = ok_json("rollout", "create", "--release", NEW, "--kpi", "none", "--seed", "1", "--home", home)
    assert made == {"id": "rollout-1", "skipped": {}, "cannot_roll_back": {}}
    (listed,) = ok_json("rollout", "list", "--home", home)
    assert (listed["id"], listed["release"], listed["state"], listed["device_count"]) == (
        "rollout-1",
        NEW,
        "pending",
        3,
    )
    status = ok_json("rollout", "status", "1", "--home", home)
    assert (status["id"], status["state"]) == ("rollout-1", "pending")


def test_create_names_the_devices_a_rollback_could_not_return_a_factory_model_to(home: Path) -> None:
    with contextlib.closing(open_store(home / "fleet.db")) as store:
        store.write_batch(
            status=[{"v": protocol.SCHEMA_VERSION, "device_id": "cli-factory", "state": "online", "boot_id": "f" * 32,
                     "hardware": {"machine": platform.machine()}, "models": {"digits": {"release": "digits:good"}}}]
        )  # fmt: skip
    made = ok_json("rollout", "create", "--release", NEW, "--kpi", "none", "--home", home)
    assert made["cannot_roll_back"] == {
        "cli-factory": "it ran digits:good, which is not a published release (a factory model): it keeps what it runs"
    }
    result = fleet("rollout", "create", "--release", OLD, "--select", "release=digits:good", "--home", home)
    assert result.exit_code == 1 and "another active campaign" in result.output  # it is in rollout-1 already


def test_create_without_json_prints_the_id_and_warns_that_no_fleet_serve_runs(home: Path) -> None:
    result = create(home)
    assert result.exit_code == 0, result.output
    assert result.stdout == "rollout-1\n"
    assert "`fleet serve` is not running on this home" in result.stderr


def test_status_watch_follows_a_campaign_to_its_end_one_json_document_per_change(home: Path) -> None:
    create(home)
    ok_json("rollout", "abort", "rollout-1", "--home", home)
    watched = fleet("rollout", "status", "rollout-1", "--watch", "--json", "--interval", "0.05", "--home", home)
    assert watched.exit_code == 0, watched.output
    (doc,) = [json.loads(line) for line in watched.stdout.splitlines()]  # ended: printed once, then it returns
    assert (doc["state"], [w["state"] for w in doc["waves"]]) == ("aborted", ["stopped", "stopped", "stopped"])
    shown = fleet("rollout", "status", "rollout-1", "--watch", "--home", home)
    assert shown.exit_code == 0 and "rollout-1" in shown.stdout and "aborted" in shown.stdout, shown.output
    assert "why: abort by" in shown.stdout


def test_a_second_overlapping_campaign_exits_1_and_says_nothing_was_created(home: Path) -> None:
    create(home)
    line = one_error_line(create(home), 1)
    assert "rollout-1 holds" in line
    assert line.endswith("Nothing was created")
    assert [c["id"] for c in ok_json("rollout", "list", "--home", home)] == ["rollout-1"]


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_rollout_subcommand_has_help(subcommand: str) -> None:
    result = fleet("rollout", subcommand, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: main rollout {subcommand} [OPTIONS]")
    assert "--home" in result.stdout


def test_rollout_help_lists_every_subcommand() -> None:
    result = fleet("rollout", "--help")
    assert result.exit_code == 0
    assert all(name in result.stdout for name in SUBCOMMANDS)
