"""glibc allocator settings against torch's stage calls, one process per setting.

distributed's Nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``). Setting any ``MALLOC_*_THRESHOLD_``
fixes glibc's mmap threshold at its 128 KiB default instead of letting it grow,
so every tensor above it is a fresh ``mmap`` (page faults on first touch) and
``munmap`` on free. This script starts one process per ``--variants`` setting
(the environment is set before the process starts, as the Nanny does), each
with the tiny Flux folder's whole pipeline on one torch thread, and sends them
the same requests in turns (order reversed every other round), so a drifting
load hits them alike. Per setting: the median of each stage call and of their
sum, and the process's RSS at the end.

    python benchmarks/allocator.py --calls 30 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from pathlib import Path
from typing import Any

#: Allocator environments: variables set on top of glibc's defaults
VARIANTS: dict[str, dict[str, str]] = {
    "unset": {},
    "nanny": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "nanny+mmap64m": {
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    },
    "trim64m+mmap64m": {
        "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
        "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    },
    "trim1m": {"MALLOC_TRIM_THRESHOLD_": str(2**20)},
}


def serve(conn: Any, folder: str) -> None:
    """A process's loop: requests in, stage-call seconds out."""
    import psutil
    import torch

    import dask.config

    from dflow import runtime
    from dflow.request import Request

    torch.set_num_threads(1)
    # every call encodes its prompt (all calls repeat it)
    dask.config.set({"dflow.runtime.encoding-cache": 0})
    stages = runtime.StageRuntime(folder, "all")
    stages.warmup()
    while (message := conn.recv()) is not None:
        steps, seed = message
        request = Request(
            model=folder,
            prompt="a lighthouse at dawn",
            height=64,
            width=64,
            steps=steps,
            seed=seed,
        )
        timings = stages.generate(request).timings
        conn.send({k: timings[k] for k in ("encode", "denoise", "decode")})
    conn.send(psutil.Process().memory_info().rss)


def start(variant: str, folder: str) -> tuple[Any, Any]:
    """A process with ``variant``'s environment from its first instruction."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    saved = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(VARIANTS[variant])
    try:
        process = context.Process(target=serve, args=(child, folder), daemon=True)
        process.start()
    finally:
        for key in [k for k in os.environ if k.startswith("MALLOC_")]:
            del os.environ[key]
        os.environ.update(saved)
    return process, parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="requests per setting")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)

    from dflow.bench.env import machine
    from dflow.presets import folder as preset_folder

    host = machine()
    folder = preset_folder("tiny-flux")
    names = args.variants.split(",")
    processes = {name: start(name, folder) for name in names}
    calls: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(args.calls):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            _, conn = processes[name]
            conn.send((args.steps, index))
            calls[name].append(conn.recv())
    results = {}
    for name in names:
        process, conn = processes[name]
        conn.send(None)
        rss = conn.recv()
        process.join()
        own = calls[name]
        medians = {
            stage: statistics.median(c[stage] for c in own) * 1e3
            for stage in ("encode", "denoise", "decode")
        }
        total = statistics.median(sum(c.values()) for c in own) * 1e3
        results[name] = {
            "environment": VARIANTS[name],
            "median_ms": {**medians, "sum": total},
            "rss_mb": rss / 2**20,
            "calls_ms": [{k: v * 1e3 for k, v in c.items()} for c in own],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "allocator.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "allocator",
                "command": " ".join([sys.executable, *sys.argv]),
                "label": "CPU, one torch thread per process",
                "machine": {**host, "loadavg_end": os.getloadavg()},
                "settings": vars(args) | {"out": str(args.out)},
                "results": results,
            },
            indent=1,
        )
    )
    print("| setting | encode | denoise | decode | sum of stage calls ms | RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        m = r["median_ms"]
        print(
            f"| {name} | {m['encode']:.1f} | {m['denoise']:.1f} | {m['decode']:.1f} "
            f"| **{m['sum']:.1f}** | {r['rss_mb']:.0f} |"
        )
    print(f"\nload average start {host['loadavg_start']}, end {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
