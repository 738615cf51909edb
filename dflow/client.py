"""The client API: requests in, Dask futures of :class:`~dflow.output.Output` out.

``submit`` sends a request's three stage tasks at once ("ahead of need"), so
embeddings and latents move worker to worker as soon as they exist and each
stage worker fetches its next input while computing the current one. The
client holds only the output future: intermediates are released as soon as
the next stage has consumed them, and cancelling the output releases the chain.
The scheduler admits requests before their graph is sent
(:mod:`dflow.plugins.admission`); a client reuses a standing answer without
asking again (:class:`StandingAdmissions`).
"""

from __future__ import annotations

import math
import numbers
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dask.config
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import parse_timedelta
from distributed import Client, Future

import dflow.config  # noqa: F401
from dflow import prompts, tasks
from dflow.catalog import register
from dflow.errors import InvalidRequest, ModelNotServed, Overloaded
from dflow.pools import (
    ADMISSION_TOPIC,
    MONOLITHIC,
    TASK_PREFIXES,
    Pool,
    task_resources,
)
from dflow.request import Request
from dflow.spec import ModelSpec

#: Task key prefix and function per stage
STAGE_TASKS = {
    stage: (TASK_PREFIXES[stage], function)
    for stage, function in (
        ("encoder", tasks.encode),
        ("dit", tasks.denoise),
        ("dit-high", tasks.denoise_high),
        ("dit-low", tasks.denoise_low),
        ("vae", tasks.decode),
        ("all", tasks.generate),
    )
}
MODES = ("disaggregated", "monolithic")
#: How a scheduler gets dflow, for the error a client raises on one without it
INSTALL_HINT = (
    "start it with `dask scheduler --preload dflow.preload` (dflow.cluster."
    "StageCluster does so; a LocalCluster takes scheduler_kwargs={'preload': "
    "['dflow.preload']})"
)


def submit(
    client: Client,
    request: Request,
    *,
    mode: str | None = None,
    deadline: str | float | None = None,
    slo: str | float | None = None,
) -> Future:
    """Submit one request; returns a future of its :class:`~dflow.output.Output`.

    Parameters
    ----------
    client
        A client of a scheduler running dflow (``dask scheduler --preload
        dflow.preload``, or a :class:`~dflow.cluster.StageCluster`).
    request
        A validated request.
    mode
        ``"disaggregated"`` (encode, denoise, decode on stage workers),
        ``"monolithic"`` (one task on a ``--stage all`` worker), or ``None``:
        disaggregated if the cluster has all three stage pools of the model,
        else monolithic.
    deadline
        Seconds (or a duration like ``"30s"``) after submission past which the
        request is cancelled: its future raises ``FutureCancelledError`` with
        reason ``deadline-exceeded`` and its work stops (config
        ``dflow.client.deadline``; default none).
    slo
        Seconds (or a duration) after submission by which the request should
        be done: each stage pool serves its tasks earliest deadline first, and
        a request past saving after those that can still make theirs, but
        unlike ``deadline`` it is never cancelled. Default: ``deadline`` if
        given, else config ``dflow.slo`` (per model, or a factor of its
        predicted latency alone).

    Raises
    ------
    ModelNotServed
        If no worker serves (or is loading) the model within
        ``dflow.client.model-timeout``.
    Overloaded
        If the model has ``dflow.admission.max-outstanding`` requests in flight
        and none finishes within ``dflow.admission.timeout``.
    InvalidRequest
        If no worker of a stage has the memory the request needs, or the prompt
        is over the model's token limit (checked here where the model's
        tokenizer is available, else by the encoder worker).
    RuntimeError
        If the scheduler does not run dflow (started without ``--preload
        dflow.preload``).

    ConnectionError
        If the client lost its scheduler (its futures were cancelled with reason
        ``scheduler-connection-lost``).
    ValueError, TypeError
        If ``mode``, ``deadline`` or ``slo`` is not one the docs above allow.

    Notes
    -----
    A request whose admission is standing (the scheduler answered the same for
    this model and these features before, no limit applies to the model and no
    stage is restricted to some workers) is submitted without asking again. If
    the pools changed in the moment before this client heard of it, the
    scheduler routes the request again when it arrives, and a refusal (no worker
    can hold it) comes through its future instead.

    Examples
    --------
    >>> future = dflow.submit(client, dflow.Request(model="tiny-flux", prompt="a fox"))  # doctest: +SKIP
    >>> future.result().images[0]  # doctest: +SKIP
    """
    (future,) = map(client, [request], mode=mode, deadline=deadline, slo=slo)
    return future


