"""Scheduler loss: pending requests fail at once, and the documented recovery works.

A real ``dask scheduler`` (dflow's preload) and one ``dflow-worker --stage all``
of tiny PixArt-Sigma serve slow requests; the scheduler is SIGKILLed with them
pending. Every pending ``dflow.submit`` future must raise promptly (a
``FutureCancelledError`` with reason ``scheduler-connection-lost``: the client
sees the connection close and cancels its futures), and new submissions must
fail fast with a clear error rather than wait out distributed's connect timeout.
The worker, whose scheduler is gone, exits (Dask workers and their Nanny close
when their scheduler connection breaks). Recovery as the README documents it: a
new scheduler at the same address, the workers restarted (by their supervisor;
here by the test), the requests submitted again.
"""

from __future__ import annotations

import contextlib
import time

import pytest

import dask.config
from distributed import Client
from distributed.client import FutureCancelledError

import dflow
from dflow.request import Request
from dflow.testing import scheduler_process, wait_for_pools, worker_processes

# real scheduler and worker processes
pytestmark = pytest.mark.slow

MODEL = "tiny-pixart"
ENV = {"DASK_DFLOW__ELASTIC__ENABLED": "False"}
#: Seconds within which pending futures must raise after the scheduler dies
PROMPT = 10.0


def slow_request(seed: int) -> Request:
    return Request(
        model=MODEL, prompt="a fox", height=256, width=256, steps=200, seed=seed
    )


def test_pending_requests_raise_when_the_scheduler_dies_and_recovery(
    tiny_folders, tmp_path
):
    logs = tmp_path / "logs"
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(
            scheduler_process(env=ENV, log_dir=logs / "first")
        )
        workers = stack.enter_context(
            worker_processes(address, [("all", MODEL)], log_dir=logs / "first")
        )
        client = stack.enter_context(Client(address))
        wait_for_pools(client, {MODEL: ["all"]}, processes=workers, timeout=240)
        requests = [slow_request(seed) for seed in range(4)]
        futures = dflow.map(client, requests)
        assert not any(f.done() for f in futures)

        address.process.kill()  # SIGKILL, as a crash would
        killed = time.monotonic()
        for future in futures:
            with pytest.raises(FutureCancelledError) as caught:
                future.result(timeout=PROMPT)
            assert caught.value.reason == "scheduler-connection-lost"
        assert time.monotonic() - killed < PROMPT

        # a new request fails fast while no scheduler answers
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="the client has no scheduler"):
            dflow.submit(client, slow_request(9))
        assert time.monotonic() - start < PROMPT

        # the worker closes once its scheduler is gone
        (worker,) = workers
        worker.popen.wait(timeout=60)

        # recovery: a scheduler at the same address, workers started again,
        # the requests submitted again (by a new client or the same one)
        port = address.rsplit(":", 1)[1]
        second = stack.enter_context(
            scheduler_process(env=ENV, args=["--port", port], log_dir=logs / "second")
        )
        assert second == address
        restarted = stack.enter_context(
            worker_processes(address, [("all", MODEL)], log_dir=logs / "second")
        )
        fresh = stack.enter_context(Client(address))
        wait_for_pools(fresh, {MODEL: ["all"]}, processes=restarted, timeout=240)
        with dask.config.set({"dflow.client.model-timeout": "30s"}):
            quick = [r.replace(steps=1) for r in requests]
            outputs = fresh.gather(dflow.map(fresh, quick))
        assert [o.request for o in outputs] == quick
