"""dflow against Ray Serve, the peer a user would pick, on the same stages and requests.

Every system serves the same tiny Flux folder (``dflow.presets.folder("tiny-flux")``,
named by its path, so the stock pipeline's defaults apply: 512 T5 tokens) and the
same 64x64 requests, at each ``--steps`` value:

- ``bare``: the three stages called one after another in one process of their own
  (diffusers' ``FluxPipeline`` cut at ``prompt_embeds=`` and ``output_type="latent"``,
  the code below a user writes), timed there: the floor every serving system's
  overhead is measured from.
- ``dflow[ENV]``: a :class:`~dflow.cluster.StageCluster` at its defaults (one
  encoder, ``--dit`` DiT, one VAE worker), one per ``--worker-env`` variant: the
  allocator environment distributed's Nanny gives its workers
  (``distributed.nanny.pre-spawn-environ``, passed through dask config).
- ``ray-plain``: Ray Serve as a user first writes it: one deployment per stage
  (sync methods, default options) and an ingress deployment that awaits each
  stage's ``DeploymentHandle`` in turn.
- ``ray-tuned``: Ray Serve tuned for the job: ``@serve.batch`` on the encoder and
  the VAE, a one-thread queue in front of the DiT (requests wait in the replica
  with their inputs fetched), and an ingress that chains the stages by passing
  ``DeploymentResponse`` objects, with room for a whole burst in flight.

CPU budget: every stage worker or replica computes on one thread. dflow's workers
get ``OMP_NUM_THREADS=1`` from the Nanny (torch reads it), Ray's replicas and the
bare process call ``torch.set_num_threads(1)``; ``probe`` records each process's torch
threads and ``MALLOC_*`` environment. All processes share the machine's cores.

The clusters of one ``--dit`` value stay up together and the systems take turns in
``--pairs`` rounds (order reversed every other round), so a drifting load hits them
alike. Per round and system: single-request latency (``--single`` requests one at a
time, and its overhead over ``bare`` in the same round), then a burst of ``--burst``
requests submitted at once (throughput, p50/p95 latency from submission), the
largest pixel difference of every output from the stock pipeline's for the same
prompt and seed, and errors. After the rounds: the RSS (and PSS) of every process of
each system. Ratios dflow / ray-tuned per round are printed and written with the
raw figures to ``--out``/peers.json.

    pip install -e ".[bench]"
    python benchmarks/peers.py --pairs 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import dask
import dask.config
from distributed import Client, as_completed

import dflow
from dflow.bench.env import machine
from dflow.cluster import StageCluster
from dflow.presets import folder as preset_folder
from dflow.request import Request

PRESET = "tiny-flux"
GUIDANCE = 3.5
MAX_SEQUENCE_LENGTH = 512
#: Components each stage loads; the others are passed as None to from_pretrained.
COMPONENTS = {
    "encoder": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "dit": ("transformer",),
    "vae": ("vae",),
}
#: Allocator environment of dflow's workers: changes to distributed's
#: ``distributed.nanny.pre-spawn-environ`` (None removes a variable); ``dflow``
#: keeps what dflow ships (``dflow.worker.pre-spawn-environ``).
WORKER_ENVS: dict[str, dict[str, int | None] | None] = {
    "dflow": None,
    # distributed's default: MALLOC_TRIM_THRESHOLD_=65536
    "nanny": {},
    # glibc's defaults (dynamic mmap and trim thresholds)
    "unset": {"MALLOC_TRIM_THRESHOLD_": None},
    # the Nanny's trim threshold, with large blocks kept off mmap
    "mmap64m": {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20},
}


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    steps: int
    height: int = 64
    width: int = 64


def jobs_of(prefix: str, n: int, steps: int, first_seed: int) -> list[Job]:
    return [Job(f"{prefix} {i}", first_seed + i, steps) for i in range(n)]


# -- the stages as a user writes them on diffusers (bare and Ray) -------------------


class FluxStages:
    """Encode, denoise and decode on diffusers' FluxPipeline, loading only the
    components of ``stages``, computing on one thread."""

    def __init__(self, folder: str, stages: tuple[str, ...] = tuple(COMPONENTS)):
        from diffusers import FluxPipeline

        torch.set_num_threads(1)
        skipped = {
            name: None
            for stage, names in COMPONENTS.items()
            if stage not in stages
            for name in names
        }
        self.pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32, **skipped)
        self.pipe.set_progress_bar_config(disable=True)

    def encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH
            )
        return [
            # copies: a view would carry the whole batch's storage when pickled
            {
                "prompt_embeds": embeds[i : i + 1].clone(),
                "pooled": pooled[i : i + 1].clone(),
            }
            for i in range(len(prompts))
        ]

    def denoise(self, embeddings: dict[str, torch.Tensor], job: Job) -> torch.Tensor:
        with torch.inference_mode():
            (latents,) = self.pipe(
                prompt_embeds=embeddings["prompt_embeds"],
                pooled_prompt_embeds=embeddings["pooled"],
                height=job.height,
                width=job.width,
                num_inference_steps=job.steps,
                guidance_scale=GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="latent",
                return_dict=False,
            )
        return latents

    def decode(self, latents: list[torch.Tensor], jobs: list[Job]) -> list[np.ndarray]:
        """uint8 pixels (H, W, 3) per job; jobs of one batch share a size."""
        pipe, vae = self.pipe, self.pipe.vae
        job = jobs[0]
        with torch.inference_mode():
            batch = pipe._unpack_latents(
                torch.cat(latents), job.height, job.width, pipe.vae_scale_factor
            )
            batch = batch / vae.config.scaling_factor + vae.config.shift_factor
            pixels = vae.decode(batch, return_dict=False)[0]
        images = pipe.image_processor.postprocess(pixels, output_type="np")
        return list((images * 255).round().astype(np.uint8))

    def generate(self, job: Job) -> np.ndarray:
        (embeddings,) = self.encode([job.prompt])
        return self.decode([self.denoise(embeddings, job)], [job])[0]

    def stock(self, job: Job) -> np.ndarray:
        """The stock pipeline's pixels (a full pipeline only): the reference."""
        image = self.pipe(
            prompt=job.prompt,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images[0]
        return np.asarray(image.convert("RGB"))


def probe() -> dict[str, Any]:
    """What this process computes with: torch threads and allocator environment."""
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


# -- systems ------------------------------------------------------------------------


class Bare:
    """The stages called one after another in a process of their own (so that
    nothing else in it competes for the interpreter), timed there; it also makes
    the stock pipeline's reference pixels."""

    name = "bare"

    def __init__(self, folder: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=bare_process, args=(child, folder), daemon=True
        )
        self.process.start()

    def call(self, *message: Any) -> Any:
        self.conn.send(message)
        return self.conn.recv()

    def single(self, job: Job) -> tuple[np.ndarray, float]:
        return self.call("generate", job)

    def stock(self, job: Job) -> np.ndarray:
        return self.call("stock", job)

    def probe(self) -> dict[str, Any]:
        return self.call("probe")

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process.pid else []

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def bare_process(conn: Any, folder: str) -> None:
    stages = FluxStages(folder)
    while (message := conn.recv()) is not None:
        command, *arguments = message
        if command == "generate":
            start = time.perf_counter()
            pixels = stages.generate(*arguments)
            conn.send((pixels, time.perf_counter() - start))
        elif command == "stock":
            conn.send(stages.stock(*arguments))
        else:
            conn.send(probe())


class Dflow:
    """A StageCluster at its defaults, its workers in one allocator environment."""

    def __init__(self, folder: str, env: str, dit: int):
        self.name = f"dflow[{env}]"
        self.folder = folder
        with worker_environment(WORKER_ENVS[env]):
            self.cluster = StageCluster(
                folder,
                {"encoder": 1, "dit": dit, "vae": 1},
                silence_logs=logging.ERROR,
                worker_options={"silence_logs": logging.ERROR},
            )
        self.client = Client(self.cluster)
        #: Output.timings of single requests: the stage calls inside the workers
        self.timings: list[dict[str, float]] = []

    def request(self, job: Job) -> Request:
        return Request(
            model=self.folder,
            prompt=job.prompt,
            height=job.height,
            width=job.width,
            steps=job.steps,
            guidance_scale=GUIDANCE,
            seed=job.seed,
        )

    def single(self, job: Job) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        output = dflow.submit(self.client, self.request(job)).result()
        seconds = time.perf_counter() - start
        self.timings.append({**output.timings, "steps": job.steps})
        return output.array[0], seconds

    def burst(self, jobs: list[Job]) -> tuple[list[Any], list[float], float]:
        requests = [self.request(job) for job in jobs]
        start = time.perf_counter()
        futures = dflow.map(self.client, requests)
        index = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(jobs)
        latencies = [0.0] * len(jobs)
        for future in as_completed(futures):
            i = index[future.key]
            latencies[i] = time.perf_counter() - start
            if future.status == "finished":
                results[i] = future.result().array[0]
            else:
                results[i] = future.exception()
        return results, latencies, time.perf_counter() - start

    def probe(self) -> dict[str, Any]:
        return self.client.run(probe)

    def pids(self) -> list[int]:
        return [p["pid"] for p in self.probe().values()]

    def decisions(self) -> int:
        return len(dflow.status(self.client)["decisions"])

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


@contextlib.contextmanager
def worker_environment(changes: dict[str, int | None] | None) -> Iterator[None]:
    """Start Nannies with ``changes`` to ``distributed.nanny.pre-spawn-environ``,
    or with dflow's own worker environment where ``changes`` is None.

    The Nanny also copies that environment into this process's ``os.environ``
    before spawning (and the process's values override the config), so the
    ``MALLOC_*`` variables here are cleared for the start and restored after.
    """
    # each round repeats the prompts: encode them as the peers do
    settings: dict[str, object] = {"dflow.runtime.encoding-cache": 0}
    if changes is not None:
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        for key, value in changes.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        settings["distributed.nanny.pre-spawn-environ"] = environ
        # the variant decides the MALLOC_* variables, not dflow's defaults
        settings["dflow.worker.pre-spawn-environ"] = {}
    saved = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    for key in saved:
        del os.environ[key]
    try:
        with dask.config.set(settings):
            yield
    finally:
        for key in [k for k in os.environ if k.startswith("MALLOC_")]:
            del os.environ[key]
        os.environ.update(saved)


def ray_app(folder: str, tuned: bool, dit: int) -> Any:
    """The Ray Serve application of the three stages, plain or tuned."""
    from ray import serve

    replica = {"ray_actor_options": {"num_cpus": 0.1}}

    class Stage:
        def probe(self) -> dict[str, Any]:
            return probe()

    if not tuned:

        @serve.deployment(**replica)
        class Encoder(Stage):
            def __init__(self):
                self.stages = FluxStages(folder, ("encoder",))

            def __call__(self, prompt: str) -> dict[str, torch.Tensor]:
                return self.stages.encode([prompt])[0]

        @serve.deployment(num_replicas=dit, **replica)
        class DiT(Stage):
            def __init__(self):
                self.stages = FluxStages(folder, ("dit",))

            def __call__(self, embeddings: dict, job: Job) -> torch.Tensor:
                return self.stages.denoise(embeddings, job)

        @serve.deployment(**replica)
        class VAE(Stage):
            def __init__(self):
                self.stages = FluxStages(folder, ("vae",))

            def __call__(self, latents: torch.Tensor, job: Job) -> np.ndarray:
                return self.stages.decode([latents], [job])[0]

        @serve.deployment(**replica)
        class Text2Image:
            def __init__(self, encoder, dit, vae):
                self.encoder, self.dit, self.vae = encoder, dit, vae

            async def __call__(self, job: Job) -> np.ndarray:
                embeddings = await self.encoder.remote(job.prompt)
                latents = await self.dit.remote(embeddings, job)
                return await self.vae.remote(latents, job)

        return Text2Image.bind(Encoder.bind(), DiT.bind(), VAE.bind())

    batching = {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}

    @serve.deployment(max_ongoing_requests=16, **replica)
    class BatchedEncoder(Stage):
        def __init__(self):
            self.stages = FluxStages(folder, ("encoder",))

        async def __call__(self, prompt: str) -> dict:
            return await self.encode(prompt)

        @serve.batch(**batching)
        async def encode(self, prompts: list[str]) -> list[dict]:
            return await asyncio.to_thread(self.stages.encode, prompts)

    @serve.deployment(num_replicas=dit, max_ongoing_requests=4, **replica)
    class QueuedDiT(Stage):
        def __init__(self):
            from concurrent.futures import ThreadPoolExecutor

            self.stages = FluxStages(folder, ("dit",))
            # the queue: one denoise at a time, the next ones' inputs already here
            self.queue = ThreadPoolExecutor(max_workers=1)

        async def __call__(self, embeddings: dict, job: Job) -> torch.Tensor:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.queue, self.stages.denoise, embeddings, job
            )

    @serve.deployment(max_ongoing_requests=16, **replica)
    class BatchedVAE(Stage):
        def __init__(self):
            self.stages = FluxStages(folder, ("vae",))

        async def __call__(self, latents: torch.Tensor, job: Job) -> np.ndarray:
            return await self.decode(latents, job)

        @serve.batch(**batching)
        async def decode(
            self, latents: list[torch.Tensor], jobs: list[Job]
        ) -> list[np.ndarray]:
            return await asyncio.to_thread(self.decode_by_size, latents, jobs)

        def decode_by_size(self, latents, jobs) -> list[np.ndarray]:
            pixels: list[Any] = [None] * len(jobs)
            sizes = {(j.height, j.width) for j in jobs}
            for size in sizes:
                group = [i for i, j in enumerate(jobs) if (j.height, j.width) == size]
                decoded = self.stages.decode(
                    [latents[i] for i in group], [jobs[i] for i in group]
                )
                for i, image in zip(group, decoded):
                    pixels[i] = image
            return pixels

    @serve.deployment(max_ongoing_requests=1000, **replica)
    class ChainedText2Image:
        def __init__(self, encoder, dit, vae):
            self.encoder, self.dit, self.vae = encoder, dit, vae

        async def __call__(self, job: Job) -> np.ndarray:
            # responses passed on: each stage's output goes straight to the next
            embeddings = self.encoder.remote(job.prompt)
            latents = self.dit.remote(embeddings, job)
            return await self.vae.remote(latents, job)

    return ChainedText2Image.bind(
        BatchedEncoder.bind(), QueuedDiT.bind(), BatchedVAE.bind()
    )