def map(
    client: Client,
    requests: Iterable[Request],
    *,
    mode: str | None = None,
    deadline: str | float | None = None,
    slo: str | float | Sequence[str | float | None] | None = None,
) -> list[Future]:
    """Submit many requests in one graph; returns their output futures in order.

    Takes the arguments of :func:`submit` (``slo`` also as one value per
    request); admission is all or nothing.
    """
    chains = stage_tasks(client, requests, mode=mode, deadline=deadline, slo=slo)
    if not chains:
        return []
    layers: dict[str, MaterializedLayer] = {}
    dependencies: dict[str, set[str]] = {}
    for chain in chains:
        for stage_task in chain:
            layers[stage_task.key] = MaterializedLayer(
                {stage_task.key: stage_task.task()},
                annotations=stage_task.annotations,
            )
            previous = stage_task.previous
            dependencies[stage_task.key] = {previous} if previous else set()
    graph = HighLevelGraph(layers, dependencies)
    prompt_sends(client)
    futures = client.get(graph, [chain[-1].key for chain in chains], sync=False)
    return [RequestFuture(future.key, client) for future in futures]


def prompt_sends(client: Client) -> None:
    """Let the client's messages to the scheduler wait at most
    ``dflow.client.send-interval`` to be batched.

    distributed batches them for up to 10 ms after the previous send, so a
    request submitted just after the previous one's futures were released waits
    that long before the scheduler sees it. The scheduler's own streams batch
    for 2-5 ms.
    """
    comm = client.scheduler_comm
    if comm is not None:
        comm.interval = parse_timedelta(dask.config.get("dflow.client.send-interval"))


@dataclass(frozen=True)
class StageTask:
    """One stage task of a request's chain: what :func:`map` puts in its graph."""

    key: str
    function: Callable[..., Any]
    #: its arguments but the previous stage's output
    args: tuple[Any, ...]
    #: the Dask annotations of the task (resources, dflow's request info)
    annotations: dict[str, Any]
    #: the key whose output is its last argument (``None``: the chain's first)
    previous: str | None

    def task(self) -> tuple[Any, ...]:
        """The task as a graph holds it (the previous stage's output by key)."""
        if self.previous is None:
            return (self.function, *self.args)
        return (self.function, *self.args, self.previous)


