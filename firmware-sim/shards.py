"""`firmware-sim run --shards K`: the fleet split over K processes, one :class:`Simulation` each, one merged report.

Each shard is a child process (multiprocessing's "spawn": the parent may have threads) that runs every K-th device
of the fleet (``SimSettings.shard``); a device behaves as in a one-process run, its seeds coming from its place in
the whole fleet. The model, the state folder and the enrollment (``SimSettings.updates``) are the parent's; the
children get them in the settings.

Signals: the parent's first SIGINT or SIGTERM sets ``stop`` (the CLI's ``stop_on_signals``), which the parent passes
on through a multiprocessing Event: every shard ends its run early and still reports. Children ignore SIGINT and
SIGTERM themselves, so a terminal's Ctrl-C (sent to the whole process group) or a group-wide SIGTERM reaches them
only through the parent; a shard whose parent is gone ends its run too.

Failures are one line (a ``click.ClickException``), and the other shards are stopped first: a shard whose devices
cannot be set up says why, in the words of a one-process run; a shard that dies (a crash, the OOM killer) is named
with its exit code. Children log to stderr at the parent's level, as the parent does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from operator import itemgetter
from threading import Event
from typing import Any

import click

from agent import logs as agent_logs
from agent.update import smoke
from firmware_sim.cli import set_up
from firmware_sim.simulator import SimSettings

#: How often the parent looks at ``stop`` while it waits for the shards.
POLL_S = 0.2
#: How long shards being stopped get to end on their own before they are killed.
STOP_GRACE_S = 5.0


def run_sharded(settings: SimSettings, shards: int, stop: Event) -> dict[str, Any]:
    """Run the fleet of ``settings`` in ``shards`` child processes until its duration ends or ``stop`` is set; return
    the shards' reports merged (:func:`merge_reports`). Raises ``click.ClickException``, one line, when a shard
    cannot set its devices up or dies without its report."""
    context = multiprocessing.get_context("spawn")
    halt = context.Event()
    level = logging.getLogger().getEffectiveLevel()
    children: list[tuple[BaseProcess, Connection]] = []
    try:
        for index in range(shards):
            receiver, sender = context.Pipe(duplex=False)
            shard = dataclasses.replace(settings, shard=(index, shards))
            child = context.Process(
                target=_run_shard, args=(shard, level, halt, sender), name=f"firmware-sim-shard-{index}"
            )
            child.start()
            sender.close()  # the child holds the only writing end: its death is an end of file here
            children.append((child, receiver))
        return merge_reports(_gather(children, stop, halt))
    finally:
        _stop(children, halt)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the shards' (at least one): ``devices`` together, by device id; ``totals`` summed key by key;
    the longest ``elapsed_s``; every other key as the first report has it."""
    totals: dict[str, Any] = {}
    for report in reports:
        for key, value in report["totals"].items():
            totals[key] = totals.get(key, 0) + value
    return {
        **reports[0],
        "devices": sorted((device for report in reports for device in report["devices"]), key=itemgetter("device_id")),
        "totals": totals,
        "elapsed_s": max(report["elapsed_s"] for report in reports),
    }


def _gather(children: list[tuple[BaseProcess, Connection]], stop: Event, halt: ProcessEvent) -> list[dict[str, Any]]:
    """Each shard's report, in shard order, passing ``stop`` on to them; ClickException for the first that fails."""
    reports: dict[int, dict[str, Any]] = {}
    waiting = {receiver: index for index, (_, receiver) in enumerate(children)}
    while waiting:
        if stop.is_set():
            halt.set()
        for receiver in wait(list(waiting), timeout=POLL_S):
            index = waiting.pop(receiver)
            shard = f"shard {index} of {len(children)}"
            try:
                kind, payload = receiver.recv()
            except EOFError:
                child = children[index][0]
                child.join(STOP_GRACE_S)
                raise click.ClickException(
                    f"{shard} ended without its report ({_exit_status(child.exitcode)}); the other shards were stopped"
                ) from None
            if kind == "error":
                raise click.ClickException(f"{shard}: {payload}")
            reports[index] = payload
    return [reports[index] for index in sorted(reports)]


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"exit code {code}: killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop(children: Iterable[tuple[BaseProcess, Connection]], halt: ProcessEvent) -> None:
    """Ask every shard to end its run, give them ``STOP_GRACE_S`` in all, kill those still running."""
    halt.set()
    deadline = time.monotonic() + STOP_GRACE_S
    for child, receiver in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()
        receiver.close()


def _run_shard(settings: SimSettings, level: int, halt: ProcessEvent, sender: Connection) -> None:
    """A shard's process: set its devices up, run them until the duration ends, ``halt`` is set or the parent is
    gone, send the report (or the one line saying why the devices could not be set up)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    agent_logs.setup(level)
    smoke.share_cpus(settings.shard[1])
    parent = os.getppid()
    try:
        # set_up's progress bar counts the whole fleet; a shard sets up its part, so it draws none.
        with contextlib.redirect_stderr(io.StringIO()):
            simulation = set_up(settings)
    except click.ClickException as exc:
        sender.send(("error", exc.format_message()))
        return
    sender.send(("report", simulation.run(until=lambda: halt.is_set() or os.getppid() != parent)))
