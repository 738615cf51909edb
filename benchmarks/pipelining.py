"""Pipelining under a saturating burst: DiT busy fraction, idle gaps, per-hop wait.

A :class:`~dflow.cluster.StageCluster` (one encoder, ``--dit-workers`` DiT, one
VAE worker) serves a tiny model. For each ``--steps`` value, after warm-up:

1. ``--sequential`` requests one at a time: the per-hop hand-off with no queue.
2. A burst of ``--requests`` requests in one ``dflow.client.map`` call.

From the scheduler's task stream (compute intervals of every stage task), the
workers' ``transfer_incoming_log`` (which keys each transfer carried, when) and
dflow's telemetry records (cross-check of compute time) it derives:

- DiT busy fraction: denoise compute seconds / (last denoise end - first start),
  per DiT worker, and the idle gaps between consecutive denoise tasks;
- per-hop wait: encode end -> denoise start and denoise end -> decode start,
  split into fetch delay (upstream end -> transfer start), transfer, and queue
  (input present -> compute start);
- prefetch: how many denoise inputs were transferred while the DiT worker
  computed another request, and how many arrived before the worker was free.

The processes (scheduler and client in this one, three or more workers) share
the machine's cores; the CPU seconds each used are reported.

    python benchmarks/pipelining.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import dask
import dask.config
import distributed
from distributed import Client, get_task_stream, wait

from dflow.bench.env import machine
from dflow.client import map as submit_many
from dflow.cluster import StageCluster
from dflow.request import Request

STAGE_OF_PREFIX = {"encode": "encoder", "denoise": "dit", "decode": "vae"}
UPSTREAM = {"denoise": "encode", "decode": "denoise"}


# -- collection ---------------------------------------------------------------------


def transfer_log(dask_worker: distributed.Worker) -> list[dict[str, Any]]:
    return [
        {
            "start": entry["start"],
            "stop": entry["stop"],
            "keys": [str(k) for k in entry["keys"]],
            "total": entry["total"],
            "who": entry["who"],
        }
        for entry in dask_worker.transfer_incoming_log
    ]


def cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def telemetry_records(dask_scheduler: distributed.Scheduler) -> list[dict[str, Any]]:
    plugin = dask_scheduler.plugins.get("dflow-telemetry")
    return [asdict(r) for r in plugin.records] if plugin is not None else []


def cpu_snapshot(client: Client) -> dict[str, float]:
    names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    snapshot = {names[a]: s for a, s in client.run(cpu_seconds).items()}
    snapshot["client+scheduler"] = cpu_seconds()
    return snapshot


# -- analysis -----------------------------------------------------------------------


def stage_tasks(stream: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compute interval and worker of every stage task in the task stream."""
    tasks = {}
    for record in stream:
        key = str(record["key"])
        prefix, _, request = key.partition("-")
        computes = [s for s in record["startstops"] if s["action"] == "compute"]
        if prefix not in STAGE_OF_PREFIX or not computes:
            continue
        tasks[key] = {
            "prefix": prefix,
            "request": request,
            "worker": record["worker"],
            "start": computes[0]["start"],
            "stop": computes[-1]["stop"],
            "compute": sum(s["stop"] - s["start"] for s in computes),
        }
    return tasks


