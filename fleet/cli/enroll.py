"""`fleet enroll`: the folder a device needs to join the fleet.

``agent.toml`` (identity, broker, update source), ``root.json`` (the TUF root the device trusts first) and
``director.pub.json`` (the key its desired state must be signed with), plus a factory model if asked. Everything in
it is public (the trust anchors are public keys), so files are 0644: an integrator copies the folder to
/etc/edge-agent/ on the device. Paths inside agent.toml are relative to it, so the folder moves as a whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from agent import protocol
from agent.broker_address import BrokerAddress
from agent.canonical import strict_json
from agent.files import PUBLIC_FILE_MODE, write_atomic
from agent.targets import safe_component
from agent.update.desired import load_director_key
from fleet.cli.common import (
    actor,
    echo_json,
    home_option,
    json_option,
    open_repository,
    open_store,
    running_serve,
    validate_broker,
)
from fleet.trust.repository import Repository

_DIR_MODE = 0o755
DEFAULT_STATE_DIR = "/var/lib/edge-agent"


def _device_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not protocol.valid_device_id(value):
        raise click.BadParameter(f"{value!r} is not a device id ({protocol.DEVICE_ID_PATTERN})")
    return value


def _repo_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    parts = urlsplit(value or "")
    if value is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


def _toml_string(text: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, except that TOML also wants DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(comment: str, config: dict[str, Any]) -> str:
    """Write agent.toml from plain tables of strings; checked by reading it back, so it is never written wrong."""
    lines = [f"# {line}" for line in comment.splitlines()]
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((f"[{key}]", value))
        elif isinstance(value, list):
            tables.extend((f"[[{key}]]", item) for item in value)
        else:
            lines.append(f"{key} = {_toml_string(value)}")
    for header, table in tables:
        lines += ["", header, *(f"{k} = {_toml_string(v)}" for k, v in table.items())]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != config:
        raise AssertionError("agent.toml does not read back as written")
    return text


def _factory_model(repo: Repository, model_dir: Path, model_file: str, out_dir: Path) -> dict[str, str]:
    """Copy the model and its card into the bundle; its [[models]] entry names the published release it is."""
    if not safe_component(model_file):
        raise click.BadParameter(f"{model_file!r} is not a file name in --model-dir", param_hint="--model-file")
    source = model_dir / model_file
    try:
        card = strict_json((model_dir / "card.json").read_bytes())
        data = source.read_bytes()
    except (OSError, ValueError) as exc:
        raise click.ClickException(
            f"cannot read the factory model: {exc}; --model-dir needs the file and card.json"
        ) from None
    sha256 = hashlib.sha256(data).hexdigest()
    published = [r for r in repo.releases() if r["sha256"] == sha256]
    if published:
        newest = published[-1]
        name, release = newest["name"], f"{newest['name']}:{newest['version']}"
        if newest["revoked"]:
            click.echo(
                f"warning: the factory model is {release}, which is revoked: assign the device a newer one", err=True
            )
    else:
        name, release = str(card.get("name", "")) if isinstance(card, dict) else "", ""
        click.echo(
            f"warning: {source} is not a published release: the device reports no release for it until its first "
            "update (publish it with `fleet release publish` and enroll again to fix)",
            err=True,
        )
    if not safe_component(name):
        raise click.ClickException(f"cannot name the factory model from {model_dir}: its card needs a model name")
    folder = out_dir / "models" / name
    folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    write_atomic(folder / model_file, data)
    shutil.copyfile(model_dir / "card.json", folder / "card.json")
    (folder / "card.json").chmod(PUBLIC_FILE_MODE)
    return {
        "name": name,
        "path": f"models/{name}/{model_file}",
        "card": f"models/{name}/card.json",
        "release": release,
    }


def _local_only(url: str) -> bool:
    """True for loopback and wildcard hosts (what `fleet serve` listens on), which no other machine can dial."""
    host = urlsplit(url).hostname or ""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_unspecified
    return host == "localhost"


@click.command()
@click.argument("device_id", metavar="DEVICE", callback=_device_id)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    callback=validate_broker,
    help="Broker the device connects to. [default: the running `fleet serve`'s]",
)
@click.option(
    "--repo-url",
    metavar="URL",
    callback=_repo_url,
    help="Release repository the device downloads from. [default: the running `fleet serve`'s]",
)
@click.option("--prefix", help="Topic prefix. [default: the running `fleet serve`'s, else edgefleet/v1]")
@click.option(
    "--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="The agent's state folder on the device."
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with a factory model and its card.json, copied into the bundle so the device starts with a model.",
)
@click.option("--model-file", default="int8.onnx", show_default=True, help="Which file of --model-dir is the model.")
@click.option("--force", is_flag=True, help="Overwrite an existing bundle in --out.")
@home_option
@json_option
def enroll(
    device_id: str,
    out_dir: Path,
    broker_url: str | None,
    repo_url: str | None,
    prefix: str | None,
    state_dir: str,
    model_dir: Path | None,
    model_file: str,
    force: bool,
    home: Path | None,
    as_json: bool,
) -> None:
    """Write the bundle DEVICE needs to join the fleet into --out: agent.toml, root.json and director.pub.json.

    The broker and repository URLs default to those of the running `fleet serve`; give reachable addresses when
    the device is another machine. Exit 1 if --out already holds a bundle (unless --force) or nothing says where the
    broker or repository is.
    """
    running = running_serve(home) or {}
    broker_url = broker_url or running.get("broker")
    repo_url = repo_url or running.get("repo")
    if broker_url is None or repo_url is None:
        raise click.ClickException("no broker or repository URL: start `fleet serve`, or pass --broker and --repo-url")
    if (out_dir / "agent.toml").exists() and not force:
        raise click.ClickException(f"{out_dir / 'agent.toml'} exists: pass --force to overwrite it")
    for url in (broker_url, repo_url):
        if _local_only(url):
            click.echo(
                f"note: only a device on this machine reaches {url}; pass --broker/--repo-url for others", err=True
            )
    with contextlib.closing(open_store(home)) as store:
        repo = open_repository(home)
        try:
            director = repo.keys.public_key_json("director")
        except (FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(f"{exc}: restore keys/director-1.pem from your backup") from None
        root = repo.trusted_root()
        out_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        config: dict[str, Any] = {
            "device_id": device_id,
            "state_dir": state_dir,
            "mqtt": {
                "broker": BrokerAddress.parse(broker_url).url,
                "prefix": prefix or running.get("prefix") or protocol.DEFAULT_PREFIX,
            },
            "update": {"repo_url": repo_url, "trusted_root": "root.json", "director_key": "director.pub.json"},
        }
        if model_dir is not None:
            config["models"] = [_factory_model(repo, model_dir, model_file, out_dir)]
        comment = (
            f"edge-agent configuration for {device_id}, written by `fleet enroll`.\nPaths are relative to this file."
        )
        write_atomic(out_dir / "root.json", root)
        write_atomic(out_dir / "director.pub.json", director)
        write_atomic(out_dir / "agent.toml", _toml(comment, config).encode())
        summary = {
            "device_id": device_id,
            "out": str(out_dir),
            "broker": config["mqtt"]["broker"],
            "repo_url": repo_url,
            "trusted_root_sha256": hashlib.sha256(root).hexdigest(),
            "director_keyid": load_director_key(director).keyid,
            "models": {m["name"]: m["release"] for m in config.get("models", [])},
        }
        store.append_audit(actor(), "enroll", device_id, {k: v for k, v in summary.items() if k != "out"})
    if as_json:
        echo_json({**summary, "files": sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())})
        return
    click.echo(f"enrolled {device_id} in {out_dir}: agent.toml, root.json, director.pub.json")
    click.echo(f"  broker {summary['broker']}  repo {repo_url}")
    click.echo("  copy the folder to the device (e.g. /etc/edge-agent/) and run `edge-agent run --config agent.toml`")
