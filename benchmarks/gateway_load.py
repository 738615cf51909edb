"""The HTTP gateway under load: overhead over ``dflow.submit``, 200 concurrent
clients, and the encoder calls shared prompt encodings save.

A real cluster (``dask scheduler`` and one ``dflow-worker`` per stage of
``--model``, processes on 127.0.0.1) and one ``dflow serve`` process in front.
Requests are the model's smallest image at one step, so the serving path, not
the model, takes the time. Three phases:

1. **overhead**: requests one at a time, alternating between ``dflow.submit``
   from this process (a Dask client; the PNG comes back in the ``Output``) and
   ``POST /v1/images/generations`` (b64 PNG); each is timed from building the
   request (``dflow.Request`` or the HTTP body) to holding the PNG. The
   gateway's overhead is the difference of their latency percentiles.
2. **load**: ``--clients`` asyncio clients (``httpx.AsyncClient``) send
   ``--requests`` requests in all, each with its own seed, while the scheduler
   admits ``--max-outstanding`` requests at a time and the gateway waits for no
   room: beyond it the gateway answers 429 and the client retries after
   ``Retry-After``. Any other error, a lost request or a duplicate fails the run.
3. **shared encodings**: a trace of ``--trace`` requests drawn (seeded) from
   ``--prompts`` prompts sent by the same clients; the encode tasks the cluster
   ran, from its task stream, against one per request without sharing.

    python benchmarks/gateway_load.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import dask
import dask.config
import distributed
from distributed import Client, get_task_stream

import dflow
from dflow.bench.harness import revision
from dflow.testing import (
    gateway_process,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

STAGES = ("encoder", "dit", "vae")
PROMPTS = (
    "a lighthouse on a cliff at dawn",
    "a red fox in fresh snow",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on mars",
    "a watercolor of a quiet harbor",
)


def body(model: str, prompt: str, seed: int, size: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "size": f"{size}x{size}",
        "num_inference_steps": 1,
        "seed": seed,
    }


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1000
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "mean_ms": float(array.mean()),
        "min_ms": float(array.min()),
    }


def overhead(client: Client, url: str, model: str, size: int, n: int) -> dict:
    """Latency of one request at a time, direct and through the gateway, taking
    turns so that a drifting load hits both alike."""
    direct, http = [], []
    with httpx.Client(base_url=url, timeout=120) as session:
        for i in range(n):
            start = time.perf_counter()
            request = dflow.Request(
                model=model,
                prompt=PROMPTS[0],
                height=size,
                width=size,
                steps=1,
                seed=10_000 + i,
                output_format="png",
            )
            dflow.submit(client, request).result()
            direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            response = session.post(
                "/images/generations", json=body(model, PROMPTS[0], 20_000 + i, size)
            )
            http.append(time.perf_counter() - start)
            response.raise_for_status()
    result = {"direct": percentiles(direct), "gateway": percentiles(http)}
    result["overhead_p50_ms"] = result["gateway"]["p50_ms"] - result["direct"]["p50_ms"]
    result["overhead_p99_ms"] = result["gateway"]["p99_ms"] - result["direct"]["p99_ms"]
    return result


async def drive(url: str, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Send ``bodies`` from ``clients`` concurrent clients, retrying 429s after
    their Retry-After; every other answer but 200 is an error."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    done: Counter[int] = Counter()
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    # idle connections close before uvicorn's keep-alive timeout (5 s) does, so
    # none is reused as the server hangs up on it
    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2
    )

    async def one_client(session: httpx.AsyncClient) -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                while True:
                    response = await session.post("/images/generations", json=item)
                    statuses[response.status_code] += 1
                    if response.status_code != 429:
                        break
                    await asyncio.sleep(float(response.headers["retry-after"]))
            except httpx.TransportError as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if response.status_code == 200 and len(response.json()["data"]) == 1:
                done[item["seed"]] += 1
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
    wall = time.perf_counter() - start
    seeds = Counter(item["seed"] for item in bodies)
    return {
        "clients": clients,
        "requests": len(bodies),
        "completed": sum(done.values()),
        "lost": sum(1 for s in seeds if s not in done),
        "duplicated": sum(1 for s, n in done.items() if n > seeds[s]),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors[:10],
        "error_count": len(errors),
        "wall_s": wall,
        "requests_per_s": len(bodies) / wall,
        "latency_incl_retries": percentiles(latencies) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=16, help="image side, pixels")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--overhead-requests", type=int, default=200)
    parser.add_argument("--max-outstanding", type=int, default=32)
    parser.add_argument("--trace", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.overhead_requests, args.trace = 200, 20, 100
    rng = random.Random(0)
    subjects = ("a fox", "a cat", "an owl", "a bee", "an elk", "a crab", "a wolf")
    places = ("in snow", "in rain", "at sea", "at dusk", "in a field", "on a roof")
    prompts = [f"{s} {p}" for p in places for s in subjects][: args.prompts]
    for prompt in prompts:  # within the model's limits, or fail now
        dflow.Request(model=args.model, prompt=prompt)
    scheduler_env = {
        "DASK_DFLOW__ELASTIC__ENABLED": "False",
        "DASK_DFLOW__ADMISSION__MAX_OUTSTANDING": str(args.max_outstanding),
    }
    gateway_env = {
        "DASK_DFLOW__ADMISSION__TIMEOUT": "0s",
        "DASK_DFLOW__GATEWAY__RETRY_AFTER": "1s",
    }
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="dflow-gateway-load-") as folder,
        dask.config.set({"dflow.admission.timeout": "600s"}),
        scheduler_process(env=scheduler_env, log_dir=folder) as address,
        worker_processes(
            address,
            [(s, args.model) for s in STAGES],
            env=scheduler_env,
            log_dir=folder,
        ) as workers,
        Client(address) as client,
    ):
        wait_for_pools(client, {args.model: STAGES}, processes=workers)
        with gateway_process(address, env=gateway_env, log_dir=folder) as (url, _):
            # warm up both paths (connections, tokenizers, first calls)
            overhead(client, url, args.model, args.size, 3)
            phases: dict[str, Any] = {
                "overhead": overhead(
                    client, url, args.model, args.size, args.overhead_requests
                )
            }
            bodies = [
                body(args.model, PROMPTS[i % len(PROMPTS)], 100_000 + i, args.size)
                for i in range(args.requests)
            ]
            phases["load"] = asyncio.run(drive(url, bodies, args.clients))
            trace = [
                body(args.model, rng.choice(prompts), 200_000 + i, args.size)
                for i in range(args.trace)
            ]
            with get_task_stream(client=client) as stream:
                phases["shared"] = asyncio.run(drive(url, trace, args.clients))
            encodes = sum(1 for r in stream.data if str(r["key"]).startswith("encode-"))
            phases["shared"].update(
                {
                    "distinct_prompts": len({b["prompt"] for b in trace}),
                    "encode_tasks": encodes,
                    "encoder_calls_saved": 1 - encodes / len(trace),
                }
            )
    result = {
        "args": vars(args),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "revision": revision(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **phases,
    }
    report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gateway_load.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    for name in ("load", "shared"):
        phase = phases[name]
        if phase["error_count"] or phase["lost"] or phase["duplicated"]:
            sys.exit(f"the {name} phase had errors, lost or duplicated requests")


def report(result: dict[str, Any]) -> None:
    o, load, shared = result["overhead"], result["load"], result["shared"]
    print(f"CPU ({result['cpus']} cores), load average {result['load_average_before']}")
    print(
        "\n| one request at a time | n | p50 ms | p99 ms | min ms |\n|---|---|---|---|---|"
    )
    for name in ("direct", "gateway"):
        p = o[name]
        label = "dflow.submit" if name == "direct" else "gateway (HTTP, b64 PNG)"
        print(
            f"| {label} | {p['n']} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['min_ms']:.1f} |"
        )
    print(
        f"\ngateway overhead: p50 {o['overhead_p50_ms']:.1f} ms, p99 {o['overhead_p99_ms']:.1f} ms"
    )
    print(
        f"\n{load['clients']} clients, {load['requests']} requests: {load['completed']} "
        f"completed, {load['lost']} lost, {load['duplicated']} duplicated, "
        f"{load['error_count']} errors; answers {load['statuses']}; "
        f"{load['requests_per_s']:.1f} requests/s"
    )
    print(
        f"shared encodings: {shared['requests']} requests of {shared['distinct_prompts']} "
        f"prompts ran {shared['encode_tasks']} encode tasks "
        f"({shared['encoder_calls_saved']:.0%} of encoder calls saved); answers "
        f"{shared['statuses']}"
    )


if __name__ == "__main__":
    main()
