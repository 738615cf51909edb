"""Flux on a 24 GiB card, for real: a monolithic replica must offload, a DiT worker
need not.

Each variant runs in its own process with ``dflow.runtime.memory-limit: 24GiB``
(torch's per-process memory fraction), on the GPU of this machine:

- ``resident``: the whole pipeline on the card: its 31 GiB of weights do not even
  load.
- ``model`` / ``group``: the whole pipeline with diffusers' model offload or
  block-level group offload (``dflow.runtime.offload``): seconds per request.
- ``dit``: dflow's DiT stage alone (22.7 GiB peak): seconds per request.
- ``dit-oom``: the DiT stage given a 2048px request, whose activations do not
  fit: a real CUDA out-of-memory error fails that request alone
  (``StageOutOfMemory``), the memory comes back, and the next request runs.

Usage (on a CUDA machine)::

    python benchmarks/gpu_offload.py --out results/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

VARIANTS = ("resident", "group", "model", "dit", "dit-oom")


def run(variant: str, model: str, repeats: int, queue: multiprocessing.Queue) -> None:
    import torch

    import dask.config

    import dflow
    from dflow.runtime import StageRuntime

    offload = variant if variant in ("model", "group") else "none"
    stage = "dit" if variant.startswith("dit") else "all"
    request = dflow.Request(model=model, prompt="a lighthouse at dawn", seed=7)
    result: dict = {"variant": variant, "stage": stage, "offload": offload}
    with dask.config.set(
        {"dflow.runtime.memory-limit": "24GiB", "dflow.runtime.offload": offload}
    ):
        start = time.perf_counter()
        try:
            runtime = StageRuntime(model, stage)
        except torch.OutOfMemoryError as error:
            result["load_error"] = str(error).splitlines()[0][:300]
            queue.put(result)
            return
        result["load_s"] = time.perf_counter() - start
        embeddings = runtime.zero_embeddings(request) if stage == "dit" else None

        def call(r: dflow.Request) -> float:
            start = time.perf_counter()
            if stage == "dit":
                runtime.denoise(r, embeddings)
            else:
                runtime.generate(r)
            return time.perf_counter() - start

        call(request.replace(steps=2))
        if variant == "dit-oom":
            try:
                largest = request.spec.limit("max_size")
                call(request.replace(height=largest, width=largest, steps=2))
                result["oom_error"] = None
            except dflow.StageOutOfMemory as error:
                result["oom_error"] = str(error).splitlines()[0][:300]
            if torch.cuda.is_available():
                result["allocated_after_oom_gib"] = (
                    torch.cuda.memory_allocated() / 2**30
                )
        result["seconds"] = [call(request) for _ in range(repeats)]
        if torch.cuda.is_available():
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default="flux.1-dev")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for variant in args.variants.split(","):
        queue = context.Queue()
        process = context.Process(
            target=run, args=(variant, args.model, args.repeats, queue)
        )
        process.start()
        process.join()
        result = (
            queue.get()
            if not queue.empty()
            else {"variant": variant, "exitcode": process.exitcode}
        )
        print(json.dumps(result), flush=True)
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-offload-{args.model}.json").write_text(
        json.dumps(results, indent=1)
    )


if __name__ == "__main__":
    main()
