"""Elastic pools: convergence after a shift, the plugins' scheduler CPU, planner speed.

**CPU, tiny models, real processes**: a ``dask scheduler`` with dflow's preload and
four ``dflow-worker`` processes of tiny PixArt-Sigma (2 encoder / 1 DiT / 1 VAE),
started by :mod:`dflow.testing`; the controller at a 1 s interval, 3 s cooldown
and 4 s horizon (as ``tests/test_elastic.py``).

- *Convergence*: a burst of DiT-heavy requests (``steps=200``: 0.26 s of DiT on
  a quiet core), then one of VAE-heavy requests (512 x 512, ``steps=1``: 0.19 s of
  VAE), each sized to outlast several intervals on a quiet machine. Per shift, seconds from its first
  request to the controller's first move toward the new bottleneck, to that
  worker serving its new pool, and to the burst's last request done; without
  ``--quick`` also on the fixed 2/1/1 fleet (controller off).
- *Scheduler CPU*: the scheduler process's CPU time (psutil) under one paced load
  with the controller and telemetry on, with telemetry only (``enabled`` off), on
  again, and with both plugins removed; plus the controller's own step durations
  (``ElasticController.planning_seconds``).

**Planner decision time** at 10, 100 and 1,000 workers: ``benchmarks/planner_speed.py``,
run as is.

**Emulated** (``dflow.emulation``): eight emulated H200 workers of
PixArt-Sigma-1024 in this process, starting as 2 encoder / 3 DiT / 3 VAE, with the
controller's shipped periods (interval 2 s, cooldown 60 s, horizon 30 s, telemetry
window 30 s) and a predictor priced as the emulation charges; a DiT-heavy burst
(``steps=50``), then a VAE-heavy one (``steps=1``), with the controller off, then
on. Its seconds are emulated seconds (wall seconds over the time scale).

Run with ``python benchmarks/elastic.py [--quick] [--out benchmarks/results]``
from the repository root; it prints markdown and writes its raw figures to
``elastic.json`` (``elastic-quick.json``) under ``--out``. ``--quick`` sends
fewer requests and skips the fixed-fleet runs of the real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import dask
import dask.config
from distributed import Client, as_completed

import dflow
from dflow import testing
from dflow.bench.env import machine
from dflow.cluster import StageCluster
from dflow.pools import Pool
from dflow.request import Request
from dflow.testing import scheduler_process, wait_for_pools, worker_processes

HERE = Path(__file__).resolve().parent
REAL = "CPU, tiny models, real processes"
EMULATED = "emulated (H200 profile, dflow.emulation)"


@dataclass(frozen=True)
class Shift:
    label: str
    fields: dict[str, Any]
    requests: int
    #: stages a move answering the shift goes to
    into: tuple[str, ...]


@dataclass
class Setup:
    """A fleet and the shifts it sees."""

    label: str
    model: str
    start: dict[str, int]
    shifts: list[Shift]
    #: planner cooldown, wall seconds
    cooldown: float
    #: wall seconds per reported second (the emulation's time scale; 1 for real)
    scale: float = 1.0
    prompt: str = "a fox"
    rows: list[dict[str, Any]] = field(default_factory=list)


def real_setup(quick: bool) -> Setup:
    n = 16 if quick else 24
    return Setup(
        REAL,
        "tiny-pixart",
        {"encoder": 2, "dit": 1, "vae": 1},
        [
            Shift("DiT-heavy (steps=200, 64x64)", {"steps": 200}, n, ("dit",)),
            Shift(
                "VAE-heavy (steps=1, 512x512)",
                {"steps": 1, "height": 512, "width": 512},
                n,
                ("vae",),
            ),
        ],
        cooldown=3.0,
    )


REAL_ENV = {
    "DASK_DFLOW__ELASTIC__ENABLED": "False",
    "DASK_DFLOW__ELASTIC__INTERVAL": "1s",
    "DASK_DFLOW__PLANNER__COOLDOWN": "3s",
    "DASK_DFLOW__PLANNER__HORIZON": "4s",
}
EMULATED_SCALE = 0.5
#: the controller's shipped periods, in emulated seconds
EMULATED_PERIODS = {
    "dflow.elastic.interval": 2.0,
    "dflow.elastic.default-switch": 10.0,
    "dflow.planner.horizon": 30.0,
    "dflow.planner.cooldown": 60.0,
    "dflow.telemetry.window": 30.0,
}


def emulated_setup(quick: bool) -> Setup:
    return Setup(
        EMULATED,
        "pixart-sigma-1024",
        {"encoder": 2, "dit": 3, "vae": 3},
        [
            Shift("DiT-heavy (steps=50, 1024x1024)", {"steps": 50}, 32, ("dit",)),
            Shift(
                "VAE-heavy (steps=1, 1024x1024)",
                {"steps": 1},
                200 if quick else 400,
                ("vae", "encoder"),
            ),
        ],
        cooldown=EMULATED_PERIODS["dflow.planner.cooldown"] * EMULATED_SCALE,
        scale=EMULATED_SCALE,
    )


# -- on the scheduler ------------------------------------------------------------------


def _planning_seconds(*, dask_scheduler) -> list[float]:
    return dask_scheduler.plugins["dflow-elastic"].planning_seconds()


def _pid(*, dask_scheduler) -> int:
    return os.getpid()


def _plugins_off(*, dask_scheduler) -> None:
    """Remove the controller and telemetry: the extension alone stays."""
    for name in ("dflow-elastic", "dflow-telemetry"):
        dask_scheduler.periodic_callbacks.pop(name).stop()
        dask_scheduler.remove_plugin(name)


async def dask_setup(scheduler) -> None:
    """Scheduler preload of the emulated runs: dflow, as ``dflow.preload``
    installs it, with a predictor that prices every pool as the emulation
    charges it, in wall seconds at its time scale (what the controller observes)."""
    from dflow.plugins.install import install

    await install(scheduler, predictor=testing.emulated_predictor())


# -- the fleet -------------------------------------------------------------------------


def set_layout(client: Client, setup: Setup, counts: dict[str, int]) -> None:
    """Workers per stage as ``counts``, moving as few as possible; then out the
    moved workers' cooldown."""
    testing.set_layout(
        client,
        counts,
        setup.model,
        reason="benchmark: set the layout",
        cooldown=setup.cooldown,
    )


