"""`firmware-sim`: run simulated fleets of real agents against a real broker."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from agent import __version__
from agent import logs as agent_logs


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="firmware-sim")
def main() -> None:
    """Simulate fleets of edge devices running the real agent, with faults and drift injected."""


@main.command()
@click.option("--devices", "-n", type=click.IntRange(1, 5000), default=10, show_default=True, help="Devices.")
@click.option("--broker", required=True, help="Broker URL, e.g. mqtt://127.0.0.1:1883.")
@click.option("--duration", type=click.FloatRange(0, None), default=30, show_default=True, help="Seconds to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same run.")
@click.option("--window", type=click.FloatRange(1, 3600), default=60, show_default=True, help="Telemetry window, s.")
@click.option("--rate", type=click.FloatRange(0.01, 1000), default=2, show_default=True, help="Inferences/s/device.")
@click.option("--variant", default="good", show_default=True, help="Example model variant every device runs.")
@click.option("--runtime", "runtime_name", type=click.Choice(["onnx", "tflite"]), default="onnx", show_default=True)
@click.option("--state-dir", type=click.Path(path_type=Path), help="Device state folders (default: a temp dir).")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Model cache (default ~/.cache/edgefleet/models).")
@click.option("--prefix", default="edgefleet/v1", show_default=True, help="MQTT topic prefix.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-device report as JSON.")
@click.option("--log-level", default="WARNING", show_default=True)
def run(
    devices: int,
    broker: str,
    duration: float,
    seed: int,
    window: float,
    rate: float,
    variant: str,
    runtime_name: str,
    state_dir: Path | None,
    model_dir: Path | None,
    prefix: str,
    as_json: bool,
    log_level: str,
) -> None:
    """Run N simulated devices for a while, then report what each produced and the broker acknowledged."""
    from firmware_sim.simulator import SimSettings, Simulation

    agent_logs.setup(log_level)
    models = ensure_model(model_dir or default_model_dir(), variant, seed)
    with tempfile.TemporaryDirectory(prefix="firmware-sim-") as tmp:
        settings = SimSettings(
            devices=devices,
            broker=broker,
            state_root=state_dir or Path(tmp),
            model_dir=models,
            duration_s=duration,
            seed=seed,
            window_s=window,
            rate_hz=rate,
            prefix=prefix,
            model_file="int8.tflite" if runtime_name == "tflite" else "int8.onnx",
            release=f"digits:{variant}",
        )
        report = Simulation(settings).run()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        t = report["totals"]
        click.echo(
            f"{len(report['devices'])} devices, {report['elapsed_s']} s: {t['inferences']} inferences, "
            f"{t['windows_produced']} windows produced, {t['windows_acked']} acknowledged, "
            f"{t['windows_dropped']} dropped"
        )
    lost = report["totals"]["windows_produced"] - report["totals"]["windows_acked"]
    sys.exit(0 if lost == 0 else 1)