def stage_tasks(
    client: Client,
    requests: Iterable[Request],
    *,
    mode: str | None = None,
    deadline: str | float | None = None,
    slo: str | float | Sequence[str | float | None] | None = None,
) -> list[list[StageTask]]:
    """Check and admit ``requests`` (as :func:`map`), and return each one's
    chain of stage tasks, in order. Requests with equal text encodings share
    one encode task: the first chain holds it, the others start at the task
    that takes its output."""
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
        # where the model's tokenizer is here; the encoder worker checks anyway
        prompts.check_length(request)
    if client.status in ("connecting", "closing", "closed"):
        # else the admission call retries the lost scheduler's address for
        # distributed.comm.timeouts.connect (30 s) before failing
        raise ConnectionError(
            f"the client has no scheduler (status {client.status!r}; scheduler "
            f"{getattr(client.scheduler, 'address', None)}): requests in flight were "
            "cancelled; submit again once a scheduler serves at that address (the "
            "client reconnects within its timeout) or with a new Client"
        )
    if deadline is None:
        deadline = dask.config.get("dflow.client.deadline")
    seconds = _deadline_seconds(deadline)
    features = [_annotated_features(r) for r in requests]
    slos = _slos(slo, len(requests))
    admitted = _admit(client, requests, features, mode)
    encodings: set[str] = set()
    chains = []
    for request, request_features, admission, request_slo in zip(
        requests, features, admitted, slos
    ):
        request_id = uuid.uuid4().hex[:16]
        chain: list[StageTask] = []
        previous: str | None = None
        # an input image's pixels go to the task that encodes it, in its own
        # argument; every other task gets the request without them
        light = request.without_pixels()
        for stage, workers in admission["workers"].items():
            prefix, function = STAGE_TASKS[stage]
            key = f"{prefix}-{request_id}"
            if stage == "encoder":
                key = encoding_key(request)
                if key in encodings:  # an earlier request here shares the encoding
                    previous = key
                    continue
                encodings.add(key)
            args: tuple[Any, ...]
            if stage == MONOLITHIC:
                args = (request,)
            elif previous is None:
                args = (light,) if request.image is None else (light, request.image)
            else:
                args = (light,)
            annotations: dict[str, Any] = {
                "resources": task_resources(Pool(stage, request.model)),
                "dflow": {
                    "stage": stage,
                    "model": request.model,
                    "request": request_id,
                    "mode": admission["mode"],
                    "features": request_features,
                    "deadline": seconds,
                    "epoch": admission["epoch"],
                    "standing": admission["standing"],
                    "slo": request_slo,
                },
            }
            if workers is not None:
                # some workers of the pool lack the memory for this request
                annotations["workers"] = workers
            chain.append(StageTask(key, function, args, annotations, previous))
            previous = key
        assert previous is not None
        chains.append(chain)
    return chains


class RequestFuture(Future):
    """The output future of a request: a :class:`distributed.Future` whose
    ``cancel()`` gives the reason ``cancelled`` (distributed's default reason
    reads "unknown"), and whose ``result()`` fetches the output from the worker
    that holds it, not through the scheduler, where the client was made from a
    cluster object (``Client(StageCluster(...))``: its workers are on this
    process's network) and distributed's ``direct-to-workers`` is not set."""

    def cancel(self, reason: str | None = None, msg: str | None = None, **kwargs):
        return super().cancel(reason=reason or "cancelled", msg=msg, **kwargs)

    async def _result(self, raiseit: bool = True) -> Any:
        client = self.client
        if client.direct_to_workers is not None or client.cluster is None:
            return await super()._result(raiseit)
        assert self._state is not None
        await self._state.wait()
        if self.status != "finished":
            return await super()._result(raiseit)
        (output,) = await client.gather([self], direct=True, asynchronous=True)
        return output


def _admit(
    client: Client,
    requests: Sequence[Request],
    features: Sequence[dict[str, Any]],
    mode: str | None,
) -> list[dict[str, Any]]:
    """The scheduler's admission of ``requests``: their standing answers where
    this client has them all, else its answer now (raising its refusal)."""
    standing = _standing_admissions(client)
    # the scheduler the client is connected to now: answers of one it lost and
    # reconnected to at the same address do not hold
    scheduler = client._scheduler_identity.get("id")
    admitted = standing.lookup(scheduler, requests, features, mode)
    if admitted is not None:
        return admitted
    answer = client.sync(
        _scheduler_call,
        client,
        "dflow_admit",
        client_id=client.id,
        requests=[
            {"model": r.model, "features": f} for r, f in zip(requests, features)
        ],
        mode=mode,
        model_timeout=parse_timedelta(dask.config.get("dflow.client.model-timeout")),
        admission_timeout=parse_timedelta(dask.config.get("dflow.admission.timeout")),
    )
    if "error" in answer:
        raise _refusal(answer)
    standing.keep(requests, features, mode, answer)
    return [{**a, "epoch": answer["epoch"]} for a in answer["admitted"]]


