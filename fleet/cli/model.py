"""``fleet model``: build the project's example models and run a model file through the agent's runtime layer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from fleet.examples.modelgen import VARIANTS


@click.group()
def model() -> None:
    """Build example models and try model files."""


@model.command(short_help="Build the digits example model (one variant) into a folder.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write float.onnx, int8.onnx, int8.tflite and card.json into (created if missing).",
)
@click.option(
    "--variant", type=click.Choice(VARIANTS), default="good", show_default=True, help="How the model behaves."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the train/test split and the training.")
@click.option("--json", "as_json", is_flag=True, help="Print the model card as JSON on stdout.")
def example(out_dir: Path, variant: str, seed: int, as_json: bool) -> None:
    """Train and export the digits example model (no download: the data ships with scikit-learn).

    Variants: good (the reference), better (a second good version), inaccurate (trained on shuffled labels),
    slow (accurate, far more work per row), broken (loads, then fails every inference). Progress goes to stderr.
    """
    from fleet.examples.modelgen import build_example

    started = time.perf_counter()
    try:
        card = build_example(out_dir, variant=variant, seed=seed, progress=lambda msg: click.echo(f"- {msg}", err=True))
    except OSError as exc:
        raise click.ClickException(f"cannot write the model into {out_dir}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(card, indent=1))
        return
    click.echo(
        f"{card['name']} {card['version']} ({variant}, seed {seed}) in {out_dir}, {time.perf_counter() - started:.1f} s"
    )
    click.echo(f"  {card['summary']}")
    for name, entry in card["files"].items():
        accuracy = "not measured (failed to run)" if entry["accuracy"] is None else f"accuracy {entry['accuracy']:.2%}"
        click.echo(f"  {name:<12} {entry['runtime']:<12} {entry['bytes']:>9,} bytes  {accuracy}")


@model.command(short_help="Run a model on held-out digits: accuracy and latency.")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Held-out digits to run [default: all].")
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Split whose held-out digits to use [default: the seed in card.json beside the model, else 0].",
)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(model_file: Path, samples: int | None, seed: int | None, threads: int, as_json: bool) -> None:
    """Run held-out digits one at a time through the agent's runtime layer; print accuracy and latency.

    The model must follow the digits contract (float32 [batch, 64] in, [batch, 10] probabilities out). Exits 1 if
    the model cannot be loaded or fails at inference.
    """
    from agent.runtime import RuntimeLayerError, load_model
    from fleet.examples.modelgen import digits_split

    if seed is None:
        seed = _card_seed(model_file.parent / "card.json")
    _, x_test, _, y_test = digits_split(seed)
    x_test, y_test = x_test[:samples], y_test[:samples]
    try:
        with load_model(model_file, threads=threads) as m:
            m.predict(x_test[:1])  # warm-up: first-run allocations are not inference latency
            latencies, predicted = [], []
            for row in x_test:
                start = time.perf_counter()
                out = m.predict(row[None, :])
                latencies.append(time.perf_counter() - start)
                predicted.append(int(out[0].argmax()))
            runtime = m.runtime
    except RuntimeLayerError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    ms = np.array(latencies) * 1000.0
    result = {
        "model": str(model_file),
        "runtime": runtime,
        "threads": threads,
        "seed": seed,
        "samples": len(y_test),
        "accuracy": round(float((np.array(predicted) == y_test).mean()), 4),
        "latency_ms": {
            "mean": round(float(ms.mean()), 4),
            "p50": round(float(np.percentile(ms, 50)), 4),
            "p95": round(float(np.percentile(ms, 95)), 4),
        },
    }
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    lat = result["latency_ms"]
    click.echo(f"{model_file.name}: {runtime}, {result['samples']} held-out digits (split seed {seed})")
    click.echo(f"  accuracy {result['accuracy']:.2%}")
    click.echo(f"  latency per row: mean {lat['mean']:.3f} ms, p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms")


def _card_seed(card_path: Path) -> int:
    """The split seed recorded by ``fleet model example``, so 'held-out' really is held out for that model."""
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
        return int(card["provenance"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