def layout(client: Client) -> Counter[str]:
    return Counter(str(s) for s in testing.fleet_layout(client).values())


def requests(setup: Setup, n: int, seed: int, **fields: Any) -> list[Request]:
    return [
        Request(model=setup.model, prompt=setup.prompt, seed=seed + i, **fields)
        for i in range(n)
    ]


def run_burst(client: Client, burst: list[Request]) -> tuple[float, float, int]:
    """Submit ``burst`` at once; (submitted, last done, failed)."""
    submitted = time.time()
    futures = dflow.map(client, burst)
    failed = sum(f.status != "finished" for f in as_completed(futures))
    return submitted, time.time(), failed


# -- convergence -------------------------------------------------------------------------


def shifts(client: Client, setup: Setup, elastic: bool, seed: int) -> None:
    """Each of the setup's shifts in turn, from its start layout; rows in seconds
    of the setup (wall seconds over its scale)."""
    set_layout(client, setup, setup.start)
    for i, shift in enumerate(setup.shifts):
        testing.elastic(client, enabled=elastic)
        before = len(testing.decisions(client))
        burst = requests(setup, shift.requests, seed + 1000 * i, **shift.fields)
        submitted, done, failed = run_burst(client, burst)
        testing.elastic(client, enabled=False)
        decisions = testing.decisions(client)[before:]
        row = {
            "fleet": setup.label,
            "shift": shift.label,
            "elastic": elastic,
            "requests": shift.requests,
            "failed": failed,
            "drained_s": (done - submitted) / setup.scale,
            "moves": len(decisions),
            "move_log": [
                f"{(d['time'] - submitted) / setup.scale:.1f}s {d['worker']} "
                f"{d['source'][0]}->{d['target'][0]}"
                for d in decisions
            ],
        }
        answers = [d for d in decisions if d["target"] and d["target"][0] in shift.into]
        if answers:
            move = answers[0]
            target = str(Pool(*move["target"]))
            ready = [
                t
                for t, event in testing.dflow_events(client, "worker-ready")
                if event["worker"] == move["worker"]
                and event["pool"] == target
                and t > move["time"]
            ]
            row |= {
                "decision_s": (move["time"] - submitted) / setup.scale,
                "ready_s": (min(ready) - submitted) / setup.scale if ready else None,
                "move": f"{move['source'][0]} -> {move['target'][0]}",
                "reason": move["reason"],
            }
        testing.poll(lambda: testing.fleet_settled(client), 300, "the switches done")
        row["layout"] = "/".join(
            str(layout(client)[s]) for s in ("encoder", "dit", "vae")
        )
        setup.rows.append(row)


# -- scheduler CPU -----------------------------------------------------------------------


