"""`fleet release publish|list|show|revoke`: model releases as signed TUF targets, and `fleet audit`.

A publish or revoke that fails changes nothing: the repository commits by one rename, after every check. Each change
that succeeds is written to the store's hash-chained audit log.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from agent.canonical import strict_json
from agent.runtime import RuntimeLayerError, RuntimeNotInstalled, load_model
from agent.targets import RUNTIME_BY_SUFFIX
from fleet.cli.common import (
    NotFound,
    ReleaseRef,
    actor,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
)
from fleet.trust.repository import ReleaseError, Repository, RepositoryError

T = TypeVar("T")

#: How to fix each refused publish or revoke (``ReleaseError.reason``); the error's own detail says what was wrong.
_FIXES = {
    "duplicate": "publish under a new --version; released versions never change",
    "unsupported_runtime": "export the model as .onnx or .tflite",
    "bad_filename": "rename the model file to letters, digits and _.+-",
    "bad_file": "pass a regular model file",
    "empty_file": "pass the real model file; this one is empty",
    "too_large": "shrink the model, or raise max_target_bytes in <home>/repo/config.json",
    "bad_name": "choose another --name",
    "bad_version": "choose another --version",
    "bad_card": "fix the card (it needs input, output, drift, smoke_test and provenance objects)",
    "card_mismatch": "the card lists another sha256 for this file: pass the card made with this model file",
    "bad_hardware": "pass machine names like aarch64, armv7l, x86_64",
}


def release_error(exc: ReleaseError) -> click.ClickException:
    """A refused change as a CLI error: unknown releases exit 3, everything else 1, each with its fix."""
    if exc.reason == "unknown_release":
        return NotFound(f"unknown release {exc.detail}: see `fleet release list`")
    fix = _FIXES.get(exc.reason)
    return click.ClickException(f"{exc}{f'; {fix}' if fix else ''}. Nothing was changed.")


def _key_error(exc: OSError) -> click.ClickException:
    return click.ClickException(f"{exc}: restore the key file from your backup. Nothing was changed.")


def _load_card(path: Path) -> dict[str, Any]:
    try:
        card = strict_json(path.read_bytes())
    except FileNotFoundError:
        raise click.ClickException(
            f"no model card at {path}: pass --card PATH (card.json from `fleet model example` is one)"
        ) from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the card {path}: {exc}") from None
    if not isinstance(card, dict):
        raise click.ClickException(f"the card {path} is not a JSON object")
    return card


def _check_loads(model_file: Path, runtime: str) -> None:
    """Open the model with the runtime devices will use, so a damaged file is refused here, not on every device.

    A fleet host without that runtime (LiteRT is an extra) skips the check with a warning: the device's smoke test
    still runs before any switch.
    """
    try:
        with load_model(model_file, runtime=runtime):
            pass
    except RuntimeNotInstalled as exc:
        click.echo(f"warning: not checked that {model_file.name} loads: {exc}", err=True)
    except RuntimeLayerError as exc:
        raise click.ClickException(
            f"{model_file} does not load with {runtime}; export the model again. Nothing was changed. ({exc})"
        ) from None


@click.group()
def release() -> None:
    """Publish, list, show and revoke signed model releases."""


@release.command()
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name; devices run one release per name.")
@click.option("--version", "version", required=True, help="Release version; each version is published once.")
@click.option(
    "--card",
    "card_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model card JSON (I/O schema, drift reference, smoke test, provenance). [default: card.json beside the model]",
)
@click.option(
    "--machine",
    "machines",
    multiple=True,
    help="A machine (platform.machine()) the release is for; repeat for several. [default: aarch64, armv7l, x86_64]",
)
@click.option("--source-commit", help="Source commit of the model, added to the signed provenance.")
@home_option
@json_option
def publish(
    model_file: Path,
    name: str,
    version: str,
    card_path: Path | None,
    machines: tuple[str, ...],
    source_commit: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Publish MODEL_FILE (.onnx or .tflite) as release NAME:VERSION, signed with the targets key.

    The file must load with its runtime; devices see the release on their next TUF refresh. Exit 1 if refused
    (nothing is changed then).
    """
    card = _load_card(card_path or model_file.parent / "card.json")
    runtime = RUNTIME_BY_SUFFIX.get(model_file.suffix)
    if runtime is not None:  # the repository refuses other suffixes with its own error
        _check_loads(model_file, runtime)
    with contextlib.closing(open_store(home)) as store:
        repo = open_repository(home)
        hardware = {"machines": list(machines)} if machines else None
        try:
            info = repo.publish(model_file, name, version, card, hardware=hardware, source_commit=source_commit)
        except ReleaseError as exc:
            raise release_error(exc) from None
        except (FileNotFoundError, PermissionError) as exc:
            raise _key_error(exc) from None
        except RepositoryError as exc:
            raise click.ClickException(str(exc)) from None
        detail = {k: getattr(info, k) for k in ("release", "target", "sha256", "length", "runtime")}
        store.append_audit(actor(), "publish", f"{name}:{version}", detail)
    if as_json:
        echo_json(info.as_dict())
        return
    click.echo(f"published {name}:{version} as release {info.release} of {name} ({info.runtime}, {info.length} bytes)")
    click.echo(f"  target {info.target}  sha256 {info.sha256}")


