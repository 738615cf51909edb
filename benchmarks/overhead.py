"""dflow's own overhead: requests per second of 3-stage chains whose stages cost ~nothing.

Plain Dask, on a cluster of three worker processes tagged like dflow's pools
(``enc``/``dit``/``vae`` resources, dflow's thread counts: 8 / 1 / 8), running
three no-op functions per chain:

- ``plain submit/task``: one ``client.submit(..., resources=...)`` per task;
- ``plain graph/chain``: one annotated graph per chain (``client.get``);
- ``plain one graph``: one annotated graph for every chain, the shape
  ``dflow.client.map`` builds.

dflow, on a :class:`~dflow.cluster.StageCluster` of ``--model`` (scheduler
extension and telemetry installed, stage workers with ``StagePlugin``, elastic
controller off):

- ``plain one graph on dflow's pools``: the same no-op chains, placed by the
  pools' resources, without dflow's client path or annotations;
- ``dflow map, no-op stages``: ``dflow.client.map`` with its stage functions
  swapped for no-ops in this process (same requests, admission call, keys,
  annotations, resources and scheduler plugins; no model call): dflow's
  plumbing alone;
- ``dflow map, tiny model``: ``dflow.client.map`` with the real stage calls of
  ``--model`` at 1 step and the smallest size: *not* zero-cost (the model runs);
- ``dflow submit/request``: ``dflow.client.submit`` once per request (one
  admission round trip and one graph per request), real stage calls;
- if dflow has the emulated backend, ``dflow.client.map`` on an emulated
  ``--emulated-model`` at time-scale 1e-6: no compute, real-size embeddings.

All clusters stay up and the variants take turns run by run, so a drifting load
on the machine hits them alike. For each: chains per second (all submitted at
once, then gathered), wall per chain, CPU milliseconds per chain of this process
(the clients and schedulers run in it) and of the workers, and the latency of
one chain alone.

    python benchmarks/overhead.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

import dask
import dask.config
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, Nanny, Scheduler, SpecCluster

import dflow.client
from dflow.bench.env import machine
from dflow.cluster import StageCluster
from dflow.pools import Pool, task_resources
from dflow.request import Request

PLAIN_STAGES = (("encode", "enc", 8), ("denoise", "dit", 1), ("decode", "vae", 8))


def noop(*args: Any) -> int:
    return 0


def cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


# -- plain Dask ---------------------------------------------------------------------


def plain_cluster() -> SpecCluster:
    workers = {
        resource: {
            "cls": Nanny,
            "options": {
                "nthreads": nthreads,
                "resources": {resource: nthreads},
                "host": "127.0.0.1",
                "silence_logs": logging.ERROR,
            },
        }
        for _, resource, nthreads in PLAIN_STAGES
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": ":0"},
    }
    return SpecCluster(
        workers=workers, scheduler=scheduler, silence_logs=logging.ERROR, name="plain"
    )


def plain_graph(
    chains: int, resources: dict[str, dict[str, int]] | None = None
) -> tuple[HighLevelGraph, list[str]]:
    """Chains of no-op tasks, one layer per task with a resources annotation (as
    dflow.client.map builds them); ``resources`` per task prefix (default: the
    plain cluster's ``enc``/``dit``/``vae``)."""
    layers: dict[str, MaterializedLayer] = {}
    dependencies: dict[str, set[str]] = {}
    finals = []
    for _ in range(chains):
        chain = uuid.uuid4().hex[:16]
        previous = None
        for prefix, resource, _ in PLAIN_STAGES:
            key = f"{prefix}-{chain}"
            task = (noop, chain) if previous is None else (noop, chain, previous)
            needs = resources[prefix] if resources else {resource: 1}
            layers[key] = MaterializedLayer(
                {key: task}, annotations={"resources": needs}
            )
            dependencies[key] = {previous} if previous else set()
            previous = key
        finals.append(previous)
    return HighLevelGraph(layers, dependencies), finals


def plain_submit_per_task(client: Client, chains: int) -> list:
    futures = []
    for _ in range(chains):
        previous = None
        for _, resource, _ in PLAIN_STAGES:
            args = () if previous is None else (previous,)
            previous = client.submit(noop, *args, resources={resource: 1}, pure=False)
        futures.append(previous)
    return futures


def plain_graph_per_chain(client: Client, chains: int) -> list:
    futures = []
    for _ in range(chains):
        graph, keys = plain_graph(1)
        futures += client.get(graph, keys, sync=False)
    return futures


def plain_one_graph(client: Client, chains: int) -> list:
    graph, keys = plain_graph(chains)
    return client.get(graph, keys, sync=False)


# -- dflow --------------------------------------------------------------------------


def dflow_requests(model: str, chains: int) -> list[Request]:
    from dflow.catalog import resolve

    side = resolve(model).size_multiple
    return [
        Request(
            model=model, prompt=f"a fox {i}", height=side, width=side, steps=1, seed=i
        )
        for i in range(chains)
    ]


def noop_stage_tasks() -> dict[str, tuple[str, Callable]]:
    return {
        stage: (prefix, noop) for stage, (prefix, _) in dflow.client.STAGE_TASKS.items()
    }


def plain_graph_on_pools(client: Client, requests: list[Request]) -> list:
    """The plain one-graph no-op chains, placed on dflow's pools by their resources
    but without dflow's client path or annotations."""
    model = requests[0].model
    resources = {
        prefix: task_resources(Pool(stage, model))
        for stage, (prefix, _) in dflow.client.STAGE_TASKS.items()
        if stage != "all"
    }
    graph, keys = plain_graph(len(requests), resources)
    return client.get(graph, keys, sync=False)


def dflow_map_noop(client: Client, requests: list[Request]) -> list:
    with mock.patch.dict(dflow.client.STAGE_TASKS, noop_stage_tasks()):
        return dflow.client.map(client, requests)


def dflow_map(client: Client, requests: list[Request]) -> list:
    return dflow.client.map(client, requests)


def dflow_submit_per_request(client: Client, requests: list[Request]) -> list:
    return [dflow.client.submit(client, r) for r in requests]


def chains_of(
    submit: Callable[[Client, list[Request]], list],
    client: Client,
    model: str,
    n: int,
) -> list:
    return submit(client, dflow_requests(model, n))


def emulation_available() -> bool:
    """Whether this dflow has the emulated backend (``dflow.runtime.backend``)."""
    return (
        importlib.util.find_spec("dflow.emulation") is not None
        and dask.config.get("dflow.runtime.backend", None) is not None
    )


def dflow_setups(
    args: argparse.Namespace, chains: int, model_chains: int
) -> list[tuple[str, dict[str, Any], list[tuple[str, Callable, int]]]]:
    """(model, dask config, [(variant, submit function, chains)]) per StageCluster."""
    model = args.model
    setups: list[tuple[str, dict[str, Any], list[tuple[str, Callable, int]]]] = [
        (
            model,
            {},
            [
                ("plain one graph on dflow's pools", plain_graph_on_pools, chains),
                ("dflow map, no-op stages", dflow_map_noop, chains),
                (f"dflow map, {model} 1 step (not zero-cost)", dflow_map, model_chains),
                (
                    f"dflow submit/request, {model} 1 step (not zero-cost)",
                    dflow_submit_per_request,
                    model_chains,
                ),
            ],
        )
    ]
    if args.emulated_model and emulation_available():
        config = {
            "dflow.runtime.backend": "emulated",
            # must be positive: 1e-6 turns a 10 s emulated call into 10 us of sleep
            "dflow.emulation.time-scale": 1e-6,
        }
        name = f"dflow map, emulated {args.emulated_model} (time-scale 1e-6)"
        setups.append((args.emulated_model, config, [(name, dflow_map, chains)]))
    return setups


# -- measurement --------------------------------------------------------------------


def run_once(client: Client, submit: Callable[[], list]) -> dict[str, Any]:
    """Submit a batch of chains at once and gather them: wall and CPU seconds."""
    workers_before = client.run(cpu_seconds)
    here_before = cpu_seconds()
    start = time.perf_counter()
    futures = submit()
    submitted = time.perf_counter()
    client.gather(futures)
    stop = time.perf_counter()
    here = cpu_seconds() - here_before
    workers = sum(client.run(cpu_seconds).values()) - sum(workers_before.values())
    n = len(futures)
    return {
        "chains": n,
        "wall_s": stop - start,
        "submit_s": submitted - start,
        "chains_per_s": n / (stop - start),
        "client_scheduler_cpu_ms_per_chain": here / n * 1e3,
        "workers_cpu_ms_per_chain": workers / n * 1e3,
    }


def single_latency(
    client: Client, single: Callable[[], list], sequential: int
) -> dict[str, float]:
    """Milliseconds of one chain alone, submit to result."""
    latencies = []
    for _ in range(sequential):
        start = time.perf_counter()
        client.gather(single())
        latencies.append(time.perf_counter() - start)
    return {
        "median": statistics.median(latencies) * 1e3,
        "min": min(latencies) * 1e3,
    }


def table(results: dict[str, dict[str, Any]], label: str, cores: int) -> str:
    """Chains/s as measured, and the ceilings the CPU cost per chain implies: the
    client process alone (the scheduler runs in it, on one core) and all processes
    on ``cores`` cores. CPU seconds hold up on a loaded machine; wall time does not."""
    lines = [
        f"| variant ({label}) | chains | chains/s, median run (all runs) "
        "| wall ms/chain | client+scheduler CPU ms/chain | workers CPU ms/chain "
        f"| ceiling chains/s: scheduler process / all CPU on {cores} cores "
        "| single chain latency median ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["median_run"]
        every = ", ".join(f"{x['chains_per_s']:.0f}" for x in r["runs"])
        here = statistics.median(
            x["client_scheduler_cpu_ms_per_chain"] for x in r["runs"]
        )
        workers = statistics.median(x["workers_cpu_ms_per_chain"] for x in r["runs"])
        lines.append(
            f"| {name} | {m['chains']} | **{m['chains_per_s']:.0f}** ({every}) "
            f"| {m['wall_s'] / m['chains'] * 1e3:.2f} | {here:.2f} | {workers:.2f} "
            f"| {1e3 / here:.0f} / {cores * 1e3 / (here + workers):.0f} "
            f"| {r['single_chain_latency_ms']['median']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 chains, 1 run each")
    parser.add_argument(
        "--chains", type=int, default=None, help="no-op chains per run (1000)"
    )
    parser.add_argument(
        "--model-chains",
        type=int,
        default=None,
        help="chains per run on the tiny model (300)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per variant (3)"
    )
    parser.add_argument(
        "--sequential", type=int, default=None, help="single chains timed (20)"
    )
    parser.add_argument("--model", default="tiny-pixart")
    parser.add_argument(
        "--emulated-model",
        default="flux.1-dev",
        help="model of the emulated-backend variant, if dflow has one ('' skips it)",
    )
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    chains = args.chains or (50 if args.quick else 1000)
    model_chains = args.model_chains or (50 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    sequential = args.sequential or (5 if args.quick else 20)
    host = machine()
    # Every cluster stays up and the variants take turns, run by run, so that
    # they all see the same drift in the machine's load.
    variants: list[tuple[str, Client, Callable, Callable, dict[str, Any]]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            dask.config.set(
                {
                    "dflow.client.model-timeout": "600s",
                    # fixed pools: no role switching during the measurement
                    "dflow.elastic.enabled": False,
                    # every run encodes its prompts (runs repeat them)
                    "dflow.runtime.encoding-cache": 0,
                }
            )
        )
        cluster = stack.enter_context(plain_cluster())
        client = stack.enter_context(Client(cluster))
        client.wait_for_workers(3)
        client.gather(plain_one_graph(client, 10))  # warm-up
        for name, submit in (
            ("plain submit/task", plain_submit_per_task),
            ("plain graph/chain", plain_graph_per_chain),
            ("plain one graph", plain_one_graph),
        ):
            variants.append(
                (
                    name,
                    client,
                    functools.partial(submit, client, chains),
                    functools.partial(submit, client, 1),
                    {},
                )
            )
        for model, config, group in dflow_setups(args, chains, model_chains):
            with dask.config.set(config):  # the workers take the config at start
                cluster = stack.enter_context(
                    StageCluster(
                        model,
                        {"encoder": 1, "dit": 1, "vae": 1},
                        silence_logs=logging.ERROR,
                        worker_options={"silence_logs": logging.ERROR},
                    )
                )
            client = stack.enter_context(Client(cluster))
            client.gather(dflow_map(client, dflow_requests(model, 10)))  # warm-up
            for name, submit, n in group:
                variants.append(
                    (
                        name,
                        client,
                        functools.partial(chains_of, submit, client, model, n),
                        functools.partial(chains_of, submit, client, model, 1),
                        config,
                    )
                )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in variants}
        for round_ in range(repeats):
            for name, client, many, _, _ in variants:
                runs[name].append(run_once(client, many))
                print(
                    f"run {round_ + 1}/{repeats} {name}: "
                    f"{runs[name][-1]['chains_per_s']:.0f} chains/s",
                    flush=True,
                )
        results: dict[str, dict[str, Any]] = {}
        for name, client, _, single, config in variants:
            ordered = sorted(runs[name], key=lambda r: r["chains_per_s"])
            results[name] = {
                "runs": runs[name],
                "median_run": ordered[len(ordered) // 2],
                "single_chain_latency_ms": single_latency(client, single, sequential),
                "config": config,
            }

    label = f"CPU, loopback, {os.cpu_count()} cores shared by all processes"
    result = {
        "benchmark": "overhead",
        "command": " ".join([sys.executable, *sys.argv]),
        "model": args.model,
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(table(results, label, os.cpu_count() or 1))
    print(f"\nload average start {host['loadavg_start']}, end {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