class RayServe:
    """One Ray Serve application of the stages, called through its handle."""

    def __init__(self, folder: str, tuned: bool, dit: int):
        from ray import serve

        self.name = "ray-tuned" if tuned else "ray-plain"
        self.app = f"{self.name}-{dit}"
        self.handle = serve.run(
            ray_app(folder, tuned, dit), name=self.app, route_prefix=None
        )

    def single(self, job: Job) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        pixels = self.handle.remote(job).result()
        return pixels, time.perf_counter() - start

    def burst(self, jobs: list[Job]) -> tuple[list[Any], list[float], float]:
        async def run() -> tuple[list[Any], list[float], float]:
            start = time.perf_counter()
            latencies = [0.0] * len(jobs)

            async def one(i: int, job: Job) -> Any:
                try:
                    return await self.handle.remote(job)
                except Exception as error:
                    return error
                finally:
                    latencies[i] = time.perf_counter() - start

            results = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
            return list(results), latencies, time.perf_counter() - start

        return asyncio.run(run())

    def probe(self) -> dict[str, Any]:
        from ray import serve

        stages = ("Encoder", "DiT", "VAE")
        if self.name == "ray-tuned":
            stages = ("BatchedEncoder", "QueuedDiT", "BatchedVAE")
        return {
            stage: serve.get_deployment_handle(stage, app_name=self.app)
            .probe.remote()
            .result()
            for stage in stages
        }

    def pids(self) -> list[int]:
        marker = f"ServeReplica:{self.app}:"
        return [p.pid for p in descendants() if marker in " ".join(cmdline(p))]

    def close(self) -> None:
        from ray import serve

        serve.delete(self.app)


