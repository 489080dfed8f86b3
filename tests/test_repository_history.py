"""The release repository as append-only history: a metadata file copied over another, an old backup put back or an
older timestamp.json is refused by every command (naming the file) and by `fleet serve`, `fleet release verify` lists
it, versioned files are never replaced, and a crash between a commit and its record is caught up.

Everything is real: the `fleet` CLI (click's runner, and `fleet serve` as a process), keys and metadata signed with
python-tuf, the project's digits models, SQLite, and a mosquitto broker for `fleet assign`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from test_release_cli import FLEET, fleet, ok_json, publish
from tuf.api.metadata import Metadata

from fleet.broker import MosquittoBroker
from fleet.store import open_store
from fleet.trust.repository import Repository, RepositoryError


def attempt(home: Path, model_file: Path, ref: str) -> Result:
    """A publish that may be refused."""
    name, version = ref.split(":")
    return fleet("release", "publish", model_file, "--name", name, "--version", version, "--home", home)


def refused(result: Result, *says: str) -> None:
    """Exit 1 with one line naming what is wrong and the way out."""
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: the repository in ") and "`fleet release verify` lists every finding" in line, line
    for text in says:
        assert text in line, line


def metadata_files(home: Path) -> dict[str, bytes]:
    folder = home / "repo" / "metadata"
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def version(home: Path, name: str) -> int:
    return int(Metadata.from_bytes((home / "repo" / "metadata" / name).read_bytes()).signed.version)


@pytest.fixture(scope="module")
def digits(example_model: Callable[[str], Path]) -> Path:
    return example_model("good")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fleet made by `fleet init`, nothing published."""
    ok_json("init", "--home", tmp_path / "home")
    return tmp_path / "home"


@pytest.fixture
def revoked(home: Path, digits: Path) -> Path:
    """The issue's fleet: digits 1.0.0 and 1.1.0 published, 1.0.0 revoked, then 1.2.0 published (targets v5)."""
    for model, ref in (("int8.onnx", "digits:1.0.0"), ("int8.tflite", "digits:1.1.0")):
        publish(home, digits / model, ref)
    assert fleet("release", "revoke", "digits:1.0.0", "--home", home).exit_code == 0
    publish(home, digits / "float.onnx", "digits:1.2.0")
    assert version(home, "5.targets.json") == 5
    return home


