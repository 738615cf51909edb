"""End-to-end latency on one GPU: dflow's disaggregated path against a bare
diffusers pipeline call, on real-size architectures with random weights.

1. A bare ``FluxPipeline`` (all components resident on the GPU) generates a
   1024px image; the median of ``--repeats`` warm calls is the baseline.
2. A :class:`~dflow.cluster.StageCluster` with one encoder, one DiT and one VAE
   worker process, all on the same GPU, serves the same request (same seed)
   through ``dflow.submit``; embeddings and latents move between the processes
   over TCP (CUDA tensors staged through host memory) or, with ``--protocol
   ucx``, over UCX (CUDA tensors as device buffers; ``distributed-ucxx``).
3. A burst of ``--burst`` requests: the DiT worker's busy fraction and the
   per-hop waits, from the scheduler's telemetry.

Usage (on a CUDA machine)::

    python benchmarks/gpu.py --model flux.1-dev --out results/
    python benchmarks/gpu.py --model flux.1-dev --protocol ucx --out results/
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from gpu_transport import UCX_CONFIG

import dask.config
from distributed import Client, wait

import dflow
from dflow import presets
from dflow.cluster import StageCluster
from dflow.spec import STAGES


def bare_pipeline(
    request: dflow.Request, repeats: int
) -> tuple[list[float], np.ndarray]:
    """Seconds per warm call of the stock pipeline, and its last output's pixels."""
    spec = request.spec
    cuda = torch.cuda.is_available()
    # the precision dflow's runtimes pick (float32 on CPU, for dry runs)
    dtype = getattr(torch, spec.dtype) if cuda else torch.float32
    pipe = presets.build(request.model, STAGES, "cuda" if cuda else "cpu", dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=request.prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        max_sequence_length=spec.max_sequence_length,
        output_type="pil",
    )
    pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request.seed))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        image = pipe(
            **kwargs, generator=torch.Generator("cpu").manual_seed(request.seed)
        )
        seconds.append(time.perf_counter() - start)  # the PIL output synchronizes
    pixels = np.asarray(image.images[0])
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return seconds, pixels


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each of this process's threads so far, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return {
        f"{names.get(t.id, 'native')}-{t.id}": t.user_time + t.system_time
        for t in psutil.Process().threads()
    }


def cpu_during(before: dict, after: dict) -> dict:
    """Per worker, the threads that used more than 0.1 CPU s between two samples."""
    return {
        worker: {
            thread: round(seconds - before.get(worker, {}).get(thread, 0.0), 2)
            for thread, seconds in threads.items()
            if seconds - before.get(worker, {}).get(thread, 0.0) > 0.1
        }
        for worker, threads in after.items()
    }


def disaggregated(
    request: dflow.Request,
    repeats: int,
    burst: int,
    protocol: str,
    overrides: dict,
) -> tuple[list[float], np.ndarray, dict]:
    """Seconds per warm request through dflow, its pixels, and burst telemetry."""
    settings = {"dflow.client.model-timeout": "900s", "dflow.elastic.enabled": False}
    if protocol == "ucx":
        settings.update(UCX_CONFIG)
    settings.update(overrides)
    with (
        dask.config.set(settings),
        StageCluster(
            request.model,
            {"encoder": 1, "dit": 1, "vae": 1},
            protocol=protocol,
            silence_logs=logging.WARNING,
            worker_options={"silence_logs": logging.WARNING},
        ) as cluster,
        Client(cluster) as client,
    ):
        dflow.submit(client, request.replace(steps=2)).result()
        telemetry = cluster.scheduler.plugins["dflow-telemetry"]
        seconds, singles = [], []
        for _ in range(repeats):
            first = len(telemetry.records)
            start = time.perf_counter()
            output = dflow.submit(client, request).result()
            seconds.append(time.perf_counter() - start)
            singles.append(request_stages(list(telemetry.records)[first:]))
        pixels = output.array[0]
        first = len(telemetry.records)
        cpu_before = client.run(thread_cpu_s)
        start = time.time()
        futures = dflow.map(client, [request.replace(seed=s) for s in range(burst)])
        wait(futures)
        elapsed = time.time() - start
        records = list(telemetry.records)[first:]
        summary = burst_summary(records, elapsed, burst)
        summary["thread_cpu_s"] = cpu_during(cpu_before, client.run(thread_cpu_s))
        summary["single_stages"] = singles
        return seconds, pixels, summary


def request_stages(records: list) -> dict:
    """One request's compute and input-transfer seconds per stage, to tell a slow
    request's stage from the time between stages."""
    return {
        r.stage: {
            "compute_s": round(r.compute_s, 4),
            "transfer_s": round(r.transfer_s, 4),
        }
        for r in records
    }


def burst_summary(records: list, elapsed: float, burst: int) -> dict:
    """DiT busy fraction and per-hop waits of a burst, from stage-task records."""
    by_stage: dict[str, list] = {s: [] for s in STAGES}
    for record in records:
        by_stage[record.stage].append(record)
    dit = sorted(by_stage["dit"], key=lambda r: r.finished)
    busy = sum(r.compute_s for r in dit)
    window = dit[-1].finished - (dit[0].finished - dit[0].compute_s)
    return {
        "requests": burst,
        "throughput_rps": burst / elapsed,
        "dit_busy_fraction": busy / window,
        "compute_s_median": {
            stage: statistics.median(r.compute_s for r in by_stage[stage])
            for stage in STAGES
        },
        "transfer_s_median": {
            stage: statistics.median(r.transfer_s for r in by_stage[stage])
            for stage in ("dit", "vae")
        },
        "bytes_median": {
            stage: statistics.median(r.nbytes for r in by_stage[stage])
            for stage in STAGES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux.1-dev")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--protocol", default="tcp", choices=("tcp", "ucx"))
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dask config setting for the cluster (repeatable; VALUE is YAML)",
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    overrides = {
        key: yaml.safe_load(value)
        for key, value in (item.split("=", 1) for item in args.config)
    }
    request = dflow.Request(
        model=args.model,
        prompt="a lighthouse on a cliff at dawn",
        seed=7,
        steps=args.steps,
    )
    started = time.perf_counter()
    bare, bare_pixels = bare_pipeline(request, args.repeats)
    print(
        f"bare pipeline: {[round(s, 3) for s in bare]} ({time.perf_counter() - started:.0f}s in)",
        flush=True,
    )
    served, served_pixels, burst = disaggregated(
        request, args.repeats, args.burst, args.protocol, overrides
    )
    print(
        f"dflow: {[round(s, 3) for s in served]} ({time.perf_counter() - started:.0f}s in)",
        flush=True,
    )
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "protocol": args.protocol,
        "config": overrides,
        "request": {
            "height": request.height,
            "width": request.width,
            "steps": request.steps,
        },
        "bare_s": bare,
        "dflow_s": served,
        "ratio": statistics.median(served) / statistics.median(bare),
        "max_pixel_difference": int(
            np.abs(bare_pixels.astype(int) - served_pixels.astype(int)).max()
        ),
        "burst": burst,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{args.model}" + ("" if args.protocol == "tcp" else f"-{args.protocol}")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
