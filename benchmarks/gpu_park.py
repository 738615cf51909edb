"""Parked weights on a real GPU: how fast a worker switches back to a stage whose
weights it kept in pinned host memory (``dflow.runtime.park-memory``), against
loading it.

Per variant (a model's DiT stage at real size, random weights, in a process of
its own): build and warm the stage (:class:`~dflow.runtime.StageRuntime`), run a
2-step request, reserve the page-locked host buffers (what a worker does in the
background once a stage serves), then park and resume it ``--repeats`` times, each time checking
that the device memory came back, that the parked weights are pinned, and that
the same request gives the same latents after the resume. The emulation prices
a resume as the weights over the card's pinned host link
(:meth:`~dflow.emulation.cost.CostModel.resume_seconds`); this measures it.

Usage (on a CUDA machine)::

    python benchmarks/gpu_park.py --out results/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

VARIANTS = ("pixart-sigma-1024", "flux.1-dev", "flux.1-dev:int8")
GIB = 2**30


def run(variant: str, repeats: int, queue: multiprocessing.Queue) -> None:
    import torch

    import dflow
    from dflow.runtime import StageRuntime

    model, _, quantize = variant.partition(":")
    result: dict = {"variant": variant}
    start = time.perf_counter()
    runtime = StageRuntime(model, "dit", quantize=quantize or None)
    result["build_s"] = time.perf_counter() - start
    request = dflow.Request(model=model, prompt="a lighthouse", seed=7, steps=2)
    embeddings = runtime.zero_embeddings(request)
    before = runtime.denoise(request, embeddings)["latents"].float().cpu()
    modules = [
        m
        for m in runtime.adapter.pipe.components.values()
        if isinstance(m, torch.nn.Module)
    ]
    result["weight_gib"] = (
        sum(
            t.numel() * t.element_size()
            for m in modules
            for t in [*m.parameters(), *m.buffers()]
        )
        / GIB
    )
    torch.cuda.synchronize()
    result["allocated_gib"] = torch.cuda.memory_allocated() / GIB
    start = time.perf_counter()
    runtime.reserve_host()
    result["reserve_s"] = time.perf_counter() - start
    result["park_s"], result["resume_s"], result["parked_allocated_gib"] = [], [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.park()
            torch.cuda.synchronize()
            result["park_s"].append(time.perf_counter() - start)
            result["parked_allocated_gib"].append(torch.cuda.memory_allocated() / GIB)
            result["pinned"] = all(
                t.device.type == "cpu" and t.is_pinned()
                for m in modules
                for t in m.parameters()
            )
            start = time.perf_counter()
            runtime.resume()
            torch.cuda.synchronize()
            result["resume_s"].append(time.perf_counter() - start)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        queue.put(result)
        return
    after = runtime.denoise(request, embeddings)["latents"].float().cpu()
    result["same_latents"] = bool(torch.equal(before, after))
    result["resume_gibs"] = result["weight_gib"] / min(result["resume_s"])
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for variant in args.variants.split(","):
        queue = context.Queue()
        process = context.Process(target=run, args=(variant, args.repeats, queue))
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
    (args.out / "gpu-park.json").write_text(json.dumps(results, indent=1))
    print("| variant | weights GiB | reserve s | park s | resume s | GiB/s | same |")
    for r in results:
        if "resume_s" in r and "error" not in r:
            print(
                f"| {r['variant']} | {r['weight_gib']:.1f} | {r['reserve_s']:.1f} "
                f"| {min(r['park_s']):.2f} "
                f"| {min(r['resume_s']):.2f} | {r['resume_gibs']:.1f} "
                f"| {r['same_latents']} |"
            )
        else:
            print(f"| {r['variant']} | {r.get('error') or r.get('exitcode')} |")


if __name__ == "__main__":
    main()