def cpu_cost(client: Client, setup: Setup, quick: bool) -> dict[str, Any]:
    """Scheduler CPU seconds under one paced load, plugins on and off, on 1
    encoder / 2 DiT / 1 VAE (where the controller has nothing to move)."""
    scheduler = psutil.Process(client.run_on_scheduler(_pid))
    seconds = 10 if quick else 20
    rate = 2.0  # requests per second: the fleet keeps up

    def measure(mode: str, seed: int) -> dict[str, Any]:
        futures = []
        cpu = scheduler.cpu_times()
        start = time.time()
        for i in range(int(seconds * rate)):
            steps = 3 if i % 2 else 5
            futures += dflow.map(client, requests(setup, 1, seed + i, steps=steps))
            time.sleep(max(0.0, start + (i + 1) / rate - time.time()))
        client.gather(futures)
        wall = time.time() - start
        after = scheduler.cpu_times()
        used = (after.user - cpu.user) + (after.system - cpu.system)
        return {
            "mode": mode,
            "requests": len(futures),
            "wall_s": wall,
            "cpu_s": used,
            "cpu_percent": 100 * used / wall,
            "cpu_ms_per_request": 1000 * used / len(futures),
        }

    set_layout(client, setup, {"encoder": 1, "dit": 2, "vae": 1})
    decisions = len(testing.decisions(client))
    steps_before = len(client.run_on_scheduler(_planning_seconds))
    rows = []
    for mode, elastic in (
        ("elastic + telemetry", True),
        ("telemetry only (elastic.enabled off)", False),
        ("elastic + telemetry, again", True),
    ):
        testing.elastic(client, enabled=elastic)
        rows.append(measure(mode, 10_000 * len(rows)))
    testing.elastic(client, enabled=False)
    steps = client.run_on_scheduler(_planning_seconds)[steps_before:]
    moves = len(testing.decisions(client)) - decisions
    client.run_on_scheduler(_plugins_off)
    rows.append(measure("off (extension only)", 10_000 * len(rows)))
    return {"rows": rows, "planning_seconds": steps, "moves": moves}


# -- the runs ------------------------------------------------------------------------------


def real(quick: bool) -> dict[str, Any]:
    setup = real_setup(quick)
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(tempfile.TemporaryDirectory(prefix="dflow-elastic-"))
        address = stack.enter_context(scheduler_process(env=REAL_ENV, log_dir=logs))
        fleet = [(s, setup.model) for s, n in setup.start.items() for _ in range(n)]
        workers = stack.enter_context(worker_processes(address, fleet, log_dir=logs))
        client = stack.enter_context(Client(address))
        wanted = {setup.model: [s for s, _ in fleet]}
        wait_for_pools(client, wanted, timeout=600, processes=workers)
        shifts(client, setup, elastic=True, seed=0)
        if not quick:
            shifts(client, setup, elastic=False, seed=0)
        cost = cpu_cost(client, setup, quick)
    return {"convergence": setup.rows, "cpu_cost": cost}


def emulated(quick: bool) -> dict[str, Any]:
    setup = emulated_setup(quick)
    config = {
        "dflow.runtime.backend": "emulated",
        "dflow.emulation.time-scale": setup.scale,
        "dflow.elastic.enabled": False,
        "dflow.client.model-timeout": "600s",
        **{key: value * setup.scale for key, value in EMULATED_PERIODS.items()},
    }
    fleet = [
        (stage, setup.model, "h200")
        for stage, n in setup.start.items()
        for _ in range(n)
    ]
    started = time.time()
    with (
        dask.config.set(config),
        StageCluster(
            setup.model,
            fleet=fleet,
            processes=False,
            protocol="inproc",
            host=None,
            dashboard_address=None,
            worker_options={"memory_limit": 0},
            scheduler_options={"preload": [__file__], "dashboard": False},
        ) as cluster,
        Client(cluster) as client,
    ):
        wanted = {setup.model: [s for s, _, _ in fleet]}
        wait_for_pools(client, wanted, timeout=900)
        ready = time.time() - started
        shifts(client, setup, elastic=False, seed=0)
        # the first runs' arrivals leave the telemetry window
        time.sleep(EMULATED_PERIODS["dflow.telemetry.window"] * setup.scale)
        shifts(client, setup, elastic=True, seed=0)
        steps = client.run_on_scheduler(_planning_seconds)
    return {
        "convergence": setup.rows,
        "scale": setup.scale,
        "workers": len(fleet),
        "start_s": ready,
        "planning_seconds": steps,
    }


def planner_speed(quick: bool) -> str:
    command = [sys.executable, str(HERE / "planner_speed.py")]
    if quick:
        command += ["--repeats", "5"]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


