"""The app factory and the gateway's ASGI middleware (body cap, Prometheus
metrics)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distributed import Client
from distributed.security import Security

import dflow
from dflow.gateway import errors, routes
from dflow.gateway.auth import KeyCheck
from dflow.gateway.errors import APIError
from dflow.gateway.state import Gateway, Settings


def create_app(
    scheduler: str | Client,
    *,
    api_keys: Iterable[bytes] = (),
    security: Security | None = None,
) -> FastAPI:
    """The gateway's ASGI app, serving the dflow cluster at ``scheduler``.

    Parameters
    ----------
    scheduler
        The scheduler's address (the app connects on startup, with ``security``
        or Dask's TLS config) or an asynchronous client to use.
    api_keys
        Bearer keys a ``/v1`` request must carry (none: no authentication).
    """
    settings = Settings.from_config()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(scheduler, Client):
            client, own = scheduler, False
        else:
            # the default client: distributed.wait and spec lookups use it
            client = await Client(scheduler, asynchronous=True, security=security)
            own = True
        gateway = Gateway(client, settings)
        app.state.gateway = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()
            if own:
                await client.close()

    app = FastAPI(
        title="dflow",
        summary="OpenAI-compatible HTTP gateway of a dflow cluster",
        version=dflow.__version__,
        lifespan=lifespan,
    )
    app.state.metrics = metrics = Metrics()
    errors.install(app)
    routes.install(app, KeyCheck(api_keys))
    app.add_middleware(BodyLimit, limit=settings.max_body_size)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
)
LATENCY_BUCKETS += (2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dflow_gateway_requests",
            "HTTP requests answered, by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dflow_gateway_request_latency_seconds",
            "Time from a request's arrival to its answer",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "dflow_gateway_requests_in_flight",
            "HTTP requests being answered",
            ["route", "method"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Count, time and gauge every HTTP request by its route's path template
    (``/v1/videos/{video_id}``, so ids do not blow up the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route(scope)
        method = scope["method"]
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        in_flight = self.metrics.in_flight.labels(route, method)
        in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            in_flight.dec()
            self.metrics.latency.labels(route, method).observe(
                time.perf_counter() - start
            )
            self.metrics.requests.labels(route, method, str(status)).inc()


def _route(scope: Scope) -> str:
    for route in scope["app"].routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413: at once when the
    ``Content-Length`` says so, else as soon as the body read grows past it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self.too_large().response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self.too_large()
            return message

        await self.app(scope, limited, send)

    def too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is over the limit of {self.limit} bytes "
            "(dflow.gateway.max-body-size)",
            code="request_too_large",
        )
