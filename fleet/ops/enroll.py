"""Enrolling a device: the folder it needs to join the fleet, and the fleet's record that it exists.

The bundle holds ``agent.toml`` (identity, broker, update source, optionally the local API address), ``root.json``
(the TUF root the device trusts first) and ``director.pub.json`` (the key its desired state must be signed with), plus
a factory model if asked. Everything in it is public (the trust anchors are public keys), so files are 0644: an
integrator copies the folder to /etc/edge-agent/ on the device. Paths inside agent.toml are relative to it, so the
folder moves as a whole. The enrollment is recorded with its audit entry, so `fleet assign` knows the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import protocol
from agent.broker_address import BrokerAddress
from agent.canonical import strict_json
from agent.config import parse_listen
from agent.files import PUBLIC_FILE_MODE, write_atomic
from agent.targets import safe_component
from agent.update.desired import load_director_key
from fleet.errors import FleetError, Invalid
from fleet.store.api import Store
from fleet.trust.repository import Repository
from fleet.views import release_ref

_DIR_MODE = 0o755
#: A tag is KEY=VALUE: a short lower-case key (site, hw, ring...), a value of safe characters.
_TAG_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_TAG_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
DEFAULT_STATE_DIR = "/var/lib/edge-agent"


@dataclass(frozen=True)
class BundleSettings:
    """Where the device finds the fleet and keeps its state; ``listen`` sets its local API address."""

    broker_url: str
    repo_url: str
    prefix: str = protocol.DEFAULT_PREFIX
    state_dir: str = DEFAULT_STATE_DIR
    listen: str | None = None
    model_dir: Path | None = None
    model_file: str = "int8.onnx"
    #: Tags the fleet selects devices by (site, hardware, ...), recorded with the enrollment: :func:`parse_tags`.
    tags: dict[str, str] = field(default_factory=dict)


def parse_tags(pairs: Sequence[str]) -> dict[str, str]:
    """``["site=berlin", "hw=pi4"]`` as a dict; :class:`~fleet.errors.Invalid` naming the first bad one."""
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and _TAG_KEY.fullmatch(key) and _TAG_VALUE.fullmatch(value)):
            raise Invalid("bad_tag", f"{pair[:80]!r} is not a tag",
                          "write KEY=VALUE: a lower-case key of up to 32 of [a-z0-9_.-], a value of up to 64 of "
                          "[A-Za-z0-9_.:-]")  # fmt: skip
        if key in tags and tags[key] != value:
            raise Invalid("bad_tag", f"tag {key} is given twice ({tags[key]}, {value})", "give each key once")
        tags[key] = value
    return tags


@dataclass(frozen=True)
class Enrollment:
    """What was written: the summary that was audited, the bundle's files and warnings for the operator."""

    summary: dict[str, Any]
    files: list[str]
    warnings: list[str] = field(default_factory=list)


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


def _factory_model(
    repo: Repository, model_dir: Path, model_file: str, out_dir: Path, warnings: list[str]
) -> dict[str, str]:
    """Copy the model and its card into the bundle; its [[models]] entry names the published release it is."""
    if not safe_component(model_file):
        raise Invalid("bad_model_file", f"{model_file!r} is not a file name in --model-dir", "pass --model-file NAME")
    source = model_dir / model_file
    try:
        card = strict_json((model_dir / "card.json").read_bytes())
        data = source.read_bytes()
    except (OSError, ValueError) as exc:
        raise FleetError(
            "bad_factory_model", f"cannot read the factory model: {exc}", "--model-dir needs the file and card.json"
        ) from None
    sha256 = hashlib.sha256(data).hexdigest()
    published = [r for r in repo.releases() if r["sha256"] == sha256]
    if published:
        newest = published[-1]
        name, release = newest["name"], release_ref(newest["name"], newest["version"])
        if newest["revoked"]:
            warnings.append(f"the factory model is {release}, which is revoked: assign the device a newer one")
    else:
        name, release = str(card.get("name", "")) if isinstance(card, dict) else "", ""
        warnings.append(
            f"{source} is not a published release: the device reports no release for it until its first update "
            "(publish it with `fleet release publish` and enroll again to fix)"
        )
    if not safe_component(name):
        raise FleetError(
            "bad_factory_model", f"cannot name the factory model from {model_dir}", "its card needs a model name"
        )
    folder = out_dir / "models" / name
    folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    write_atomic(folder / model_file, data)
    shutil.copyfile(model_dir / "card.json", folder / "card.json")
    (folder / "card.json").chmod(PUBLIC_FILE_MODE)
    return {"name": name, "path": f"models/{name}/{model_file}", "card": f"models/{name}/card.json", "release": release}


