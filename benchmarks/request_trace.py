"""Where a single request's time goes between the stages: a transition trace.

Serves single requests one after another on a :class:`~dflow.cluster.StageCluster`
(one encoder, DiT and VAE worker; tiny Flux by default) and prints, per hop, the
median milliseconds over the requests: the client's submission until the scheduler
holds the graph, each task's assignment until its worker hears of it, the fetch of
its input, the call until the scheduler has its result (the workers' own log times
of a call's end are not comparable), and the output's trip to the client.
Timestamps are the scheduler's and the workers' transition logs and the client's
clock, all on one host.

Usage::

    python benchmarks/request_trace.py --requests 40 --steps 4
    python benchmarks/request_trace.py --config dflow.client.send-interval=10ms
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import defaultdict

import yaml

import dask.config
from distributed import Client

import dflow
from dflow.client import encoding_key
from dflow.cluster import StageCluster

#: the stage tasks of a request, in order (their key prefixes)
TASKS = ("encode", "denoise", "decode")


def worker_story(key: str, dask_worker=None) -> list[tuple]:
    return [tuple(event) for event in dask_worker.state.story(key)]


def first(events: list[tuple], match) -> float:
    """The timestamp (last field) of the first event that ``match`` accepts."""
    return next(e[-1] for e in events if match(e))


def trace(client: Client, cluster: StageCluster, request: dflow.Request) -> dict:
    """One request's hops, in milliseconds."""
    submitted = time.time()
    future = dflow.submit(client, request)
    future.result()
    returned = time.time()
    request_id = future.key.split("-", 1)[1]
    keys = [encoding_key(request), f"denoise-{request_id}", f"decode-{request_id}"]
    hops: dict[str, float] = {}
    previous = submitted
    assert cluster.scheduler is not None  # the cluster's own, in this process
    for prefix, key in zip(TASKS, keys, strict=True):
        scheduler = [e for e in cluster.scheduler.story(key) if e[0] == key]
        assigned = first(
            scheduler, lambda e: e[2] == "processing" and e[-1] >= submitted
        )
        in_memory = first(scheduler, lambda e: e[2] == "memory" and e[-1] >= submitted)
        events = [
            e
            for story in client.run(worker_story, key).values()
            for e in story
            if e[0] == key and isinstance(e[-1], float) and e[-1] >= submitted
        ]
        heard = first(events, lambda e: e[1] == "compute-task")
        executing = first(events, lambda e: e[2:3] == ("executing",))
        hops[f"{prefix}: scheduler assigns it"] = assigned - previous
        hops[f"{prefix}: its worker hears"] = heard - assigned
        hops[f"{prefix}: input fetched, call starts"] = executing - heard
        hops[f"{prefix}: the call, until the scheduler has its result"] = (
            in_memory - executing
        )
        previous = in_memory
    hops["the output reaches the client"] = returned - previous
    hops["whole request"] = returned - submitted
    return {hop: seconds * 1e3 for hop, seconds in hops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dask config setting (repeatable; VALUE is YAML), e.g. "
        "dflow.client.send-interval=10ms for distributed's own batching",
    )
    args = parser.parse_args()
    request = dflow.Request(
        model=args.model, prompt="a fox", height=64, width=64, steps=args.steps
    )
    settings = {"dflow.runtime.encoding-cache": 0, "dflow.elastic.enabled": False}
    settings.update(
        (key, yaml.safe_load(value))
        for key, value in (item.split("=", 1) for item in args.config)
    )
    with (
        dask.config.set(settings),
        StageCluster(
            args.model,
            {"encoder": 1, "dit": 1, "vae": 1},
            silence_logs=logging.WARNING,
            worker_options={"silence_logs": logging.WARNING},
        ) as cluster,
        Client(cluster) as client,
    ):
        for seed in range(3):
            dflow.submit(client, request.replace(seed=seed)).result()
        hops: dict[str, list[float]] = defaultdict(list)
        for seed in range(args.requests):
            for hop, ms in trace(client, cluster, request.replace(seed=seed)).items():
                hops[hop].append(ms)
    for hop, values in hops.items():
        print(f"{hop:55s} {statistics.median(values):7.2f} ms")


if __name__ == "__main__":
    main()
