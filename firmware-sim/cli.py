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
from click.core import ParameterSource

from agent import __version__, protocol
from agent import logs as agent_logs
from agent.broker_address import BrokerAddress
from firmware_sim import rundirs
from firmware_sim.drift import KINDS as DRIFT_KINDS
from firmware_sim.drift import Drift
from fleet.examples.modelgen import VARIANTS

if TYPE_CHECKING:
    from firmware_sim.scenario import Scenario
    from firmware_sim.simulator import SimSettings, Simulation

#: Exit status of `firmware-sim run` when no device reached the broker in the whole run.
EXIT_UNREACHABLE = 3


def default_model_dir() -> Path:
    return Path.home() / ".cache" / "edgefleet" / "models"


def ensure_model(out: Path, variant: str, seed: int) -> None:
    """Build the example model into ``out`` once and reuse it: training is the slow part of starting a simulation."""
    if not (out / "card.json").exists():
        from fleet.examples.modelgen import build_example

        click.echo(f"building the {variant!r} digits model in {out} ...", err=True)
        build_example(out, variant=variant, seed=seed)


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
    """0 when the fleet acknowledged every window it was owed, 1 when not, 3 when no device reached the broker (said
    on stderr). A device the scenario left silent at the end owes nothing."""
    from firmware_sim.runner import owed_windows_delivered

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
    return 0 if owed_windows_delivered(report) else 1


def load_scenario(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Scenario | None:
    """A scenario file, or the name of one that ships with the simulator (``site-drift``: scenarios/site-drift.toml)."""
    from firmware_sim.scenario import Scenario, ScenarioError, shipped

    if value is None:
        return None
    try:
        return Scenario.load(value if value.exists() or value.suffix else shipped(value.name))
    except ScenarioError as exc:
        raise click.BadParameter(str(exc)) from None


#: The options a scenario's ``[fleet]`` table sets when the command line does not: option name -> key.
SCENARIO_OPTIONS = {"devices": "devices", "seed": "seed", "duration": "duration", "rate": "rate", "window": "window",
                    "feedback": "feedback", "sites": "sites", "id_prefix": "id_prefix"}  # fmt: skip


def from_scenario(ctx: click.Context, scenario: Scenario | None) -> dict[str, Any]:
    """The run's options: the command line's where given, else the scenario's ``[fleet]``, else the defaults; tags
    are the scenario's plus the command line's."""
    values = dict(ctx.params)
    fleet = scenario.fleet if scenario else {}
    for option, key in SCENARIO_OPTIONS.items():
        if key in fleet and ctx.get_parameter_source(option) is not ParameterSource.COMMANDLINE:
            values[option] = fleet[key]
    values["tags"] = (*(f"{k}={v}" for k, v in fleet.get("tags", {}).items()), *values["tags"])
    return values


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
@click.option(
    "--scenario",
    type=click.Path(path_type=Path, dir_okay=False),
    callback=load_scenario,
    help="A scenario file (TOML: firmware-sim/scenarios/): the fleet, drift and faults on a schedule. Options given "
    "here win over its [fleet] settings.",
)
@click.option(
    "--start-broker",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Start a Mosquitto for the run on PORT (0: a free one) and print `broker: URL`; a scenario may restart it.",
)
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path, dir_okay=False, writable=True),
    help="Also write the JSON report (the ground truth beside what each device produced) to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the per-device report as JSON.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
)
@click.pass_context
def run(ctx: click.Context, **_options: Any) -> None:
    """Run N simulated devices for a while, then report what each produced and the fleet acknowledged.

    A window counts as acknowledged once the fleet's ingest stored it (its ack, not the broker's), so run a fleet
    (`fleet serve`) on the broker. Exit status: 0 when the fleet acknowledged every window it was owed, 1 when it
    did not (or the run could not start), 2 on a usage error, 3 when no device could reach the broker. Ctrl-C or
    SIGTERM ends the run early, with its report.

    With --enroll each device is enrolled with the running `fleet serve` (on its broker, with its repository) and
    runs the whole update path of `edge-agent run`; `fleet devices list` shows them and `fleet assign` reaches them.

    With --scenario the run follows a scenario file and its seed: drift and faults per device, per tag or
    fleet-wide; the report (--json, --report FILE) gives each device's ground truth beside what it produced.
    """
    from firmware_sim.runner import RunError, RunRequest, execute, prepare
    from firmware_sim.scenario import Scenario
    from firmware_sim.simulator import SimSettings

    o = from_scenario(ctx, ctx.params["scenario"])
    if o["broker"] is None and not o["enroll"] and o["start_broker"] is None:
        raise click.UsageError(
            "pass --broker URL, --enroll to use the broker of the running `fleet serve`, or --start-broker PORT"
        )
    agent_logs.setup(o["log_level"])
    models = (o["model_dir"] or default_model_dir()) / f"{o['variant']}-{o['seed']}"
    with ExitStack() as stack:
        try:
            root = o["state_dir"] or stack.enter_context(rundirs.run_folder())
        except OSError as exc:
            raise click.ClickException(f"cannot make a temporary folder for the devices: {exc}") from None
        settings = SimSettings(
            devices=o["devices"],
            broker=o["broker"] or "",
            state_root=root,
            model_dir=models,
            duration_s=o["duration"],
            seed=o["seed"],
            window_s=o["window"],
            rate_hz=o["rate"],
            prefix=o["prefix"],
            model_file="int8.tflite" if o["runtime_name"] == "tflite" else "int8.onnx",
            release=f"digits:{o['variant']}",
            id_prefix=o["id_prefix"],
            feedback_share=o["feedback"],
            drifts=o["drifts"],
        )
        request = RunRequest(settings, ctx.params["scenario"] or Scenario(), o["tags"], o["sites"], o["enroll"],
                             o["home"], o["start_broker"], o["shards"])  # fmt: skip
        try:
            plan = prepare(request)
        except RunError as exc:
            raise click.ClickException(exc.detail) from None
        ensure_model(models, o["variant"], o["seed"])
        with stop_on_signals() as stop:
            try:
                report = execute(
                    request,
                    plan,
                    simulate=lambda s, started: set_up(s).run(until=stop.is_set, on_start=started),
                    sharded=lambda s, k: run_sharded(s, k, stop),
                    announce=lambda line: click.echo(line, err=True),
                )
            except RunError as exc:
                raise click.ClickException(exc.detail) from None
    text = json.dumps(report, indent=2)
    if o["report_file"]:
        write_report(o["report_file"], text)
    if o["as_json"]:
        click.echo(text)
    else:
        t = report["totals"]
        click.echo(
            f"{len(report['devices'])} devices, {report['elapsed_s']} s: {t['inferences']} inferences, "
            f"{t['windows_produced']} windows produced, {t['windows_acked']} acknowledged, "
            f"{t['windows_dropped']} dropped" + (f", {t['labelled']} predictions labelled" if o["feedback"] else "")
        )
    sys.exit(exit_status(report, o["broker"] or "the run's broker"))


def run_sharded(settings: SimSettings, shards: int, stop: threading.Event) -> dict[str, Any]:
    from firmware_sim.shards import run_sharded as in_processes

    return in_processes(settings, shards, stop)


def write_report(path: Path, text: str) -> None:
    try:
        path.write_text(text + "\n")
    except OSError as exc:
        problem = f"cannot write the report to {path}: {exc.strerror}; pick another --report"
        raise click.ClickException(problem) from None
