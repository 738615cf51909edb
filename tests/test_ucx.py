"""Stage workers over UCX, where ``distributed-ucxx`` is installed.

A scheduler and one ``dflow-worker`` per stage, all started with ``--protocol
ucx``: a request's embeddings and latents travel worker to worker over UCX (CUDA
tensors as device buffers through the ``cuda`` serializer family, host tensors
through the ``dask`` family, as distributed picks per comm), and the pixels
equal an in-process run's. Skipped, with the reason, where ``distributed-ucxx``
is not installed (it pins its own dask release: ``pip install "dflow[ucx]"`` in
a venv of its own); the rest of the suite runs the TCP path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import Client

import dflow
from dflow import runtime
from dflow.request import Request
from dflow.testing import pixels, scheduler_process, wait_for_pools, worker_processes

pytest.importorskip(
    "distributed_ucxx",
    reason="needs distributed-ucxx and a UCX library (pip install 'dflow[ucx]')",
)

# real scheduler and worker processes
pytestmark = pytest.mark.slow

MODEL = "tiny-pixart"
STAGES = ("encoder", "dit", "vae")
#: Without a GPU, UCX's transports on loopback: TCP, and self for a process's own
#: messages (its other transports look for devices a CPU host lacks)
CPU_ENV = {"UCX_TLS": "tcp,self", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def test_a_request_over_ucx_equals_an_in_process_run(tiny_folders, tmp_path):
    env = {} if torch.cuda.is_available() else CPU_ENV
    request = Request(model=MODEL, prompt="a fox in the snow", seed=3, steps=2)
    with (
        scheduler_process(
            env=env, args=["--protocol", "ucx"], log_dir=tmp_path
        ) as address,
        worker_processes(
            address,
            [(stage, MODEL) for stage in STAGES],
            env=env,
            args=["--protocol", "ucx"],
            log_dir=tmp_path,
        ) as workers,
        Client(address) as client,
    ):
        assert address.startswith("ucx://")
        wait_for_pools(client, {MODEL: STAGES}, timeout=240, processes=workers)
        served = client.scheduler_info(n_workers=-1)["workers"]
        assert len(served) == 3 and all(w.startswith("ucx://") for w in served)
        output = dflow.submit(client, request).result(timeout=120)
    assert output.timings["decode_batch"] == 1
    try:
        local = dflow.generate(request)
    finally:
        runtime.uninstall(MODEL, "all")
    np.testing.assert_array_equal(pixels(output), pixels(local))
