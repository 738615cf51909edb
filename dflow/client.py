"""The client API: requests in, Dask futures of :class:`~dflow.output.Output` out.

``submit`` sends a request's three stage tasks at once ("ahead of need"), so
embeddings and latents move worker to worker as soon as they exist and each
stage worker fetches its next input while computing the current one. The
client holds only the output future: intermediates are released as soon as
the next stage has consumed them, and cancelling the output releases the chain.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import dask.config
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import parse_timedelta
from distributed import Client, Future

import dflow.config  # noqa: F401
from dflow import tasks
from dflow.errors import ModelNotServed
from dflow.request import Request
from dflow.spec import STAGES, ModelSpec, register
from dflow.worker import pool_resource

#: Task key prefix and function per stage
STAGE_TASKS = {
    "encoder": ("encode", tasks.encode),
    "dit": ("denoise", tasks.denoise),
    "vae": ("decode", tasks.decode),
    "all": ("generate", tasks.generate),
}
MODES = ("disaggregated", "monolithic")


def submit(client: Client, request: Request, *, mode: str | None = None) -> Future:
    """Submit one request; returns a future of its :class:`~dflow.output.Output`.

    Parameters
    ----------
    client
        A client of a scheduler running dflow's extension (``dask scheduler
        --preload dflow.preload``; registered on first use otherwise).
    request
        A validated request.
    mode
        ``"disaggregated"`` (encode, denoise, decode on stage workers),
        ``"monolithic"`` (one task on a ``--stage all`` worker), or ``None``:
        disaggregated if the cluster has all three stage pools of the model,
        else monolithic.

    Raises
    ------
    ModelNotServed
        If no worker serves (or is loading) the model within
        ``dflow.client.model-timeout``.

    Examples
    --------
    >>> future = dflow.submit(client, dflow.Request(model="tiny-flux", prompt="a fox"))  # doctest: +SKIP
    >>> future.result().images[0]  # doctest: +SKIP
    """
    (future,) = map(client, [request], mode=mode)
    return future


def map(
    client: Client, requests: Iterable[Request], *, mode: str | None = None
) -> list[Future]:
    """Submit many requests in one graph; returns their output futures in order."""
    requests = list(requests)
    if not requests:
        return []
    if mode not in (None, *MODES):
        raise ValueError(
            f"mode must be one of {', '.join(MODES)} or None, got {mode!r}"
        )
    for request in requests:
        if not isinstance(request, Request):
            raise TypeError(
                f"expected dflow.Request objects, got {type(request).__name__}"
            )
    pools = _served_pools(client, {r.model for r in requests}, mode)
    layers: dict[str, MaterializedLayer] = {}
    dependencies: dict[str, set[str]] = {}
    final_keys = []
    for request in requests:
        request_mode = mode or _mode(pools[request.model])
        request_id = uuid.uuid4().hex[:16]
        stages = STAGES if request_mode == "disaggregated" else ("all",)
        previous: str | None = None
        for stage in stages:
            prefix, function = STAGE_TASKS[stage]
            key = f"{prefix}-{request_id}"
            task = (
                (function, request)
                if previous is None
                else (function, request, previous)
            )
            layers[key] = MaterializedLayer(
                {key: task},
                annotations={
                    "resources": {stage: 1, pool_resource(stage, request.model): 1},
                    "dflow": {
                        "stage": stage,
                        "model": request.model,
                        "request": request_id,
                        "mode": request_mode,
                        "features": _annotated_features(request),
                    },
                },
            )
            dependencies[key] = {previous} if previous else set()
            previous = key
        assert previous is not None
        final_keys.append(previous)
    graph = HighLevelGraph(layers, dependencies)
    return client.get(graph, final_keys, sync=False)


def status(client: Client) -> dict[str, Any]:
    """The cluster's view per stage and the elastic controller's last decisions.

    Returns ``{"stages": {"encoder": {...}, "dit": {...}, "vae": {...}, "all":
    {...}}, "decisions": [...]}``; each stage has ``workers``, ``loading``,
    ``queue``, ``arrival_rate``, ``predicted_s`` and ``observed_s``.
    """
    return client.sync(_scheduler_call, client, "dflow_status")


def models(client: Client) -> list[str]:
    """Names of the models the cluster serves; their specs become resolvable here,
    so requests for models whose folders are only on the workers validate."""
    specs = client.sync(_scheduler_call, client, "dflow_models")
    for data in specs.values():
        register(ModelSpec.from_dict(data))
    return sorted(specs)


def _annotated_features(request: Request) -> dict[str, Any]:
    return {
        k: v for k, v in request.features.items() if isinstance(v, (int, float, bool))
    }


def _mode(stages: dict[str, Any]) -> str:
    if all(stage in stages for stage in STAGES):
        return "disaggregated"
    return "monolithic"


def _serves(stages: dict[str, Any], mode: str | None) -> bool:
    if mode in (None, "disaggregated") and all(s in stages for s in STAGES):
        return True
    return mode in (None, "monolithic") and "all" in stages


def _served_pools(
    client: Client, models: set[str], mode: str | None
) -> dict[str, dict[str, Any]]:
    """The pools of ``models``, waiting up to ``dflow.client.model-timeout`` for
    workers to appear."""
    timeout = parse_timedelta(dask.config.get("dflow.client.model-timeout"))
    deadline = time.monotonic() + timeout
    while True:
        pools = client.sync(_scheduler_call, client, "dflow_pools")
        missing = sorted(m for m in models if not _serves(pools.get(m, {}), mode))
        if not missing:
            return pools
        if time.monotonic() >= deadline:
            served = ", ".join(sorted(pools)) or "none"
            wanted = f" in {mode} mode" if mode else ""
            raise ModelNotServed(
                f"no workers serve model {missing[0]!r}{wanted} (served: {served}); "
                f"start them with `dflow-worker SCHEDULER --stage dit --model "
                f"{missing[0]}` (and encoder, vae), or `--stage all`"
            )
        time.sleep(min(0.2, timeout))


async def _scheduler_call(client: Client, handler: str) -> Any:
    """Call a dflow handler on the scheduler, installing the extension if absent."""
    try:
        return await getattr(client.scheduler, handler)()
    except ValueError as error:
        if handler not in str(error):
            raise
    from dflow.plugins.extension import DflowExtension

    await client.register_plugin(DflowExtension())
    return await getattr(client.scheduler, handler)()
