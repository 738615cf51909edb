"""Running the gateway under uvicorn (``dflow serve``, ``dflow demo --serve``)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import uvicorn

import dask.config
from distributed.security import Security

import dflow.config  # noqa: F401
from dflow.gateway.app import create_app
from dflow.gateway.auth import ENV, load_keys

logger = logging.getLogger(__name__)


def serve(
    scheduler: str,
    *,
    host: str | None = None,
    port: int | None = None,
    api_keys_file: str | None = None,
    security: Security | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    announce: Callable[[str], Any] | None = None,
) -> None:
    """Serve the gateway of the cluster at ``scheduler`` until interrupted.

    Options left as ``None`` take the ``dflow.gateway`` config. ``security``
    secures the link to the scheduler (default: Dask's ``distributed.comm.tls``
    config); ``ssl_certfile`` and ``ssl_keyfile`` make the HTTP side HTTPS.
    ``announce`` gets the API's base URL once the gateway listens (default:
    print ``dflow gateway: URL``).
    """

    def setting(value: Any, name: str) -> Any:
        return value if value is not None else dask.config.get(f"dflow.gateway.{name}")

    host = setting(host, "host")
    port = int(setting(port, "port"))
    ssl_certfile = setting(ssl_certfile, "ssl-certfile")
    ssl_keyfile = setting(ssl_keyfile, "ssl-keyfile")
    keys = load_keys(setting(api_keys_file, "api-keys-file"))
    if not keys and not _loopback(host):
        logger.warning(
            "no API keys (--api-keys FILE or $%s): anyone who reaches %s can generate",
            ENV,
            host,
        )
    app = create_app(scheduler, api_keys=keys, security=security)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level="info",
    )
    scheme = "https" if ssl_certfile else "http"
    announce = announce or (lambda url: print(f"dflow gateway: {url}", flush=True))
    asyncio.run(_serve(uvicorn.Server(config), scheme, announce))


async def _serve(
    server: uvicorn.Server, scheme: str, announce: Callable[[str], Any]
) -> None:
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if not server.started:
        await task
        raise SystemExit("the gateway did not start (see the log above)")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    announce(f"{scheme}://{shown}:{port}/v1")
    await task


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