def start_ray() -> None:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    serve.start(proxy_location="Disabled", logging_config={"log_level": "ERROR"})


# -- measurement --------------------------------------------------------------------


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def memory_of(pids: list[int]) -> dict[str, Any]:
    rss = pss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
    return {"processes": len(pids), "rss_mb": rss / 2**20, "pss_mb": pss / 2**20}


def memory(systems: list[Any]) -> dict[str, Any]:
    """RSS and PSS of each system's processes; Ray's shared processes (GCS,
    raylet, controller, idle workers) and this process (dflow's schedulers and
    clients, Ray's driver, the bare pipeline) apart."""
    result = {s.name: memory_of(s.pids()) for s in systems}
    taken = {pid for s in systems for pid in s.pids()}
    ray = [
        p.pid
        for p in descendants()
        if p.pid not in taken and any("ray" in part for part in cmdline(p))
    ]
    result["ray (shared: gcs, raylet, controller, idle workers)"] = memory_of(ray)
    result["this process (dflow's schedulers and clients, Ray's driver)"] = memory_of(
        [os.getpid()]
    )
    return result


def pixel_difference(results: list[Any], jobs: list[Job], reference) -> dict:
    diffs = [
        int(np.abs(r.astype(np.int16) - reference(j).astype(np.int16)).max())
        for r, j in zip(results, jobs)
        if isinstance(r, np.ndarray)
    ]
    errors = [r for r in results if not isinstance(r, np.ndarray)]
    return {
        "max_diff": max(diffs, default=None),
        "outputs_off_by_more_than_1": sum(d > 1 for d in diffs),
        "outputs_off_by_1": sum(d == 1 for d in diffs),
        "errors": len(errors),
        # e.g. RayTaskError(IndexError) from a race, OutOfMemoryError from Ray's
        # memory monitor when the machine runs low
        "error_kinds": dict(Counter(type(e).__name__ for e in errors)),
        "first_error": repr(errors[0])[:300] if errors else None,
    }


