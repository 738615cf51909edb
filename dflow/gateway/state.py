"""What the routes share: the gateway's settings, its Dask client, the job store,
the step events and the threads that run dflow's blocking client calls."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, Future, wait

import dflow
import dflow.config
from dflow.errors import InvalidRequest, ModelNotServed, Overloaded
from dflow.events import TOPIC, ProgressTracker
from dflow.gateway import errors, params
from dflow.gateway.errors import APIError
from dflow.gateway.jobs import JobStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Stages a model needs all of to serve disaggregated; "all" serves alone
STAGES = ("encoder", "dit", "vae")
#: Prefixes of the job ids the gateway makes
JOB_PREFIXES = ("video_", "img_")


@dataclass(frozen=True)
class Settings:
    """The ``dflow.gateway`` config, parsed."""

    max_body_size: int
    timeout: float
    result_ttl: float
    sweep_interval: float
    poll_after_ms: int
    retry_after: int
    video_fps: int
    submit_threads: int

    @classmethod
    def from_config(cls) -> Settings:
        def seconds(name: str) -> float:
            return float(parse_timedelta(dask.config.get(f"dflow.gateway.{name}")))

        size = dask.config.get("dflow.gateway.max-body-size")
        return cls(
            max_body_size=parse_bytes(size) if isinstance(size, str) else int(size),
            timeout=seconds("timeout"),
            result_ttl=seconds("result-ttl"),
            sweep_interval=seconds("sweep-interval"),
            poll_after_ms=round(seconds("poll-after") * 1000),
            retry_after=math.ceil(seconds("retry-after")),
            video_fps=int(dask.config.get("dflow.gateway.video-fps")),
            submit_threads=int(dask.config.get("dflow.gateway.submit-threads")),
        )


class Gateway:
    """What the routes share: the Dask client, the job store, the step events,
    and the threads that run dflow's (blocking) client calls."""

    def __init__(self, client: Client, settings: Settings):
        self.client = client
        self.settings = settings
        self.store = JobStore(client)
        self.progress = ProgressTracker(client)
        self.executor = ThreadPoolExecutor(
            settings.submit_threads, thread_name_prefix="dflow-gateway"
        )
        self._tasks: set[asyncio.Task] = set()
        self._video: dict[str, bool] = {}

    async def start(self) -> None:
        self.progress.start()
        self.progress.seed(await self.client.get_events(TOPIC))
        await self.run(dflow.models, self.client)
        self.spawn(self._sweep())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.progress.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coroutine: Any) -> None:
        """Run ``coroutine`` in the background until it ends or the app stops."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in a thread: dflow's client calls block
        (a call from another thread uses the asynchronous client synchronously)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, partial(function, *args, **kwargs)
        )

    # -- requests --------------------------------------------------------------------

    async def model_name(self, name: str | None, body: Any, video: bool) -> str:
        """The model a body names, checked to make videos (``video``) or images;
        without a name, the cluster's only model of that kind."""
        if not name:
            served = [
                m
                for m in sorted(await self.pools())
                if await self.makes_video(m, body) == video
            ]
            if len(served) != 1:
                raise errors.bad_request(
                    "model",
                    f"model: required (served: {', '.join(served) or 'none'})",
                    code="missing_required_parameter",
                )
            return served[0]
        if await self.makes_video(name, body) != video:
            makes, route = (
                ("images", "/v1/images/generations")
                if video
                else ("videos", "/v1/videos")
            )
            raise errors.bad_request(
                "model", f"model: {name} makes {makes}: use POST {route}", "wrong_model"
            )
        return name

    async def makes_video(self, model: str, body: Any) -> bool:
        """Whether ``model`` makes videos; 404 if neither this process nor the
        cluster knows it (asked once: it may serve a folder only it has)."""
        if model not in self._video:
            probe = {"prompt": "probe"}
            try:
                (request,) = await self.run(params.build, model, probe, body)
            except APIError as error:
                if error.param != "model" or error.status != 404:
                    raise
                await self.run(dflow.models, self.client)
                (request,) = await self.run(params.build, model, probe, body)
            self._video[model] = request.spec.video
        return self._video[model]

    async def submit(
        self,
        model: str,
        fields: dict[str, Any],
        body: Any,
        n: int = 1,
        deadline: float | None = None,
        **extra: Any,
    ) -> tuple[list[dflow.Request], list[Future]]:
        """Build ``n`` requests (:func:`params.build`) and ``dflow.map`` them, in
        one trip to a thread; dflow's refusals come back as HTTP errors."""

        def build_and_map() -> tuple[list[dflow.Request], list[Future]]:
            requests = params.build(model, fields, body, n, **extra)
            return requests, dflow.map(self.client, requests, deadline=deadline)

        try:
            return await self.run(build_and_map)
        except Overloaded as error:
            raise APIError(
                429,
                str(error),
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.settings.retry_after)},
            ) from None
        except ModelNotServed as error:
            raise await self.not_served(model, error) from None
        except InvalidRequest as error:
            raise params.invalid(error, body) from None
        except ConnectionError as error:
            raise unavailable(error) from None

    async def not_served(self, model: str, error: Exception) -> APIError:
        """A 503 naming the stages of ``model`` without workers."""
        stages = (await self.pools()).get(model, {})
        missing = [s for s in STAGES if s not in stages]
        return APIError(
            503,
            f"model {model!r} has no workers for stage(s) {', '.join(missing)} "
            f"(and no --stage all worker): {error}",
            type="server_error",
            code="model_not_served",
        )

    async def pools(self) -> dict[str, dict[str, list[str]]]:
        """``{model: {stage: [worker names]}}`` of the workers serving now, read
        from their Dask resources (``"dit:<model>"``)."""
        scheduler = self.client.scheduler
        assert scheduler is not None, "the client is not connected"
        try:
            info = await asyncio.wait_for(scheduler.identity(n_workers=-1), timeout=10)
        except (TimeoutError, OSError) as error:
            raise unavailable(error) from None
        pools: defaultdict[str, dict[str, list[str]]] = defaultdict(dict)
        for address, worker in sorted(info["workers"].items()):
            for resource, quantity in (worker.get("resources") or {}).items():
                stage, colon, model = str(resource).partition(":")
                if colon and quantity > 0:
                    pools[model].setdefault(stage, []).append(
                        str(worker.get("name") or address)
                    )
        return dict(pools)

    # -- job bookkeeping -------------------------------------------------------------

    def watch(self, key: str, future: Future) -> None:
        """Note when the job ends, in its record."""

        async def finished() -> None:
            await wait([future])
            if future.status in ("finished", "error"):
                await self.ended(key)

        self.spawn(finished())

    async def ended(self, key: str) -> dict[str, Any] | None:
        """Note that job ``key`` ended now, unless its record says so already;
        returns the record (None if the job is gone)."""
        record = await self.store.record(key)
        if record is None or record.get("completed_at") is not None:
            return record
        now = int(time.time())
        expires = now + int(self.settings.result_ttl)
        await self.store.note(key, completed_at=now, expires_at=expires)
        return {**record, "completed_at": now, "expires_at": expires}

    async def _sweep(self) -> None:
        """Periodically: note jobs that ended unwatched (their gateway is gone),
        drop expired results."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweeping expired results failed")

    async def sweep(self) -> None:
        open_jobs = [
            r["id"]
            for r in await self.store.records("video_")
            if r.get("completed_at") is None
        ]
        for key, state in (await self.store.states(open_jobs)).items():
            if state in ("memory", "erred"):
                await self.ended(key)
        dropped = await self.store.expire(JOB_PREFIXES)
        if dropped:
            logger.info("dropped %d expired results", dropped)


def unavailable(error: BaseException) -> APIError:
    return APIError(
        503,
        f"the dflow scheduler is unavailable: {type(error).__name__}: {error}",
        type="server_error",
        code="scheduler_unavailable",
    )
