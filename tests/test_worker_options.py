"""The environment stage worker processes start with (``dflow.worker.pre-spawn-environ``).

glibc reads its allocator's settings once, when a process starts, so the test
reads what the worker process was started with (``/proc/PID/environ``), on real
Nanny and worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dask.config
from distributed import Scheduler
from distributed.utils_test import gen_test

from dflow.worker import StageNanny, spawn_environment

pytestmark = [
    pytest.mark.slow,  # worker processes
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(), reason="reads /proc/PID/environ"
    ),
]

ALLOCATOR = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def started_with(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {k.decode(): v.decode() for k, _, v in pairs}


async def worker_environment() -> dict[str, str]:
    """Start a scheduler and one StageNanny; the environment its worker process
    started with."""
    async with Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler:
        nanny = StageNanny(scheduler.address, host="127.0.0.1", nthreads=1)
        async with nanny:
            assert nanny.process is not None and nanny.process.pid is not None
            return started_with(nanny.process.pid)


def allocator_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in ALLOCATOR}


def test_shipped_setting():
    changes = spawn_environment()
    assert changes == {
        "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
        "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    }


@gen_test(timeout=120)
async def test_worker_starts_with_dflows_allocator_setting(monkeypatch):
    """A stage worker starts with dflow's setting, not distributed's
    ``MALLOC_TRIM_THRESHOLD_=65536`` (even where this process's environment has
    it, as an earlier Nanny leaves it); this process's environment is left as
    it was."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    before = allocator_variables()
    environment = await worker_environment()
    assert environment["MALLOC_TRIM_THRESHOLD_"] == str(64 * 2**20)
    assert environment["MALLOC_MMAP_THRESHOLD_"] == str(64 * 2**20)
    # distributed's own pre-spawn variables are still there
    assert environment["OMP_NUM_THREADS"] == "1"
    assert allocator_variables() == before


@gen_test(timeout=120)
async def test_null_leaves_a_variable_out(monkeypatch):
    """``null`` starts the worker without the variable, even one this process has."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    before = allocator_variables()
    unset = {"MALLOC_TRIM_THRESHOLD_": None, "MALLOC_MMAP_THRESHOLD_": None}
    with dask.config.set({"dflow.worker.pre-spawn-environ": unset}):
        environment = await worker_environment()
    assert not set(ALLOCATOR) & set(environment)
    assert allocator_variables() == before