def measure_single(system, jobs: list[Job], reference) -> dict[str, Any]:
    latencies, results = [], []
    for job in jobs:
        start = time.perf_counter()
        try:
            pixels, seconds = system.single(job)
        except Exception as error:
            pixels, seconds = error, time.perf_counter() - start
        results.append(pixels)
        latencies.append(seconds)
    return {
        "median_ms": statistics.median(latencies) * 1e3,
        "min_ms": min(latencies) * 1e3,
        "latencies_ms": [x * 1e3 for x in latencies],
        "pixels": pixel_difference(results, jobs, reference),
    }


def measure_burst(system, jobs: list[Job], reference) -> dict[str, Any]:
    results, latencies, wall = system.burst(jobs)
    return {
        "requests": len(jobs),
        "wall_s": wall,
        "req_per_s": len(jobs) / wall,
        "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
        "p95_ms": float(np.percentile(latencies, 95)) * 1e3,
        "pixels": pixel_difference(results, jobs, reference),
    }


def stage_medians(timings: list[dict[str, float]], steps: list[int]) -> dict:
    """Median milliseconds of the stage calls dflow's single requests report, per
    steps value, and their sum (to set beside bare's whole call)."""
    result = {}
    for s in steps:
        own = [t for t in timings if t["steps"] == s]
        medians = {
            stage: statistics.median(t[stage] for t in own) * 1e3
            for stage in ("encode", "denoise", "decode")
        }
        result[s] = {**medians, "sum": sum(medians.values())}
    return result


