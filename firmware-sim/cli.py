"""`firmware-sim`: run simulated fleets of real agents against a real broker."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from agent import __version__, protocol
from agent import logs as agent_logs
from agent.broker_address import BrokerAddress
from firmware_sim import fdlimit, rundirs
from firmware_sim.drift import KINDS as DRIFT_KINDS
from firmware_sim.drift import Drift
from fleet.examples.modelgen import VARIANTS

if TYPE_CHECKING:
    from agent.config import UpdateConfig
    from firmware_sim.simulator import SimSettings, Simulation

#: Exit status of `firmware-sim run` when no device reached the broker in the whole run.
EXIT_UNREACHABLE = 3


def default_model_dir() -> Path:
    return Path.home() / ".cache" / "edgefleet" / "models"


def ensure_model(model_dir: Path, variant: str, seed: int) -> Path:
    """Build the example model once and reuse it: training is the slow part of starting a simulation."""
    out = model_dir / f"{variant}-{seed}"
    if not (out / "card.json").exists():
        from fleet.examples.modelgen import build_example

        click.echo(f"building the {variant!r} digits model in {out} ...", err=True)
        build_example(out, variant=variant, seed=seed)
    return out


def check_broker(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse a URL the devices could not use before anything is built (the agent's own parser decides)."""
    if value is None:
        return None
    try:
        BrokerAddress.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def check_drifts(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[Drift, ...]:
    try:
        return tuple(Drift.parse(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def check_id_prefix(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not protocol.valid_device_id(f"{value}-0000"):
        raise click.BadParameter(f"device ids must match {protocol.DEVICE_ID_PATTERN}, and {value}-0000 does not")
    return value


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """While the block runs, a first SIGINT (Ctrl-C) or SIGTERM sets the event it yields, so the run ends early and
    still delivers and reports its windows; a second one interrupts at once."""
    stop = threading.Event()

    def ask(_signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("firmware-sim: ending the run early; Ctrl-C again to abort without the report", err=True)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def set_up(settings: SimSettings) -> Simulation:
    """Set the devices up, with a progress bar on a terminal; what keeps them from being set up is one line."""
    from agent import runtime
    from firmware_sim.simulator import Simulation

    n = settings.devices
    try:
        with click.progressbar(
            length=n, label=f"setting up {n} devices", file=sys.stderr, hidden=not sys.stderr.isatty()
        ) as bar:
            return Simulation(settings, progress=bar.update)
    except OSError as exc:
        raise click.ClickException(f"cannot set up the devices' state: {exc}") from None
    except (runtime.ModelNotFound, runtime.CorruptModel) as exc:
        raise click.ClickException(
            f"the cached model {settings.model_dir / settings.model_file} does not load ({type(exc).__name__}): "
            f"delete {settings.model_dir} and the next run builds it again"
        ) from None
    except runtime.RuntimeLayerError as exc:
        raise click.ClickException(str(exc)) from None


def exit_status(report: dict[str, Any], broker: str) -> int:
    """0 when the fleet acknowledged every window, 1 when not, 3 when no device reached the broker (said on stderr)."""
    never = sum(1 for d in report["devices"] if d["connects"] == 0)
    if never == len(report["devices"]):
        click.echo(
            f"firmware-sim: the broker at {broker} was unreachable: no device could connect in "
            f"{report['elapsed_s']} s (is it running, and is the URL right?)",
            err=True,
        )
        return EXIT_UNREACHABLE
    if never:
        click.echo(f"firmware-sim: {never} of {len(report['devices'])} devices never connected to {broker}", err=True)
    totals = report["totals"]
    return 0 if totals["windows_produced"] == totals["windows_acked"] else 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="firmware-sim")
def main() -> None:
    """Simulate fleets of edge devices running the real agent, with faults and drift injected."""


@main.command()
@click.option("--devices", "-n", type=click.IntRange(1, 5000), default=10, show_default=True, help="Devices.")
@click.option("--broker", callback=check_broker, help="Broker URL, e.g. mqtt://127.0.0.1:1883 (--enroll: the fleet's).")
@click.option("--duration", type=click.FloatRange(0, None), default=30, show_default=True, help="Seconds to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same run.")
@click.option("--window", type=click.FloatRange(1, 3600), default=60, show_default=True, help="Telemetry window, s.")
@click.option("--rate", type=click.FloatRange(0.01, 1000), default=2, show_default=True, help="Inferences/s/device.")
@click.option(
    "--feedback",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of predictions whose true label each device sends back (feeds accuracy telemetry).",
)
@click.option(
    "--variant", type=click.Choice(VARIANTS), default="good", show_default=True, help="Example model every device runs."
)
@click.option("--runtime", "runtime_name", type=click.Choice(["onnx", "tflite"]), default="onnx", show_default=True)
@click.option("--state-dir", type=click.Path(path_type=Path), help="Device state folders (default: a temp dir).")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Model cache (default ~/.cache/edgefleet/models).")
@click.option("--prefix", default="edgefleet/v1", show_default=True, help="MQTT topic prefix.")
@click.option(
    "--id-prefix",
    default="sim",
    callback=check_id_prefix,
    show_default=True,
    help="Device ids are ID_PREFIX-0000, ID_PREFIX-0001, ...: runs sharing a broker at once need different ones.",
)
@click.option(
    "--drift",
    "drifts",
    multiple=True,
    metavar="KIND:SIZE[@START_S]",
    callback=check_drifts,
    help=f"Sensor drift on every device, SIZE 0..1, from START_S s into the run; repeat for more. KIND: "
    f"{', '.join(DRIFT_KINDS)}.",
)
@click.option(
    "--enroll",
    is_flag=True,
    help="Enroll every device with the `fleet serve` of --home (fleet enroll's bundle each): they install what "
    "`fleet assign` gives them, through the agent's own update path.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --enroll: a tag every device is enrolled with (hw=pi4, ...); repeat for more.",
)
@click.option(
    "--sites",
    type=click.IntRange(1, 10_000),
    help="With --enroll: spread the devices over this many sites, tagged site=site-0, site-1, ... in turn.",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet home to enroll with (default $EDGEFLEET_HOME, else ~/.edgefleet).",
)
@click.option(
    "--shards",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Split the fleet over this many processes (one per core suits large fleets).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the per-device report as JSON.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
)
def run(
    devices: int,
    broker: str,
    duration: float,
    seed: int,
    window: float,
    rate: float,
    feedback: float,
    drifts: tuple[Drift, ...],
    variant: str,
    runtime_name: str,
    state_dir: Path | None,
    model_dir: Path | None,
    prefix: str,
    id_prefix: str,
    enroll: bool,
    tags: tuple[str, ...],
    sites: int | None,
    home: Path | None,
    shards: int,
    as_json: bool,
    log_level: str,
) -> None:
    """Run N simulated devices for a while, then report what each produced and the fleet acknowledged.

    A window counts as acknowledged once the fleet's ingest stored it (its ack, not the broker's), so run a fleet
    (`fleet serve`) on the broker. Exit status: 0 when the fleet acknowledged every window, 1 when it did not (or the
    run could not start), 2 on a usage error, 3 when no device could reach the broker. Ctrl-C or SIGTERM ends the
    run early, with its report.

    With --enroll each device is enrolled with the running `fleet serve` (on its broker, with its repository) and
    runs the whole update path of `edge-agent run`; `fleet devices list` shows them and `fleet assign` reaches them.
    """
    from firmware_sim.enrollment import EnrollError, enroll_devices
    from firmware_sim.simulator import SimSettings, device_ids

    if broker is None and not enroll:
        raise click.UsageError("pass --broker URL, or --enroll to use the broker of the running `fleet serve`")
    try:
        fdlimit.ensure_open_files(devices)
    except fdlimit.TooManyDevices as exc:
        raise click.ClickException(str(exc)) from None
    agent_logs.setup(log_level)
    models = ensure_model(model_dir or default_model_dir(), variant, seed)
    with ExitStack() as stack:
        try:
            root = state_dir or stack.enter_context(rundirs.run_folder())
        except OSError as exc:
            raise click.ClickException(f"cannot make a temporary folder for the devices: {exc}") from None
        updates: dict[str, UpdateConfig] = {}
        if enroll:
            ids = device_ids(id_prefix, devices)
            try:
                broker, prefix, updates = enroll_devices(home, ids, root, tags, sites)
            except EnrollError as exc:
                raise click.ClickException(exc.detail) from None
        assert broker is not None
        settings = SimSettings(
            devices=devices,
            broker=broker,
            state_root=root,
            model_dir=models,
            duration_s=duration,
            seed=seed,
            window_s=window,
            rate_hz=rate,
            prefix=prefix,
            model_file="int8.tflite" if runtime_name == "tflite" else "int8.onnx",
            release=f"digits:{variant}",
            id_prefix=id_prefix,
            updates=updates,
            feedback_share=feedback,
            drifts=drifts,
        )
        if shards > 1:
            from firmware_sim.shards import run_sharded

            with stop_on_signals() as stop:
                report = run_sharded(settings, shards, stop)
        else:
            simulation = set_up(settings)
            with stop_on_signals() as stop:
                report = simulation.run(until=stop.is_set)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        t = report["totals"]
        click.echo(
            f"{len(report['devices'])} devices, {report['elapsed_s']} s: {t['inferences']} inferences, "
            f"{t['windows_produced']} windows produced, {t['windows_acked']} acknowledged, "
            f"{t['windows_dropped']} dropped" + (f", {t['labelled']} predictions labelled" if feedback else "")
        )
    sys.exit(exit_status(report, broker))
