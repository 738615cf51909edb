"""The synchronous hand-off, the benchmarks' foil to dflow's ahead-of-need chaining.

``dflow.client.map`` sends a request's stage tasks as one graph, so the scheduler
places each stage's task the moment its input exists and the receiving worker
fetches that input while it still computes earlier work.
:class:`SynchronousHandoff` submits the same tasks (same keys, resources and
annotations: :func:`dflow.client.stage_tasks`) one at a time instead: a stage
when the client hears that the previous stage's future finished, as a serving
loop that hands each result on itself would.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import dask
from distributed import Client, Future

from dflow.client import StageTask, stage_tasks
from dflow.request import Request


class Chain:
    """One request's chain of stage tasks under a synchronous hand-off: its last
    task's ``key``, and whether it is over (finished, failed or cancelled)."""

    def __init__(self, key: str):
        self.key = key
        self._over = threading.Event()

    def done(self) -> bool:
        return self._over.is_set()

    def end(self) -> None:
        """Mark the chain over."""
        self._over.set()


class SynchronousHandoff:
    """Submits each stage task of a request when its previous stage finishes.

    Parameters
    ----------
    client
        A client of a scheduler running dflow.
    """

    def __init__(self, client: Client):
        self.client = client
        self._lock = threading.Lock()
        #: futures of the submitted tasks whose output a later stage still needs,
        #: and of each chain's last task
        self._futures: dict[str, Future] = {}
        #: tasks waiting for the key's future to finish
        self._waiting: dict[str, list[tuple[StageTask, Chain]]] = defaultdict(list)
        #: chains by their last key
        self._chains: dict[str, Chain] = {}
        self._closed = False

    def map(self, requests: Sequence[Request], **kwargs: Any) -> list[Chain]:
        """Admit ``requests`` (the arguments of :func:`dflow.client.map`) and
        submit each one's first stage task; returns their chains in order."""
        chains = []
        for tasks in stage_tasks(self.client, requests, **kwargs):
            chain = Chain(tasks[-1].key)
            chains.append(chain)
            with self._lock:
                self._chains[chain.key] = chain
                for task in tasks:
                    if task.key in self._futures:  # shared with an earlier request
                        continue
                    if task.previous is None:
                        self._submit(task, None)
                    else:
                        self._waiting[task.previous].append((task, chain))
                        upstream = self._futures.get(task.previous)
                        if upstream is not None and upstream.done():
                            self._finished(upstream)
        return chains

    def _submit(self, task: StageTask, upstream: Future | None) -> None:
        """Send ``task`` (``upstream``: the future of its input); the lock held."""
        inputs = () if upstream is None else (upstream,)
        with dask.annotate(**task.annotations):
            future = self.client.submit(
                task.function, *task.args, *inputs, key=task.key, pure=False
            )
        self._futures[task.key] = future
        future.add_done_callback(self._on_done)

    def _on_done(self, future: Future) -> None:
        with self._lock:
            self._finished(future)

    def _finished(self, future: Future) -> None:
        """Hand ``future``'s output on to the tasks waiting for it; the lock held."""
        if self._closed:
            return
        key = str(future.key)
        waiting = self._waiting.pop(key, [])
        if future.status == "finished":
            for task, _ in waiting:
                self._submit(task, future)
        else:
            for _, chain in waiting:
                self._end(chain.key)
        if key in self._chains:
            self._end(key)
        # the tasks that take its output hold it on the scheduler now
        elif key not in self._waiting:
            self._futures.pop(key, None)

    def _end(self, key: str) -> None:
        chain = self._chains.pop(key, None)
        if chain is not None:
            chain.end()
        self._futures.pop(key, None)

    def close(self) -> None:
        """Submit nothing more and cancel every task still held."""
        with self._lock:
            self._closed = True
            futures = list(self._futures.values())
            self._futures.clear()
            self._waiting.clear()
            for chain in self._chains.values():
                chain.end()
            self._chains.clear()
        self.client.cancel(futures, force=True)