def run_phase(
    args: argparse.Namespace,
    dit: int,
    bare: Bare,
    folder: str,
    reference: Callable[[Job], np.ndarray],
) -> dict[str, Any]:
    """Start every system with ``dit`` DiT workers/replicas, take turns, stop them
    (all but ``bare``)."""
    systems: list[Any] = [bare]
    systems += [Dflow(folder, env, dit) for env in args.worker_env]
    systems += [RayServe(folder, tuned, dit) for tuned in (False, True)]
    with dask.config.set({"dflow.client.model-timeout": "600s"}):
        for system in systems:  # warm-up: both step values, one at a time and a few
            for steps in args.steps:
                for job in jobs_of("warm up", 2, steps, 10**6):
                    system.single(job)
                if hasattr(system, "burst"):
                    system.burst(jobs_of("warm up", 8, steps, 10**6))
            if isinstance(system, Dflow):
                system.timings.clear()
        probes = {s.name: s.probe() for s in systems}
        rounds = []
        for index in range(args.pairs):
            order = systems if index % 2 == 0 else systems[::-1]
            round_: dict[str, Any] = {
                "order": [s.name for s in order],
                "loadavg_start": os.getloadavg(),
                "systems": {},
            }
            for system in order:
                figures: dict[str, Any] = {"single": {}, "burst": {}}
                for steps in args.steps:
                    single = jobs_of("a lighthouse at dawn", args.single, steps, 1000)
                    figures["single"][steps] = measure_single(system, single, reference)
                    if hasattr(system, "burst"):
                        burst = jobs_of("a fox in the snow", args.burst, steps, 0)
                        figures["burst"][steps] = measure_burst(
                            system, burst, reference
                        )
                round_["systems"][system.name] = figures
                print(f"  dit {dit} round {index + 1}: {system.name} done", flush=True)
            round_["loadavg_end"] = os.getloadavg()
            rounds.append(round_)
        phase = {
            "dit": dit,
            "rounds": rounds,
            "probes": probes,
            "memory": memory(systems),
            "dflow_stage_calls_ms": {
                s.name: stage_medians(s.timings, args.steps)
                for s in systems
                if isinstance(s, Dflow)
            },
            "dflow_elastic_decisions": {
                s.name: s.decisions() for s in systems if isinstance(s, Dflow)
            },
        }
    for system in systems[1:]:
        system.close()
    return phase