def local_only(url: str) -> bool:
    """True for loopback and wildcard hosts (what `fleet serve` listens on), which no other machine can dial."""
    host = urlsplit(url).hostname or ""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_unspecified
    return host == "localhost"


def enroll(
    store: Store,
    repo: Repository,
    device_id: str,
    out_dir: Path,
    settings: BundleSettings,
    *,
    actor: str,
    force: bool = False,
) -> Enrollment:
    """Write the bundle ``device_id`` needs into ``out_dir`` and record the enrollment (audited).

    Refuses a bad device id, an existing bundle (unless ``force``) and a bad ``listen`` address before writing.
    """
    if not protocol.valid_device_id(device_id):
        raise Invalid("bad_device_id", f"{device_id!r} is not a device id", f"use {protocol.DEVICE_ID_PATTERN}")
    if settings.listen is not None:
        try:
            parse_listen(settings.listen)
        except ValueError as exc:
            raise Invalid("bad_listen", str(exc), "pass --listen HOST:PORT or unix:/absolute/path") from None
    if (out_dir / "agent.toml").exists() and not force:
        raise FleetError("bundle_exists", f"{out_dir / 'agent.toml'} exists", "pass --force to overwrite it")
    warnings = [
        f"only a device on this machine reaches {url}; pass --broker/--repo-url for others"
        for url in (settings.broker_url, settings.repo_url)
        if local_only(url)
    ]
    try:
        director = repo.keys.public_key_json("director")
    except (FileNotFoundError, PermissionError) as exc:
        raise FleetError("key_missing", str(exc), "restore keys/director-1.pem from your backup") from None
    root = repo.trusted_root()
    out_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    config: dict[str, Any] = {
        "device_id": device_id,
        "state_dir": settings.state_dir,
        "mqtt": {"broker": BrokerAddress.parse(settings.broker_url).url, "prefix": settings.prefix},
        "update": {"repo_url": settings.repo_url, "trusted_root": "root.json", "director_key": "director.pub.json"},
    }
    if settings.listen is not None:
        config["api"] = {"listen": settings.listen}
    if settings.model_dir is not None:
        config["models"] = [_factory_model(repo, settings.model_dir, settings.model_file, out_dir, warnings)]
    comment = f"edge-agent configuration for {device_id}, written by `fleet enroll`.\nPaths are relative to this file."
    write_atomic(out_dir / "root.json", root)
    write_atomic(out_dir / "director.pub.json", director)
    write_atomic(out_dir / "agent.toml", _toml(comment, config).encode())
    summary = {
        "device_id": device_id,
        "out": str(out_dir),
        "broker": config["mqtt"]["broker"],
        "repo_url": settings.repo_url,
        "trusted_root_sha256": hashlib.sha256(root).hexdigest(),
        "director_keyid": load_director_key(director).keyid,
        "models": {m["name"]: m["release"] for m in config.get("models", [])},
        "tags": dict(settings.tags),
    }
    store.record_enrollment(device_id, actor, {k: v for k, v in summary.items() if k != "out"})
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return Enrollment(summary, files, warnings)
