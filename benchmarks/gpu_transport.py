"""Hand-off of CUDA tensors between two Dask worker processes on one GPU: UCX against TCP.

Worker A makes a bfloat16 CUDA tensor of a given size and worker B takes it onto
its own GPU, as a stage takes its inputs. Over ``ucx://`` (``distributed-ucxx``;
between two processes of one GPU UCX uses CUDA IPC) dflow's ``cuda`` serializers
send the tensor as a device buffer; over ``tcp://`` it is staged through host
memory (device to host on A, the socket, host to device on B). Per protocol and
size: B's transfer (distributed's ``transfer_incoming_log``), B's move onto its
GPU (zero when the tensor arrives there), the wall time of B's task from submit
to result, and the same task on A where the tensor already is (the floor). B
checks the tensor's contents against A's.

    python benchmarks/gpu_transport.py --out results/
    python benchmarks/gpu_transport.py --protocols tcp --sizes 1,4 --out /tmp/t  # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dask.config
from distributed import Client, LocalCluster, wait

from dflow.protocol import configure_ucx_progress

MIB = 2**20
SIZES_MIB = (1, 4, 16, 64, 256, 1024)
#: distributed-ucxx's transports for GPUs of one host: CUDA IPC (its ``nvlink``
#: flag), cuda_copy and TCP, and an RMM pool for the receive buffers
UCX_CONFIG = {
    "distributed-ucxx.cuda-copy": True,
    "distributed-ucxx.tcp": True,
    "distributed-ucxx.nvlink": True,
    "distributed-ucxx.create-cuda-context": True,
    "distributed-ucxx.rmm.pool-size": "3GiB",
}


#: CPU where there is no GPU: a dry run of the script
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup() -> str:
    """Install dflow's serializers and make this process's CUDA context."""
    from dflow.protocol import register_serializers

    register_serializers()
    torch.zeros(1, device=DEVICE)
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def make(nbytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(
        nbytes // 2, dtype=torch.bfloat16, device=DEVICE, generator=generator
    )


def take(tensor: torch.Tensor) -> dict[str, Any]:
    """What a stage does with an input: onto this GPU; with a checksum."""
    arrived_on = tensor.device.type
    start = time.perf_counter()
    tensor = tensor.to(DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return {
        "arrived_on": arrived_on,
        "to_device_s": time.perf_counter() - start,
        "checksum": float(tensor.float().sum()),
    }


def transfer_log(dask_worker: Any) -> dict[str, float]:
    return {
        str(key): entry["duration"]
        for entry in dask_worker.transfer_incoming_log
        for key in entry["keys"]
    }


def handoffs(client: Client, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    a, b = sorted(client.scheduler_info()["workers"])
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"mib": size, "wall_b_s": [], "wall_a_s": []}
        takes = []
        for i in range(repeats + 1):  # the first is a warm-up
            x = client.submit(make, size * MIB, i, workers=[a], key=f"make-{size}-{i}")
            wait(x)
            start = time.perf_counter()
            on_b = client.submit(take, x, workers=[b], key=f"b-{size}-{i}").result()
            middle = time.perf_counter()
            on_a = client.submit(take, x, workers=[a], key=f"a-{size}-{i}").result()
            stop = time.perf_counter()
            del x
            if on_b["checksum"] != on_a["checksum"]:
                raise AssertionError(f"{size} MiB arrived changed: {on_b} != {on_a}")
            if i:
                row["wall_b_s"].append(middle - start)
                row["wall_a_s"].append(stop - middle)
                takes.append(on_b)
        log = client.run(transfer_log, workers=[b])[b]
        row["transfer_s"] = [log[f"make-{size}-{i}"] for i in range(1, repeats + 1)]
        row["to_device_s"] = [t["to_device_s"] for t in takes]
        row["arrived_on"] = sorted({t["arrived_on"] for t in takes})
        rows.append(row)
        print(summary(row), flush=True)
    return rows


def summary(row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return f"{statistics.median(row[key]) * 1e3:.2f}"

    return (
        f"{row['mib']:>5} MiB: transfer {ms('transfer_s')} ms, onto GPU "
        f"{ms('to_device_s')} ms, arrived on {','.join(row['arrived_on'])}; "
        f"wall on B {ms('wall_b_s')} ms, on A {ms('wall_a_s')} ms"
    )


def run(protocol: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    settings = UCX_CONFIG if protocol == "ucx" else {}
    if protocol == "ucx":
        configure_ucx_progress()  # as dflow's own processes
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            protocol=protocol,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(setup)
        return {"protocol": protocol, "rows": handoffs(client, sizes, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default="ucx,tcp")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES_MIB)), help="MiB, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for protocol in args.protocols.split(","):
        print(f"== {protocol}", flush=True)
        try:
            results.append(run(protocol, sizes, args.repeats))
        except Exception as error:  # the other protocol still runs
            print(f"{protocol} failed: {type(error).__name__}: {error}", flush=True)
            results.append({"protocol": protocol, "error": repr(error)})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "gpu_transport",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "ucx_config": UCX_CONFIG,
        "repeats": args.repeats,
        "results": results,
    }
    (args.out / "gpu-transport.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