# -- report -------------------------------------------------------------------------


def ratios(phase: dict[str, Any], steps: list[int]) -> list[dict[str, Any]]:
    """Per round and dflow variant: dflow / ray-tuned for throughput and latency."""
    rows = []
    for index, round_ in enumerate(phase["rounds"]):
        figures = round_["systems"]
        tuned = figures["ray-tuned"]
        for name, own in figures.items():
            if not name.startswith("dflow"):
                continue
            row: dict[str, Any] = {"round": index + 1, "system": name}
            for s in steps:
                row[f"throughput_{s}"] = (
                    own["burst"][s]["req_per_s"] / tuned["burst"][s]["req_per_s"]
                )
                row[f"latency_{s}"] = (
                    own["single"][s]["median_ms"] / tuned["single"][s]["median_ms"]
                )
            rows.append(row)
    return rows


def table(phase: dict[str, Any], steps: list[int]) -> str:
    dit = phase["dit"]
    single = " | ".join(f"single {s} ms (overhead)" for s in steps)
    burst = " | ".join(f"burst {s} req/s (p50/p95 s)" for s in steps)
    lines = [
        f"| DiT x{dit}, round | system | {single} | {burst} | max pixel diff "
        "(outputs off by >1 / errors) | RSS MB (processes) |",
        "|---" * (5 + 2 * len(steps)) + "|",
    ]
    for index, round_ in enumerate(phase["rounds"]):
        bare = round_["systems"]["bare"]["single"]
        for name, figures in round_["systems"].items():
            cells = []
            for s in steps:
                median = figures["single"][s]["median_ms"]
                over = median - bare[s]["median_ms"]
                cells.append(f"{median:.0f} ({over:+.0f})")
            for s in steps:
                b = figures["burst"].get(s)
                cells.append(
                    f"**{b['req_per_s']:.1f}** ({b['p50_ms'] / 1e3:.2f}/"
                    f"{b['p95_ms'] / 1e3:.2f})"
                    if b
                    else "-"
                )
            checks = [figures["single"][s]["pixels"] for s in steps]
            checks += [figures["burst"][s]["pixels"] for s in figures["burst"]]
            diff = max((c["max_diff"] or 0) for c in checks)
            off = sum(c["outputs_off_by_more_than_1"] for c in checks)
            errors = sum(c["errors"] for c in checks)
            mem = phase["memory"].get(name)
            rss = f"{mem['rss_mb']:.0f} ({mem['processes']})" if mem else "-"
            lines.append(
                f"| {index + 1} | {name} | {' | '.join(cells)} | {diff} ({off} / "
                f"{errors}) | {rss} |"
            )
    lines.append("")
    header = " | ".join(
        f"throughput {s} steps | single latency {s} steps" for s in steps
    )
    lines.append(f"| DiT x{dit}, round | dflow / ray-tuned | {header} |")
    lines.append("|---" * (2 + 2 * len(steps)) + "|")
    for row in ratios(phase, steps):
        cells = " | ".join(
            f"{row[f'throughput_{s}']:.2f} | {row[f'latency_{s}']:.2f}" for s in steps
        )
        lines.append(f"| {row['round']} | {row['system']} | {cells} |")
    return "\n".join(lines)