class StandingAdmissions:
    """A client's standing admission answers (:mod:`dflow.plugins.admission`):
    per model, mode asked and request features, the mode requests run in, for as
    long as the scheduler's admission epoch is the one they were given in. The
    scheduler publishes each new epoch on ``dflow-admission``; a client that
    asked hears it."""

    #: Most answers kept; past it they are dropped and asked again
    size = 1024

    def __init__(self, client: Client):
        self._lock = threading.Lock()
        self._scheduler: str | None = None
        self._epoch = -1
        #: question -> (mode, the stages of its chain, epoch)
        self._answers: dict[tuple, tuple[str, tuple[str, ...], int]] = {}
        client.subscribe_topic(ADMISSION_TOPIC, self._on_epoch)

    def lookup(
        self,
        scheduler: str | None,
        requests: Sequence[Request],
        features: Sequence[dict[str, Any]],
        mode: str | None,
    ) -> list[dict[str, Any]] | None:
        """Admissions of all ``requests`` from the standing answers of
        ``scheduler`` (its id), or ``None``."""
        admitted = []
        with self._lock:
            if scheduler is None or scheduler != self._scheduler:
                return None
            for request, request_features in zip(requests, features):
                answer = self._answers.get(_question(request, request_features, mode))
                if answer is None or answer[2] < self._epoch:
                    return None
                request_mode, stages, epoch = answer
                admitted.append(
                    {
                        "mode": request_mode,
                        "workers": dict.fromkeys(stages),
                        "standing": True,
                        "epoch": epoch,
                    }
                )
        return admitted

    def keep(
        self,
        requests: Sequence[Request],
        features: Sequence[dict[str, Any]],
        mode: str | None,
        answer: dict[str, Any],
    ) -> None:
        """Keep the standing answers of an admission's ``answer``."""
        with self._lock:
            self._observe(answer["scheduler"], answer["epoch"])
            if len(self._answers) > self.size:
                self._answers.clear()
            for request, request_features, admission in zip(
                requests, features, answer["admitted"]
            ):
                if admission["standing"]:
                    question = _question(request, request_features, mode)
                    self._answers[question] = (
                        admission["mode"],
                        tuple(admission["workers"]),
                        answer["epoch"],
                    )

    def _on_epoch(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._lock:
            self._observe(message["scheduler"], message["epoch"])

    def _observe(self, scheduler: str, epoch: int) -> None:
        """Note the newest epoch of ``scheduler``: answers of older epochs
        lapse, and all answers of another scheduler (a restarted one)."""
        if scheduler != self._scheduler:
            self._answers.clear()
            self._scheduler, self._epoch = scheduler, epoch
        else:
            self._epoch = max(self._epoch, epoch)


_standing: weakref.WeakKeyDictionary[Client, StandingAdmissions] = (
    weakref.WeakKeyDictionary()
)
_standing_lock = threading.Lock()


def _standing_admissions(client: Client) -> StandingAdmissions:
    with _standing_lock:
        if client not in _standing:
            _standing[client] = StandingAdmissions(client)
        return _standing[client]


def _question(
    request: Request, features: dict[str, Any], mode: str | None
) -> tuple[Any, ...]:
    return (request.model, mode, tuple(sorted(features.items())))


def encoding_key(request: Request) -> str:
    """The key of a request's encode task: equal for requests whose text
    encodings are equal (:func:`dflow.prompts.encoding_fields`: model, prompt,
    negative prompt, whether guidance encodes the negative prompt, and an input
    image with the output's shape), so requests in flight together run the
    encoder once (a graph's key already on the scheduler is reused, not run
    again)."""
    return f"encode-{tokenize(*prompts.encoding_fields(request))}"


def status(client: Client) -> dict[str, Any]:
    """The cluster's view per stage, its workers, the last decisions and the
    workers' health.

    Returns ``{"stages": {"encoder": {...}, "dit": {...}, "vae": {...}, "all":
    {...}} (and ``dit-high``, ``dit-low`` while workers serve one expert),
    "workers": [...], "failures": [...], "decisions": [...], "health": {...}}``;
    each stage has ``workers``, ``loading``, ``queue``, ``arrival_rate``,
    ``predicted_s`` and ``observed_s``; each worker its ``name``, ``stage``,
    ``model``, ``state`` and, if it failed to load, the ``reason``; each
    decision a ``kind`` (``move``, or ``fence``, ``unfence``, ``retire``,
    ``slow``) and a ``reason``; ``health`` has per worker name its ``state``,
    ``speed`` (against its GPU type), ``slow``, ``health`` (what is wrong) and
    ``fences``, and the ``counts`` of fences, unfences, retirements and slow
    reports per stage.
    """
    return _lists(client.sync(_scheduler_call, client, "dflow_status"))


def _lists(value: Any) -> Any:
    """``value`` with the tuples msgpack decodes lists into as lists again."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def models(client: Client) -> list[str]:
    """Names of the models the cluster serves; their specs become resolvable here,
    so requests for models whose folders are only on the workers validate."""
    specs = client.sync(_scheduler_call, client, "dflow_models")
    for data in specs.values():
        register(ModelSpec.from_dict(data))
    return sorted(specs)


def _refusal(answer: dict[str, Any]) -> Exception:
    """The exception a refused admission raises on the client."""
    if answer["error"] == "InvalidRequest":
        field = answer["field"]
        return InvalidRequest(field, answer["message"].removeprefix(f"{field}: "))
    error = {"ModelNotServed": ModelNotServed, "Overloaded": Overloaded}[
        answer["error"]
    ]
    return error(answer["message"])


def _slos(slo: Any, count: int) -> list[float | None]:
    """Each request's SLO in seconds (``None``: the configured one)."""
    if isinstance(slo, Sequence) and not isinstance(slo, str):
        if len(slo) != count:
            raise ValueError(
                f"slo: expected one value per request ({count}), got {len(slo)}"
            )
        return [_deadline_seconds(s, "slo") for s in slo]
    return [_deadline_seconds(slo, "slo")] * count


def _deadline_seconds(deadline: Any, name: str = "deadline") -> float | None:
    """A deadline (or ``name``) in seconds; else a ValueError or TypeError naming
    it (dask's ``parse_timedelta`` raises KeyError, AttributeError or
    OverflowError on some input)."""
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (numbers.Real, str)):
        raise TypeError(
            f"{name}: expected seconds or a duration like '30s', "
            f"got {type(deadline).__name__}"
        )
    if isinstance(deadline, numbers.Real):
        try:
            seconds = float(deadline)
        except OverflowError:
            seconds = math.inf
    else:
        try:
            seconds = parse_timedelta(deadline)
        except (ValueError, KeyError, OverflowError):
            raise ValueError(
                f"{name}: {deadline!r:.40} is not a duration (use seconds or "
                "e.g. '30s')"
            ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name}: must be positive and finite, got {deadline!r:.40}")
    return float(seconds)


def _annotated_features(request: Request) -> dict[str, Any]:
    return {
        k: v for k, v in request.features.items() if isinstance(v, (int, float, bool))
    }


async def _scheduler_call(client: Client, handler: str, **kwargs: Any) -> Any:
    """Call a dflow handler on the scheduler; a ``RuntimeError`` saying how to
    install dflow when the scheduler lacks it (it answers ``None`` for a
    handler it does not have, which no dflow handler answers)."""
    answer = await getattr(client.scheduler, handler)(**kwargs)
    if answer is None:
        address = getattr(client.scheduler, "address", None)
        raise RuntimeError(
            f"the scheduler at {address} does not run dflow: " + INSTALL_HINT
        )
    return answer
