"""S5, the seed's experiment (issue 13), as dflow's emulated cost model prices it.

Wan 2.2 I2V A14B, 4 steps (two per expert), no guidance, int8 DiT weights,
480x832x81, on 8 emulated A10s. Prices each pool per request
(:func:`dflow.bench.physics.pool_work`) and the capacity (requests/s at
saturation) of the seed's modes: (a) 8 monolithic workers with block (group)
offload, (c) static 1:6:1 with both experts on each DiT worker, static
1:3:3:1 with the experts split, and the best allocation of either chain (the
bound of the elastic mode). Compares them with the seed's published capacities.

The stage costs are *derived* from the H200 anchors of Wan 2.1 14B
(:func:`dflow.predictor.derived_rows`) and scaled to the A10 by the GPU
catalog: emulated figures, not measurements.

Usage::

    python benchmarks/s5_physics.py --out benchmarks/results/s5-physics.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dflow.bench.physics import best_allocation, capacity, pool_work
from dflow.catalog import resolve
from dflow.emulation.cost import cost_model
from dflow.errors import StageOutOfMemory
from dflow.hardware import GIB
from dflow.pools import EXPERT_CHAIN, MONOLITHIC, STAGES, Pool
from dflow.request import Request

MODEL = "wan2.2-i2v-a14b"
GPU = "a10"
WORKERS = 8
#: The seed's capacities (requests/s at its SLO), shared/notes/peer-apis.md
SEED = {"monolithic": 0.022, "disaggregated": 0.077}
#: The seed's DiT workers (1 encoder : 6 DiT : 1 decoder)
SEED_DIT_WORKERS = 6


def s5_request() -> Request:
    return Request(
        model=MODEL,
        prompt="a fox runs through fresh snow",
        height=480,
        width=832,
        num_frames=81,
        steps=4,
        guidance_scale=1.0,
        seed=0,
        image=np.zeros((480, 832, 3), dtype=np.uint8),
    )


def sustained(chain: tuple[str, ...], counts: tuple[int, ...], work) -> float:
    """Requests/s that ``counts`` workers of ``chain``'s pools sustain (0 if a
    pool's workers cannot hold it)."""
    allocation = {Pool(s, MODEL): {GPU: n} for s, n in zip(chain, counts)}
    if any(math.isinf(work[pool][GPU]) for pool in allocation):
        return 0.0
    return capacity(allocation, work)


def physics(quantize: str | None) -> dict[str, Any]:
    cost = cost_model()
    spec = resolve(MODEL)
    request = s5_request()
    mix = [(request, 1.0)]
    works = {
        "monolithic": pool_work(cost, mix, [GPU], True, quantize=quantize),
        "one-dit": pool_work(cost, mix, [GPU], False, STAGES, quantize),
        "experts": pool_work(cost, mix, [GPU], False, EXPERT_CHAIN, quantize),
    }

    def placement(stage: str) -> str:
        stages = list(STAGES) if stage == MONOLITHIC else [stage]
        try:
            return cost.placement(
                spec, stages, GPU, request.features, quantize=quantize
            ).mode
        except StageOutOfMemory:
            return "does not fit"

    pools = {
        str(pool): {"seconds": per_type[GPU], "placement": placement(pool.stage)}
        for work in works.values()
        for pool, per_type in work.items()
    }
    monolithic_s = works["monolithic"][Pool(MONOLITHIC, MODEL)][GPU]
    # diffusers' enable_model_cpu_offload: each component moved in whole
    try:
        model_offload_s = cost.placement(
            spec, list(STAGES), GPU, request.features, mode="model", quantize=quantize
        ).seconds
    except StageOutOfMemory:
        model_offload_s = math.inf
    modes = {
        "monolithic (a): 8 x block offload": sustained(
            (MONOLITHIC,), (WORKERS,), works["monolithic"]
        ),
        "monolithic: 8 x model offload": WORKERS / model_offload_s,
        "static (c): 1:6:1": sustained(STAGES, (1, 6, 1), works["one-dit"]),
        "static, experts split: 1:3:3:1": sustained(
            EXPERT_CHAIN, (1, 3, 3, 1), works["experts"]
        ),
    }
    best = {}
    for name in ("one-dit", "experts"):
        rate, allocation = best_allocation({GPU: WORKERS}, works[name])
        best[name] = {
            "rate": rate,
            "allocation": {str(p): n[GPU] for p, n in allocation.items()},
        }
    modes["elastic bound (best allocation)"] = max(b["rate"] for b in best.values())
    dit_per_request = works["one-dit"][Pool("dit", MODEL)][GPU]
    _, group_rate = cost.offload_rates(GPU)
    expert_bytes = cost.weight_bytes(spec, "dit-high", quantize)
    seed_monolithic_s = WORKERS / SEED["monolithic"]
    needed = modes["elastic bound (best allocation)"] / 3.4
    return {
        "label": "emulated (stage costs derived from H200 anchors of Wan 2.1 14B)",
        "model": MODEL,
        "gpu": GPU,
        "workers": WORKERS,
        "quantize": quantize,
        "shape": "480x832x81, 4 steps (2 per expert), no CFG",
        "pools_s_per_request": pools,
        "capacity_req_s": modes,
        "best_allocations": best,
        "vs_monolithic": {k: v / modes[next(iter(modes))] for k, v in modes.items()},
        "block_offload": {
            "expert_gib": expert_bytes / GIB,
            "stream_gib_s": group_rate / GIB,
            "stream_s_per_step": expert_bytes / group_rate,
            "compute_s_per_step": dit_per_request / request.steps,
        },
        "seed": {
            **SEED,
            "ratio": SEED["disaggregated"] / SEED["monolithic"],
            "monolithic_s_per_request": seed_monolithic_s,
            "dit_s_per_request": SEED_DIT_WORKERS / SEED["disaggregated"],
            "monolithic_overhead_s_per_request": seed_monolithic_s - monolithic_s,
        },
        "for_3.4x": {
            "monolithic_req_s": needed,
            "monolithic_s_per_request": WORKERS / needed,
            "overhead_s_per_step": (WORKERS / needed - monolithic_s) / request.steps,
        },
        "model_offload_s_per_request": model_offload_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", default="int8", help="int8, fp8 or none")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    result = physics(None if args.quantize == "none" else args.quantize)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