def input_transfers(logs: dict[str, list[dict[str, Any]]]) -> dict[str, dict]:
    """The transfer that brought each key to its consumer's worker: {key: entry}
    (each stage output has one consumer)."""
    found = {}
    for worker, entries in logs.items():
        for entry in entries:
            for key in entry["keys"]:
                found[key] = {**entry, "worker": worker, "nkeys": len(entry["keys"])}
    return found


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": float(np.percentile(values, 90)),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def analyse(
    tasks: dict[str, dict[str, Any]], transfers: dict[str, dict]
) -> dict[str, Any]:
    requests = {t["request"] for t in tasks.values()}
    hops: dict[str, dict[str, list[float]]] = {}
    for prefix, upstream in UPSTREAM.items():
        parts: dict[str, list[float]] = defaultdict(list)
        for request in requests:
            task = tasks.get(f"{prefix}-{request}")
            up = tasks.get(f"{upstream}-{request}")
            if task is None or up is None:
                continue
            parts["wait"].append(task["start"] - up["stop"])
            transfer = transfers.get(f"{upstream}-{request}")
            if transfer is None or transfer["worker"] != task["worker"]:
                parts["same_worker"].append(1.0)  # counted: no transfer needed
                continue
            parts["fetch_delay"].append(transfer["start"] - up["stop"])
            parts["transfer"].append(transfer["stop"] - transfer["start"])
            parts["queue"].append(task["start"] - transfer["stop"])
            parts["keys_per_transfer"].append(transfer["nkeys"])
            parts["bytes"].append(transfer["total"] / transfer["nkeys"])
        hops[f"{upstream}->{prefix}"] = {k: summary(v) for k, v in parts.items()}

    dit: dict[str, Any] = {}
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in tasks.values():
        if task["prefix"] == "denoise":
            by_worker[task["worker"]].append(task)
    for worker, runs in by_worker.items():
        runs.sort(key=lambda t: t["start"])
        busy = sum(t["compute"] for t in runs)
        window = runs[-1]["stop"] - runs[0]["start"]
        gaps = [b["start"] - a["stop"] for a, b in itertools.pairwise(runs)]
        overlapped = prefetched = waited_on_input = 0
        for previous, current in itertools.pairwise(runs):
            transfer = transfers.get(f"encode-{current['request']}")
            if transfer is None or transfer["worker"] != worker:
                continue
            if any(
                transfer["start"] < other["stop"] and transfer["stop"] > other["start"]
                for other in runs
                if other is not current
            ):
                overlapped += 1
            if transfer["stop"] <= previous["stop"]:
                prefetched += 1
            else:
                waited_on_input += 1
        dit[worker] = {
            "tasks": len(runs),
            "busy_s": busy,
            "window_s": window,
            "busy_fraction": busy / window if window > 0 else float("nan"),
            "gaps": summary(gaps),
            "idle_s": sum(gaps),
            "transfers_overlapping_compute": overlapped,
            "inputs_present_when_worker_freed": prefetched,
            "waited_on_input": waited_on_input,
        }
    workers: dict[str, Any] = {}
    for worker in {t["worker"] for t in tasks.values()}:
        runs = sorted(
            (t for t in tasks.values() if t["worker"] == worker),
            key=lambda t: t["start"],
        )
        workers[worker] = {
            "stage": runs[0]["prefix"],
            "tasks": len(runs),
            "compute_sum_s": sum(t["compute"] for t in runs),
            "busy_union_s": union_length([(t["start"], t["stop"]) for t in runs]),
            "window_s": max(t["stop"] for t in runs) - runs[0]["start"],
        }
    stage_compute = {
        prefix: summary([t["compute"] for t in tasks.values() if t["prefix"] == prefix])
        for prefix in STAGE_OF_PREFIX
    }
    return {
        "hops": hops,
        "dit": dit,
        "workers": workers,
        "stage_compute": stage_compute,
    }


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval (concurrent tasks count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


# -- phases -------------------------------------------------------------------------


def make_requests(model: str, steps: int, n: int, offset: int) -> list[Request]:
    return [
        Request(
            model=model,
            prompt=f"a lighthouse at dawn, take {offset + i}",
            steps=steps,
            seed=offset + i,
        )
        for i in range(n)
    ]


def run_phase(client: Client, requests: list[Request], burst: bool) -> dict[str, Any]:
    before_logs = {w: len(v) for w, v in client.run(transfer_log).items()}
    cpu_before = cpu_snapshot(client)
    with get_task_stream(client) as stream:
        start = time.perf_counter()
        latencies = []
        if burst:
            futures = submit_many(client, requests)
            done_at: dict[str, float] = {}
            for future in distributed.as_completed(futures):
                done_at[future.key] = time.perf_counter()
            latencies = [done_at[f.key] - start for f in futures]
            wait(futures)
            del futures
        else:
            for request in requests:
                begin = time.perf_counter()
                submit_many(client, [request])[0].result()
                latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - start
    cpu_after = cpu_snapshot(client)
    logs = {
        w: entries[before_logs.get(w, 0) :]
        for w, entries in client.run(transfer_log).items()
    }
    tasks = stage_tasks(stream.data)
    result = analyse(tasks, input_transfers(logs))
    keys = set(tasks)
    records = [
        r for r in client.run_on_scheduler(telemetry_records) if r["key"] in keys
    ]
    result["telemetry"] = {
        prefix: {
            "tasks": sum(1 for r in records if r["key"].startswith(prefix)),
            "compute_s": sum(
                r["compute_s"] for r in records if r["key"].startswith(prefix)
            ),
            "transfer_s": sum(
                r["transfer_s"] for r in records if r["key"].startswith(prefix)
            ),
        }
        for prefix in STAGE_OF_PREFIX
    }
    result["task_stream_compute_s"] = {
        prefix: sum(t["compute"] for t in tasks.values() if t["prefix"] == prefix)
        for prefix in STAGE_OF_PREFIX
    }
    result.update(
        requests=len(requests),
        elapsed_s=elapsed,
        requests_per_s=len(requests) / elapsed,
        latency=summary(latencies),
        cpu_s={k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after},
        cores_used=sum(cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after)
        / elapsed,
    )
    return result


# -- reporting ----------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def hop_cells(hop: dict[str, dict[str, float]]) -> str:
    cells = []
    for part in ("wait", "fetch_delay", "transfer", "queue"):
        s = hop.get(part, {})
        cells.append(
            f"{ms(s.get('median'))} / {ms(s.get('p90'))}" if s.get("n") else "-"
        )
    return " | ".join(cells)


def tables(runs: list[dict[str, Any]], label: str) -> str:
    out = [
        f"**DiT busy fraction under a burst ({label})**\n",
        "| steps | requests | req/s | DiT worker | denoise tasks | busy s | window s "
        "| busy fraction | idle gaps median / p90 / max ms | inputs transferred during another denoise "
        "| input present when DiT freed | cores used (all processes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        burst = run["burst"]
        for worker, d in burst["dit"].items():
            g = d["gaps"]
            out.append(
                f"| {run['steps']} | {burst['requests']} | {burst['requests_per_s']:.1f} "
                f"| {run['names'].get(worker, worker)} | {d['tasks']} | {d['busy_s']:.2f} "
                f"| {d['window_s']:.2f} | **{d['busy_fraction']:.1%}** "
                f"| {ms(g.get('median'))} / {ms(g.get('p90'))} / {ms(g.get('max'))} "
                f"| {d['transfers_overlapping_compute']}/{d['tasks'] - 1} "
                f"| {d['inputs_present_when_worker_freed']}/{d['tasks'] - 1} "
                f"| {burst['cores_used']:.2f} |"
            )
    out += [
        f"\n**Per-hop wait, median / p90 ms ({label})**\n",
        "| steps | phase | hop | wait (upstream end → compute start) | fetch delay "
        "| transfer | queue (input present → start) | bytes per input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for phase in ("sequential", "burst"):
            for hop, parts in run[phase]["hops"].items():
                size = parts.get("bytes", {}).get("median")
                out.append(
                    f"| {run['steps']} | {phase} | {hop} | {hop_cells(parts)} "
                    f"| {'-' if size is None else f'{size / 1e3:.1f} kB'} |"
                )
    out += [
        f"\n**Stage workers during the burst ({label})**\n",
        "| steps | worker | tasks | sum of task compute s | busy (union of task "
        "intervals) s | window s | busy / window | process CPU s | CPU / busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        burst = run["burst"]
        for worker, w in sorted(
            burst["workers"].items(), key=lambda item: run["names"].get(item[0], "")
        ):
            name = run["names"].get(worker, worker)
            cpu = burst["cpu_s"].get(name)
            share = "-" if cpu is None else f"{cpu / w['busy_union_s']:.0%}"
            out.append(
                f"| {run['steps']} | {name} | {w['tasks']} | {w['compute_sum_s']:.2f} "
                f"| {w['busy_union_s']:.2f} | {w['window_s']:.2f} "
                f"| {w['busy_union_s'] / w['window_s']:.0%} "
                f"| {'-' if cpu is None else f'{cpu:.2f}'} "
                f"| {share} |"
            )
    out += [
        f"\n**Stage compute per task, median ms ({label})**\n",
        "| steps | phase | encode | denoise | decode | telemetry denoise compute s "
        "| task-stream denoise compute s | latency median / p90 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for phase in ("sequential", "burst"):
            r = run[phase]
            c = r["stage_compute"]
            out.append(
                f"| {run['steps']} | {phase} | {ms(c['encode'].get('median'))} "
                f"| {ms(c['denoise'].get('median'))} | {ms(c['decode'].get('median'))} "
                f"| {r['telemetry']['denoise']['compute_s']:.3f} "
                f"| {r['task_stream_compute_s']['denoise']:.3f} "
                f"| {r['latency']['median']:.3f} / {r['latency']['p90']:.3f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="20-request burst, 3 sequential"
    )
    parser.add_argument("--model", default="tiny-pixart")
    parser.add_argument("--steps", default="4,20", help="comma-separated steps values")
    parser.add_argument("--requests", type=int, default=None, help="burst size (100)")
    parser.add_argument(
        "--sequential", type=int, default=None, help="one at a time (10)"
    )
    parser.add_argument("--dit-workers", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    burst_size = args.requests or (20 if args.quick else 100)
    sequential = args.sequential or (3 if args.quick else 10)
    steps_values = [int(s) for s in args.steps.split(",")]
    host = machine()
    layout = {"encoder": 1, "dit": args.dit_workers, "vae": 1}
    started = time.perf_counter()
    runs = []
    with (
        dask.config.set(
            {
                "dflow.client.model-timeout": "600s",
                # fixed pools: no role switching during the measurement
                "dflow.elastic.enabled": False,
                "distributed.scheduler.dashboard.status.task-stream-length": 100_000,
            }
        ),
        StageCluster(
            args.model,
            layout,
            silence_logs=logging.ERROR,
            worker_options={"silence_logs": logging.ERROR},
        ) as cluster,
        Client(cluster) as client,
    ):
        workers = client.scheduler_info()["workers"]
        names = {a: w["name"] for a, w in workers.items()}
        offset = 0
        for steps in steps_values:
            # warm-up: first requests pay for lazy imports and first transfers
            warm = make_requests(args.model, steps, 3, offset)
            client.gather(submit_many(client, warm))
            offset += 3
            startup_s = time.perf_counter() - started
            seq = run_phase(
                client, make_requests(args.model, steps, sequential, offset), False
            )
            offset += sequential
            burst = run_phase(
                client, make_requests(args.model, steps, burst_size, offset), True
            )
            offset += burst_size
            runs.append(
                {
                    "steps": steps,
                    "sequential": seq,
                    "burst": burst,
                    "names": names,
                    "startup_s": startup_s,
                }
            )
    label = f"CPU, loopback, {args.model}, layout {layout}, {os.cpu_count()} cores shared by all processes"
    result = {
        "benchmark": "pipelining",
        "command": " ".join([sys.executable, *sys.argv]),
        "model": args.model,
        "layout": layout,
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"pipelining-{args.model}-dit{args.dit_workers}{'-quick' if args.quick else ''}.json"
    path = args.out / name
    path.write_text(json.dumps(result, indent=1))
    print(tables(runs, label))
    print(f"\nload average start {host['loadavg_start']}, end {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