def test_a_targets_file_copied_over_the_committed_one_is_refused_everywhere_naming_the_file(
    revoked: Path, digits: Path, broker: MosquittoBroker
) -> None:
    """The reproduction: 3.targets.json (1.0.0 not yet revoked) copied over 5.targets.json, with no key."""
    metadata = revoked / "repo" / "metadata"
    shutil.copy(metadata / "3.targets.json", metadata / "5.targets.json")
    before = metadata_files(revoked)

    refused(fleet("release", "list", "--home", revoked), "5.targets.json: 5.snapshot.json records v5: ",
            "signed targets v3")  # fmt: skip
    refused(fleet("release", "show", "digits:1.0.0", "--home", revoked), "5.targets.json")
    refused(attempt(revoked, digits / "float.onnx", "digits:1.3.0"), "5.targets.json", "Nothing is signed")
    refused(fleet("release", "revoke", "digits:1.1.0", "--home", revoked), "5.targets.json")
    refused(fleet("assign", "pi-1", "--allow-unknown", "--release", "digits:1.0.0", "--broker", broker.url,
                  "--home", revoked), "5.targets.json")  # fmt: skip
    assert metadata_files(revoked) == before  # nothing signed on top, nothing rewritten
    assert not (revoked / "repo" / "targets" / "models" / "digits" / "1.3.0").exists()

    report = fleet("release", "verify", "--home", revoked)
    refused(report, "5.targets.json")
    assert any(line.startswith("FAIL ") and "5.targets.json" in line for line in report.stdout.splitlines())
    assert "repository history INCONSISTENT" in report.stdout
    found = json.loads(fleet("release", "verify", "--json", "--home", revoked).stdout)
    assert found["ok"] is False
    assert {(f["file"], f["fatal"]) for f in found["findings"]} == {("5.targets.json", True)}
    assert found["findings"][0]["reason"] in ("length_mismatch", "hash_mismatch")
    audit = fleet("audit", "--verify", "--json", "--home", revoked)
    assert audit.exit_code == 1
    assert json.loads(audit.stdout)["repository"]["ok"] is False

    serve = subprocess.run([FLEET, "serve", "--home", revoked], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1, serve.stderr[-2000:]
    assert serve.stdout == ""
    last = serve.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the repository in ") and "5.targets.json" in last, serve.stderr[-2000:]
    assert not (revoked / "serve.json").exists()


def test_after_the_file_is_restored_publishing_goes_on_without_reusing_a_counter_or_rewriting_a_file(
    revoked: Path, digits: Path
) -> None:
    metadata = revoked / "repo" / "metadata"
    original = (metadata / "5.targets.json").read_bytes()
    shutil.copy(metadata / "3.targets.json", metadata / "5.targets.json")
    refused(attempt(revoked, digits / "float.onnx", "digits:1.3.0"), "5.targets.json")

    (metadata / "5.targets.json").write_bytes(original)  # restored from the backup
    seen = metadata_files(revoked)
    timestamps = [version(revoked, "timestamp.json")]
    for ref in ("digits:1.3.0", "digits:1.4.0"):
        publish(revoked, digits / "float.onnx", ref)
        files = metadata_files(revoked)
        assert {n: files[n] for n in seen if n != "timestamp.json"} == {n: b for n, b in seen.items()
                                                                       if n != "timestamp.json"}  # fmt: skip
        seen = files
        timestamps.append(version(revoked, "timestamp.json"))
    assert timestamps == sorted(set(timestamps))  # strictly up
    counters = {r["version"]: r["release"] for r in ok_json("release", "list", "--home", revoked)}
    assert counters == {"1.0.0": 1, "1.1.0": 2, "1.2.0": 3, "1.3.0": 4, "1.4.0": 5}
    snapshots = sorted(int(n.split(".")[0]) for n in seen if n.endswith(".snapshot.json"))
    targets = [_targets_version(revoked, n) for n in snapshots]
    assert targets == sorted(targets) and snapshots == list(range(1, len(snapshots) + 1))
    assert ok_json("release", "verify", "--home", revoked)["ok"] is True


def _targets_version(home: Path, snapshot: int) -> int:
    md = Metadata.from_bytes((home / "repo" / "metadata" / f"{snapshot}.snapshot.json").read_bytes())
    return int(md.signed.meta["targets.json"].version)


def test_an_old_backup_of_the_repository_put_back_is_refused(
    home: Path, digits: Path, tmp_path: Path, broker: MosquittoBroker
) -> None:
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    shutil.copytree(home / "repo", tmp_path / "backup")
    publish(home, digits / "int8.tflite", "digits:1.1.0")
    assert fleet("release", "revoke", "digits:1.0.0", "--home", home).exit_code == 0
    shutil.rmtree(home / "repo")
    shutil.copytree(tmp_path / "backup", home / "repo")  # every file signed, every hash matching: only older

    refused(fleet("release", "list", "--home", home), "timestamp.json: timestamp is at v2, behind v4",
            "taken at or after the fleet's last change (root v1, timestamp v4, snapshot v4, targets v4)")  # fmt: skip
    refused(attempt(home, digits / "float.onnx", "digits:1.2.0"), "behind")
    refused(fleet("assign", "pi-1", "--allow-unknown", "--release", "digits:1.0.0", "--broker", broker.url,
                  "--home", home), "behind")  # fmt: skip  # the backup has 1.0.0 unrevoked: assign must not trust it
    found = json.loads(fleet("release", "verify", "--json", "--home", home).stdout)
    assert found["ok"] is False
    assert found["recorded"]["versions"] == {"root": 1, "timestamp": 4, "snapshot": 4, "targets": 4}
    assert {f["reason"] for f in found["findings"]} == {"behind_record"}


def test_an_older_timestamp_put_back_is_refused(home: Path, digits: Path) -> None:
    """The older timestamp's chain is complete and signed: only the fleet's record shows it went back."""
    metadata = home / "repo" / "metadata"
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    older = (metadata / "timestamp.json").read_bytes()
    assert fleet("release", "revoke", "digits:1.0.0", "--home", home).exit_code == 0
    (metadata / "timestamp.json").write_bytes(older)

    refused(fleet("release", "list", "--home", home), "timestamp.json: timestamp is at v2, behind v3")
    refused(fleet("release", "show", "digits:1.0.0", "--home", home), "behind v3")
    assert fleet("release", "verify", "--home", home).exit_code == 1


def test_a_crash_between_the_commit_and_its_record_is_accepted_and_the_record_caught_up(
    home: Path, digits: Path
) -> None:
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    # A change that committed (timestamp.json renamed into place) but died before the store recorded it.
    Repository(home).publish(digits / "int8.tflite", "digits", "1.1.0", json.loads((digits / "card.json").read_text()))
    store = open_store(home / "fleet.db")
    try:
        assert store.last_repo_commit().versions["timestamp"] == 2  # type: ignore[union-attr]
    finally:
        store.close()

    assert [r["version"] for r in ok_json("release", "list", "--home", home)] == ["1.0.0", "1.1.0"]
    report = ok_json("release", "verify", "--home", home)
    assert (report["ok"], report["versions"]["timestamp"], report["recorded"]["versions"]["timestamp"]) == (True, 3, 2)

    assert fleet("release", "revoke", "digits:1.0.0", "--home", home).exit_code == 0
    report = ok_json("release", "verify", "--home", home)
    assert report["recorded"]["versions"] == report["versions"] == {"root": 1, "timestamp": 4, "snapshot": 4,
                                                                    "targets": 4}  # fmt: skip


def test_a_versioned_file_left_by_a_change_that_never_committed_is_moved_aside_not_overwritten(
    home: Path, digits: Path
) -> None:
    metadata = home / "repo" / "metadata"
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    leftover = (metadata / "2.targets.json").read_bytes().replace(b'"version":2}', b'"version":3}')
    (metadata / "3.targets.json").write_bytes(leftover)  # signed by nothing, named by nothing

    listed = fleet("release", "verify", "--home", home)
    assert listed.exit_code == 0, listed.output
    assert "note orphan: 3.targets.json: is above the committed version" in listed.stdout

    publish(home, digits / "int8.tflite", "digits:1.1.0")
    aside = list((metadata / ".orphaned").iterdir())
    assert [p.read_bytes() for p in aside] == [leftover]
    assert aside[0].name.startswith("3.targets.json.")
    assert (metadata / "3.targets.json").read_bytes() != leftover
    report = ok_json("release", "verify", "--home", home)
    assert (report["ok"], report["findings"], report["versions"]["targets"]) == (True, [], 3)


def test_a_versioned_file_that_appears_during_a_change_is_refused_not_replaced(home: Path, digits: Path) -> None:
    """Someone writes 2.targets.json while a publish (which holds repo/.lock) copies its model in."""
    target = home / "repo" / "metadata" / "2.targets.json"
    repo = Repository(home)
    card = json.loads((digits / "card.json").read_text())
    with pytest.raises(RepositoryError) as err:
        repo.publish(digits / "int8.onnx", "digits", "1.0.0", card, progress=lambda n: target.write_bytes(b"{}"))
    assert err.value.reason == "metadata_exists"
    assert f"{target} already exists" in err.value.message()
    assert target.read_bytes() == b"{}"
    assert repo.releases() == []  # nothing committed
    assert not (home / "repo" / "targets" / "models" / "digits").exists()


def test_a_root_file_beside_the_trusted_root_that_is_not_it_is_found(home: Path) -> None:
    metadata = home / "repo" / "metadata"
    shutil.copy(metadata / "1.root.json", metadata / "2.root.json")
    found = json.loads(fleet("release", "verify", "--json", "--home", home).stdout)
    assert {(f["reason"], f["file"]) for f in found["findings"]} == {
        ("root_chain", "2.root.json"), ("version_mismatch", "2.root.json"),
    }  # fmt: skip
    refused(fleet("release", "list", "--home", home), "2.root.json: is newer than root.json (v1)")


def test_verify_passes_a_consistent_repository_and_has_help(home: Path, digits: Path) -> None:
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    result = fleet("release", "verify", "--home", home)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "repository history consistent: root v1, timestamp v2, snapshot v2, targets v2; 5 versioned files; "
        "fleet record: timestamp v2"
    )
    assert "repository history consistent" in fleet("audit", "--verify", "--home", home).stdout
    assert "Usage:" in fleet("release", "verify", "--help").stdout