@release.command("list")
@home_option
@json_option
def list_releases(home: Path | None, as_json: bool) -> None:
    """List every release, by model then release counter; revoked ones are marked."""
    releases = _read(open_repository(home), Repository.releases)
    if as_json:
        echo_json(releases)
        return
    table = Table("release", "counter", "runtime", "bytes", "sha256", "revoked")
    for r in releases:
        table.add_row(
            f"{r['name']}:{r['version']}",
            str(r["release"]),
            r["runtime"],
            str(r["length"]),
            r["sha256"][:16],
            "yes" if r["revoked"] else "",
        )
    Console().print(table)


@release.command()
@click.argument("ref", metavar="NAME:VERSION", type=ReleaseRef())
@home_option
@json_option
def show(ref: tuple[str, str], home: Path | None, as_json: bool) -> None:
    """Show one release: target, hash, counters, hardware and its signed model card. Exit code 3 if unknown."""
    info = _read(open_repository(home), Repository.release, *ref)
    if as_json:
        echo_json(info)
        return
    fields = Table.grid(padding=(0, 2))
    for key in ("name", "version", "release", "min_release", "revoked", "runtime", "target", "sha256", "length"):
        fields.add_row(key, str(info[key]))
    fields.add_row("machines", ", ".join(info["hardware"]["machines"]))
    card = info["card"]
    fields.add_row("summary", str(card.get("summary", "-")))
    fields.add_row("provenance", json.dumps(card.get("provenance"), sort_keys=True, separators=(",", ":")))
    Console().print(fields)


@release.command()
@click.argument("ref", metavar="NAME:VERSION", type=ReleaseRef())
@home_option
@json_option
def revoke(ref: tuple[str, str], home: Path | None, as_json: bool) -> None:
    """Revoke NAME:VERSION and every older release of the model: devices refuse them from their next refresh.

    Raises the model's signed min_release above this release. Revoking a revoked release changes nothing. Exit code
    3 if the release is unknown.
    """
    name, version = ref
    with contextlib.closing(open_store(home)) as store:
        repo = open_repository(home)
        before = _read(repo, Repository.release, name, version)["min_release"]
        try:
            info = repo.revoke(name, version)
        except ReleaseError as exc:
            raise release_error(exc) from None
        except (FileNotFoundError, PermissionError) as exc:
            raise _key_error(exc) from None
        changed = info.min_release != before
        if changed:
            store.append_audit(actor(), "revoke", f"{name}:{version}", {"min_release": info.min_release})
    if as_json:
        echo_json({**info.as_dict(), "changed": changed})
        return
    state = "revoked" if changed else "was already revoked"
    click.echo(f"{name}:{version} {state}: {name} releases below {info.min_release} are refused by devices")


def _read(repo: Repository, method: Callable[..., T], *args: str) -> T:
    """Run a repository read, turning its errors into CLI errors."""
    try:
        return method(repo, *args)
    except ReleaseError as exc:
        raise release_error(exc) from None
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from None