# -- output ------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def steps_line(steps: list[float]) -> str:
    ordered = sorted(steps)
    return (
        f"{len(steps)} steps: median {statistics.median(steps) * 1e3:.2f} ms, "
        f"p95 {ordered[int(0.95 * (len(ordered) - 1))] * 1e3:.2f} ms, "
        f"max {max(steps) * 1e3:.2f} ms"
    )


def convergence_table(rows: list[dict[str, Any]], unit: str) -> list[str]:
    lines = [
        f"| shift | controller | requests | failed | decision {unit} | worker ready "
        f"{unit} | last request done {unit} | moves | first move | layout after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shift']} | {'on' if row['elastic'] else 'off'} | "
            f"{row['requests']} | {row['failed']} | {fmt(row.get('decision_s'))} | "
            f"{fmt(row.get('ready_s'))} | {fmt(row['drained_s'])} | {row['moves']} | "
            f"{row.get('move', '-')} | {row['layout']} |"
        )
    lines.append("")
    for row in rows:
        if row["move_log"]:
            controller = "on" if row["elastic"] else "off"
            lines.append(
                f"- {row['shift']}, controller {controller}: "
                + ", ".join(row["move_log"])
                + (f"; first answer: {row['reason']}" if row.get("reason") else "")
            )
    return lines


def markdown(results: dict[str, Any]) -> str:
    real_ = results["real"]
    lines = [
        "## Elastic pools",
        "",
        f"Machine: {results['machine']}.",
        "",
        f"### Convergence after a shift ({REAL})",
        "",
        "Seconds from the burst's first request. Fleet of 4 workers starting at "
        "2 encoder / 1 DiT / 1 VAE before each pair of shifts; interval 1 s, "
        "cooldown 3 s, horizon 4 s. Layout after: encoder/DiT/VAE workers.",
        "",
        *convergence_table(real_["convergence"], "s"),
        "",
        f"### Scheduler CPU of the plugins ({REAL})",
        "",
        "The scheduler process's CPU time (psutil, user + system) under the same "
        "paced load (2 requests/s, steps 3 and 5 alternating, 64x64) on 1 encoder / "
        "2 DiT / 1 VAE, in this order.",
        "",
        "| plugins | requests | wall s | scheduler CPU s | CPU % | CPU ms/request |",
        "|---|---|---|---|---|---|",
    ]
    cost = real_["cpu_cost"]
    for row in cost["rows"]:
        lines.append(
            f"| {row['mode']} | {row['requests']} | {fmt(row['wall_s'])} | "
            f"{row['cpu_s']:.3f} | {fmt(row['cpu_percent'])} | "
            f"{fmt(row['cpu_ms_per_request'])} |"
        )
    lines += [
        "",
        f"Controller steps while on (plan only; {cost['moves']} moves): "
        f"{steps_line(cost['planning_seconds'])}.",
        "",
        "### Planner decision time (benchmarks/planner_speed.py, CPU, pure planner)",
        "",
        "```",
        results["planner_speed"].rstrip(),
        "```",
        "",
    ]
    emulated_ = results["emulated"]
    lines += [
        f"### Convergence after a shift ({EMULATED})",
        "",
        f"Emulated seconds (wall seconds / {emulated_['scale']}) from the burst's "
        f"first request. {emulated_['workers']} emulated H200 workers of "
        "PixArt-Sigma-1024 in one process, starting at 2 encoder / 3 DiT / 3 VAE "
        "before each pair of shifts; shipped controller periods (interval 2 s, "
        "cooldown 60 s, horizon 30 s, window 30 s, emulated); the predictor prices "
        "every pool from the profile.",
        "",
        *convergence_table(emulated_["convergence"], "s (emulated)"),
        "",
        f"Controller steps (plan only, wall, emulated fleet of "
        f"{emulated_['workers']}): {steps_line(emulated_['planning_seconds'])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests, no fixed-fleet runs"
    )
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args()
    host = machine()
    results: dict[str, Any] = {
        "machine": (
            f"{host['cpus']} CPUs, load average {host['loadavg_start'][0]:.1f} at "
            f"the start (shared with other work); dflow {host['revision']}"
        ),
        "host": host,
    }
    results["planner_speed"] = planner_speed(args.quick)
    results["real"] = real(args.quick)
    results["emulated"] = emulated(args.quick)
    host["loadavg_end"] = os.getloadavg()
    print(markdown(results))
    print(f"\nload average start {host['loadavg_start']}, end {host['loadavg_end']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"elastic{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