def test_a_snapshot_in_the_history_naming_an_older_targets_version_is_a_rollback(home: Path, digits: Path) -> None:
    """Even signed with the snapshot key: versions only go up along the history. Loads check the committed chain
    only, so `release list` still answers; the whole-history check (verify, `fleet serve`'s start) refuses."""
    metadata = home / "repo" / "metadata"
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    publish(home, digits / "int8.tflite", "digits:1.1.0")
    assert fleet("release", "revoke", "digits:1.0.0", "--home", home).exit_code == 0
    first = Metadata.from_bytes((metadata / "1.snapshot.json").read_bytes()).signed.meta["targets.json"]
    third = Metadata.from_bytes((metadata / "3.snapshot.json").read_bytes())
    third.signed.meta["targets.json"] = first
    third.sign(Repository(home).keys.signer("snapshot"))
    (metadata / "3.snapshot.json").write_bytes(third.to_bytes())

    assert fleet("release", "list", "--home", home).exit_code == 0
    found = json.loads(fleet("release", "verify", "--json", "--home", home).stdout)
    assert [(f["reason"], f["file"]) for f in found["findings"]] == [("rollback", "3.snapshot.json")]
    assert found["findings"][0]["detail"] == "names targets v1, below v2 that 2.snapshot.json names"