def details(phase: dict[str, Any], steps: list[int]) -> str:
    """dflow's stage calls beside bare's whole call, and every system's memory."""
    dit = phase["dit"]
    lines = [
        f"| DiT x{dit}, steps | system | encode | denoise | decode | sum of stage "
        "calls ms | bare whole call ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        bare = statistics.median(
            r["systems"]["bare"]["single"][s]["median_ms"] for r in phase["rounds"]
        )
        for name, calls in phase["dflow_stage_calls_ms"].items():
            c = calls[s]
            lines.append(
                f"| {s} | {name} | {c['encode']:.1f} | {c['denoise']:.1f} "
                f"| {c['decode']:.1f} | {c['sum']:.1f} | {bare:.1f} |"
            )
    lines += ["", f"| DiT x{dit}: processes of | count | RSS MB | PSS MB |"]
    lines.append("|---|---|---|---|")
    for name, m in phase["memory"].items():
        lines.append(
            f"| {name} | {m['processes']} | {m['rss_mb']:.0f} | {m['pss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="rounds of turns (3)")
    parser.add_argument("--burst", type=int, default=100, help="burst size (100)")
    parser.add_argument(
        "--single", type=int, default=10, help="single requests timed (10)"
    )
    parser.add_argument(
        "--steps", default="4,20", help="denoising steps, comma-separated (4,20)"
    )
    parser.add_argument(
        "--dit", default="1,2", help="DiT workers/replicas, comma-separated (1,2)"
    )
    parser.add_argument(
        "--worker-env",
        default="dflow",
        help=f"dflow worker allocator environments: {', '.join(WORKER_ENVS)}",
    )
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.worker_env = args.worker_env.split(",")
    unknown = set(args.worker_env) - set(WORKER_ENVS)
    if unknown:
        parser.error(f"--worker-env: unknown {', '.join(sorted(unknown))}")
    try:
        import ray
    except ImportError:
        parser.error('needs Ray Serve: pip install -e ".[bench]"')

    host = {
        **machine(),
        "ray": ray.__version__,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    folder = preset_folder(PRESET)
    bare = Bare(folder)
    references: dict[Job, np.ndarray] = {}

    def reference(job: Job) -> np.ndarray:
        if job not in references:
            references[job] = bare.stock(job)
        return references[job]

    result: dict[str, Any] = {
        "benchmark": "peers",
        "command": " ".join([sys.executable, *sys.argv]),
        "label": f"CPU, {os.cpu_count()} cores shared by every process",
        "model": PRESET,
        "folder": folder,
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "worker_envs": {e: WORKER_ENVS[e] for e in args.worker_env},
            "size": [Job("", 0, 0).height, Job("", 0, 0).width],
            "guidance_scale": GUIDANCE,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        },
        "machine": host,
        "phases": [],
        "ratios": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "peers.json"
    phases = result["phases"]
    start_ray()
    try:
        for dit in (int(d) for d in args.dit.split(",")):
            print(f"DiT x{dit}: starting the systems", flush=True)
            phases.append(run_phase(args, dit, bare, folder, reference))
            result["ratios"][dit] = ratios(phases[-1], args.steps)
            host["loadavg_end"] = os.getloadavg()
            # after every phase, so that a run cut short keeps what it measured
            path.write_text(json.dumps(result, indent=1, default=str))
    finally:
        ray.shutdown()
        bare.close()
    for phase in phases:
        print()
        print(table(phase, args.steps))
        print()
        print(details(phase, args.steps))
    print(f"\nload average start {host['loadavg_start']}, end {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
