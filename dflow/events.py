"""Denoising progress as Dask events: what a DiT reports after each step, and
who reads it (``dflow.progress`` in notebooks and terminals, the HTTP gateway's
video jobs).

A denoising task logs ``{"request", "key", "step", "steps"}`` under the topic
``dflow-progress`` (:meth:`distributed.Worker.log_event`), at most one step per
``dflow.runtime.progress-interval``, never the last (the task's end); the scheduler keeps
the latest events of the topic and forwards each to the clients that subscribe.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Future, default_client, get_worker, wait
from distributed.worker import thread_state

TOPIC = "dflow-progress"


def request_id(key: Any) -> str:
    """The request id in a stage task's key (``"<stage prefix>-<request id>"``,
    as :func:`dflow.map` names them)."""
    return str(key).partition("-")[2]


def step_reporter(steps: int, done: int = 0) -> Callable[[], None]:
    """In a denoising task: a function to call after each step, which reports
    it as an event; ``done``: the request's steps run before this task (by
    another expert's pool). Outside a Dask task it does nothing.

    The first step is reported, then a step only if
    ``dflow.runtime.progress-interval`` has passed since the last one reported:
    an event costs the worker and the scheduler a message, which steps of a few
    milliseconds would pay many times over. The request's last step is not
    reported: its denoise task's end says it, and an event sent just before
    would hold the task's result back by the worker's batched-send interval."""
    key = getattr(thread_state, "key", None)
    if key is None:
        return lambda: None
    worker = get_worker()
    task = worker.state.tasks.get(key)
    annotation = ((task.annotations if task else None) or {}).get("dflow") or {}
    request = annotation.get("request") or request_id(key)
    interval = parse_timedelta(dask.config.get("dflow.runtime.progress-interval"))
    reported = -math.inf

    def report() -> None:
        nonlocal done, reported
        done += 1
        now = time.monotonic()
        if done == steps or now - reported < interval:
            return
        reported = now
        worker.log_event(
            TOPIC, {"request": request, "key": str(key), "step": done, "steps": steps}
        )

    return report


class ProgressTracker:
    """The latest denoising step of recent requests, from a client's subscription
    to the step events (the newest ``size`` requests are kept).

    Parameters
    ----------
    client
        Its event handler runs on the client's event loop.
    on_step
        Also called with each event's message, after it is recorded.
    """

    def __init__(
        self,
        client: Client,
        size: int = 10_000,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.client = client
        self.size = size
        self.on_step = on_step
        self._steps: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Subscribe; call :meth:`seed` after, for steps reported before."""
        self.client.subscribe_topic(TOPIC, self._handle)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.client.unsubscribe_topic(TOPIC)

    def seed(self, events: Iterable[tuple[float, Any]]) -> None:
        """Record events read with ``client.get_events(TOPIC)``."""
        for event in events:
            self._handle(event)

    def step(self, request: str) -> tuple[int, int] | None:
        """``(steps done, steps)`` of a request, or None before its first step."""
        with self._lock:
            return self._steps.get(request)

    def _handle(self, event: tuple[float, Any]) -> None:
        _, message = event
        if not isinstance(message, dict) or "request" not in message:
            return
        request, step = message["request"], (message["step"], message["steps"])
        with self._lock:
            previous = self._steps.get(request)
            if previous is None or step[0] >= previous[0]:
                self._steps[request] = step
                self._steps.move_to_end(request)
            while len(self._steps) > self.size:
                self._steps.popitem(last=False)
        if self.on_step is not None:
            self.on_step(message)


def progress(
    futures: Future | Iterable[Future],
    *,
    client: Client | None = None,
    file: Any = None,
) -> None:
    """Show a bar of the denoising steps of dflow requests until all are done.

    The bar counts steps as the DiT workers report them; a request that ends
    (done, failed or cancelled) counts all its steps. Works in terminals and
    notebooks (text, no widgets needed).

    Parameters
    ----------
    futures
        Futures of :func:`dflow.submit` or :func:`dflow.map`.
    client
        Their client (default: the current one). Its event handler for the
        progress topic is replaced while the bar runs.
    file
        Where the bar goes (default: standard error).

    Examples
    --------
    >>> futures = dflow.map(client, requests)  # doctest: +SKIP
    >>> dflow.progress(futures)  # doctest: +SKIP
    """
    from tqdm import tqdm

    futures = [futures] if isinstance(futures, Future) else list(futures)
    client = client or (futures[0].client if futures else default_client())
    ids = {request_id(f.key) for f in futures}
    counted: dict[str, tuple[int, int]] = {}
    ended: set[str] = set()
    lock = threading.Lock()
    with tqdm(total=0, unit="step", desc="denoising", file=file) as bar:

        def update(request: str, done: int, steps: int) -> None:
            with lock:
                if request in ended:
                    return
                before = counted.get(request, (0, 0))
                counted[request] = (max(done, before[0]), steps)
                bar.total += steps - before[1]
                bar.update(counted[request][0] - before[0])

        def end(request: str) -> None:
            steps = counted.get(request, (0, 1))[1]
            update(request, steps, steps)
            with lock:
                ended.add(request)
                bar.set_postfix_str(f"{len(ended)}/{len(ids)} requests done")

        def on_step(message: dict[str, Any]) -> None:
            if message["request"] in ids:
                update(message["request"], message["step"], message["steps"])

        tracker = ProgressTracker(client, on_step=on_step)
        with _subscribed(tracker):
            for future in futures:
                future.add_done_callback(lambda f: end(request_id(f.key)))
            wait(futures)
        for request in ids:
            end(request)


@contextlib.contextmanager
def _subscribed(tracker: ProgressTracker) -> Iterator[None]:
    tracker.start()
    try:
        tracker.seed(tracker.client.get_events(TOPIC))
        yield
    finally:
        tracker.stop()
