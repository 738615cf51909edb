"""Out-of-memory isolation: a request that runs a stage out of memory fails alone.

A real out-of-memory, not a mock: real ``dask scheduler`` and ``dflow-worker``
processes serve a diffusers folder of tiny PixArt-Sigma (a folder, not the
preset, so sizes up to 2048 px validate), and the VAE worker's memory is capped
once it is warm:

- on CPU, its address space (``RLIMIT_AS``) a little above what it uses, so a
  1024x1024 decode really fails inside torch's CPU allocator;
- on CUDA (``pytest tests/test_oom.py -m gpu`` on a GPU machine), its share of
  the device (``torch.cuda.set_per_process_memory_fraction``), so a 2048x2048
  decode raises ``torch.OutOfMemoryError``.

The big request must fail with :class:`~dflow.errors.StageOutOfMemory`, the
requests around it must complete, the worker must stay the same process and keep
serving, and its memory must come back (RSS on CPU, allocated bytes on CUDA).
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import cloudpickle
import psutil
import pytest
import torch

from distributed import Client

import dflow
from dflow.errors import StageOutOfMemory
from dflow.request import Request
from dflow.spec import STAGES, canonical_name
from dflow.testing import (
    ServiceProcess,
    poll,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

# real scheduler and worker processes
pytestmark = pytest.mark.slow

# functions sent to the workers are pickled by value: worker processes cannot
# import test modules
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCHEDULER_ENV = {"DASK_DFLOW__ELASTIC__ENABLED": "False"}
#: Bytes the capped VAE worker may add to what it holds when capped: room for a
#: small decode and its threads' stacks, not for the big one
HEADROOM = {"cpu": 160 * 2**20, "cuda": 256 * 2**20}
#: Side of the request that cannot fit: its VAE decode needs about 300 MiB on CPU
#: (float32, tiny VAE) and over 1 GiB on CUDA
BIG = {"cpu": 1024, "cuda": 2048}
#: What torch's allocator says when it fails
ALLOCATOR = {"cpu": "DefaultCPUAllocator", "cuda": "CUDA out of memory"}
#: A request that fits in the headroom only if the failed one's memory came back
MEDIUM = 512
SMALL = 64


@dataclass
class Cluster:
    device: str
    model: str
    client: Client
    workers: list[ServiceProcess]

    def request(self, size: int, seed: int) -> Request:
        return Request(
            model=self.model,
            prompt="a fox in the snow",
            height=size,
            width=size,
            steps=1,
            seed=seed,
        )

    def vae(self) -> tuple[ServiceProcess, str]:
        """The VAE ``dflow-worker`` process and its Dask worker's address."""
        (process,) = [p for p in self.workers if p.stage == "vae"]
        (address,) = process.addresses(self.client)
        return process, address


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def cluster(request, tiny_folders, tmp_path_factory) -> Iterator[Cluster]:
    device = request.param
    root = tmp_path_factory.mktemp(f"oom-{device}")
    folder = shutil.copytree(tiny_folders["tiny-pixart"], root / "pixart")
    model = canonical_name(str(folder))
    env = {
        "DASK_DFLOW__RUNTIME__DEVICE": device,
        # one malloc arena per process: threads the worker starts after the cap
        # must not each reserve 64 MiB of the capped address space
        "MALLOC_ARENA_MAX": "1",
        # the cap is on address space, which only mmapped blocks give back: with
        # dflow's 64 MiB mmap threshold a failed decode's blocks come from the
        # heap, and one block left above them keeps their addresses reserved
        "DASK_DFLOW__WORKER__PRE_SPAWN_ENVIRON": "{'MALLOC_MMAP_THRESHOLD_': 131072}",
    }
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(
            scheduler_process(env=SCHEDULER_ENV, log_dir=root / "logs")
        )
        workers = stack.enter_context(
            worker_processes(
                address, [(s, model) for s in STAGES], env=env, log_dir=root / "logs"
            )
        )
        client = stack.enter_context(Client(address))
        wait_for_pools(client, {model: STAGES}, processes=workers, timeout=240)
        yield Cluster(device, model, client, workers)


# -- run on the VAE worker ------------------------------------------------------------


def cap_memory(device: str, headroom: int) -> int:
    """Cap this process's memory at what it uses now plus ``headroom``."""
    if device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        limit = torch.cuda.memory_reserved() + headroom
        torch.cuda.set_per_process_memory_fraction(limit / total)
        return limit
    limit = psutil.Process().memory_info().vms + headroom
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def uncap_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def memory_in_use(device: str) -> int:
    """Bytes the stage's memory holds: allocated tensors on CUDA; on CPU, RSS
    once glibc has returned its free pages (stage workers keep freed blocks
    under 64 MiB in the heap for reuse: ``dflow.worker.pre-spawn-environ``)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def request_counts(dask_scheduler) -> dict[str, int]:
    counts = dask_scheduler.extensions["dflow"].counts
    return {status: n for (_, status), n in counts.items()}


# -- the test ---------------------------------------------------------------------------


def test_out_of_memory_fails_one_request_and_the_worker_recovers(cluster):
    client, device = cluster.client, cluster.device
    process, vae = cluster.vae()
    pid = process.worker_pids()
    client.gather(dflow.map(client, [cluster.request(SMALL, s) for s in range(2)]))
    baseline = client.run(memory_in_use, device, workers=[vae])[vae]
    before = client.run_on_scheduler(request_counts)

    client.run(cap_memory, device, HEADROOM[device], workers=[vae])
    try:
        small = [cluster.request(SMALL, seed) for seed in (10, 11)]
        big = cluster.request(BIG[device], seed=12)
        first, failing, last = dflow.map(client, [small[0], big, small[1]])
        with pytest.raises(StageOutOfMemory, match="vae ran out of") as caught:
            failing.result(timeout=240)
        assert ALLOCATOR[device] in str(caught.value)  # torch's own error, wrapped
        assert [first.result().request, last.result().request] == small

        # the same worker process serves on, capped: its memory came back
        assert process.alive() and process.worker_pids() == pid
        assert process.addresses(client) == [vae]

        def freed() -> int | None:
            held = client.run(memory_in_use, device, workers=[vae])[vae]
            return held if held < baseline + HEADROOM[device] // 4 else None

        held = poll(freed, 30, "the VAE worker to free the failed decode's memory")
        medium = cluster.request(MEDIUM, seed=13)
        assert dflow.submit(client, medium).result(timeout=120).request == medium
    finally:
        client.run(uncap_memory, device, workers=[vae])

    after = client.run_on_scheduler(request_counts)
    for status, delta in (("completed", 3), ("failed", 1)):
        assert after.get(status, 0) - before.get(status, 0) == delta, status
    wait_for_pools(
        client, {cluster.model: STAGES}, timeout=10, processes=cluster.workers
    )
    print(
        f"{device}: baseline {baseline / 2**20:.0f} MiB, after {held / 2**20:.0f} MiB"
    )
