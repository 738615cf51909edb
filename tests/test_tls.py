"""TLS: scheduler, ``dflow-worker``, client and dashboard over ``tls://`` / HTTPS.

The test makes a certificate authority and certificates with the ``openssl``
command line (skipped without it), starts a real ``dask scheduler --protocol tls``
with dflow's preload and dashboard (HTTPS through
``distributed.scheduler.dashboard.tls.*``), and one ``dflow-worker`` per stage of
tiny Flux with the same certificate flags, so stage inputs also move worker to
worker over TLS. A client with a certificate of the CA runs requests; clients
without one, or with one of another CA, cannot connect. Last, ``dflow serve``
reaches the scheduler over TLS and serves HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest

from distributed import Client
from distributed.comm import connect as comm_connect
from distributed.comm.core import CommClosedError, FatalCommClosedError
from distributed.security import Security

import dflow
from dflow.request import Request
from dflow.spec import STAGES
from dflow.testing import (
    gateway_process,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

# functions sent to the scheduler are pickled by value: it cannot import tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [
    # real scheduler and worker processes
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("openssl") is None, reason="needs the openssl command line"
    ),
]

MODEL = "tiny-flux"


@dataclass(frozen=True)
class Certificates:
    """A CA and a certificate it signed (with its key), as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def security(self, **kwargs) -> Security:
        return Security(
            tls_ca_file=str(self.ca),
            tls_client_cert=str(self.cert),
            tls_client_key=str(self.key),
            require_encryption=True,
            **kwargs,
        )

    def flags(self) -> list[str]:
        """``dask scheduler`` / ``dflow-worker`` options."""
        return [
            "--tls-ca-file",
            str(self.ca),
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
        ]


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def make_certificates(folder: Path, name: str) -> Certificates:
    """A self-signed CA ``name`` and a certificate for 127.0.0.1 it signed."""
    folder.mkdir()
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    openssl(
        "req", *key, "-keyout", "node.key", "-out", "node.csr",
        "-subj", "/CN=127.0.0.1",
        cwd=folder,
    )  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "san.ext",
        cwd=folder,
    )  # fmt: skip
    return Certificates(folder / "ca.pem", folder / "node.pem", folder / "node.key")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Certificates]:
    root = tmp_path_factory.mktemp("tls")
    return {
        "cluster": make_certificates(root / "cluster", "dflow test CA"),
        "rogue": make_certificates(root / "rogue", "another CA"),
    }


@dataclass
class TlsCluster:
    address: str
    client: Client
    dashboard: int


def dashboard_port(dask_scheduler) -> int:
    return dask_scheduler.http_server.port


@pytest.fixture(scope="module")
def cluster(certificates, tiny_folders, tmp_path_factory) -> Iterator[TlsCluster]:
    certs = certificates["cluster"]
    logs = tmp_path_factory.mktemp("tls-logs")
    # the dashboard's HTTPS: distributed reads these when it starts its server
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CERT": str(certs.cert),
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__KEY": str(certs.key),
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CA_FILE": str(certs.ca),
        "DASK_DFLOW__ELASTIC__ENABLED": "False",
    }
    args = ["--protocol", "tls", *certs.flags(), "--dashboard"]
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(
            scheduler_process(env=env, args=args, log_dir=logs)
        )
        workers = stack.enter_context(
            worker_processes(
                address, [(s, MODEL) for s in STAGES], args=certs.flags(), log_dir=logs
            )
        )
        client = stack.enter_context(Client(address, security=certs.security()))
        wait_for_pools(client, {MODEL: STAGES}, processes=workers, timeout=240)
        port = client.run_on_scheduler(dashboard_port)
        yield TlsCluster(address, client, port)


def test_requests_run_over_tls(cluster):
    client = cluster.client
    assert cluster.address.startswith("tls://127.0.0.1:")
    workers = client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 3 and all(a.startswith("tls://") for a in workers)
    requests = [Request(model=MODEL, prompt="a fox", seed=seed) for seed in range(3)]
    outputs = client.gather(dflow.map(client, requests))
    assert [o.request for o in outputs] == requests
    # the scheduler knows this client alone: nothing else got in
    (info,) = [c for c in client.run_on_scheduler(client_ids) if c != "fire-and-forget"]
    assert info == client.id


def client_ids(dask_scheduler) -> list[str]:
    return list(dask_scheduler.clients)


def test_dashboard_serves_https_only(cluster, certificates):
    context = ssl.create_default_context(cafile=str(certificates["cluster"].ca))
    url = f"https://127.0.0.1:{cluster.dashboard}"
    with urllib.request.urlopen(f"{url}/dflow", context=context, timeout=60) as page:
        assert page.status == 200
        assert b"bokeh" in page.read().lower()
    with urllib.request.urlopen(f"{url}/health", context=context, timeout=60) as page:
        assert page.read() == b"ok"
    # a browser that does not trust the cluster's CA refuses the page
    rogue = ssl.create_default_context(cafile=str(certificates["rogue"].ca))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{url}/health", context=rogue, timeout=60)
    # and plain HTTP gets no page
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(
            f"http://127.0.0.1:{cluster.dashboard}/health", timeout=60
        )


def identity(address: str, security: Security) -> dict:
    """Connect to ``address`` as a client with ``security`` and ask who is there.

    At the level of Dask's comms, as every client, worker and tool connects, and
    without a :class:`~distributed.Client`: a Client whose start fails can hang
    in its ``__del__`` (distributed 2026.8).
    """

    async def ask() -> dict:
        comm = await comm_connect(
            address, timeout="10s", **security.get_connection_args("client")
        )
        try:
            await comm.write({"op": "identity"})
            return await comm.read()
        finally:
            comm.abort()

    return asyncio.run(ask())


def test_clients_without_a_valid_certificate_cannot_connect(cluster, certificates):
    good, rogue = certificates["cluster"], certificates["rogue"]
    address = cluster.address
    assert identity(address, good.security())["type"] == "Scheduler"

    # no certificate: the client cannot start a TLS connection
    with pytest.raises(TypeError, match="TLS expects a `ssl_context` argument"):
        identity(address, Security())
    with pytest.raises(TypeError, match="TLS expects a `ssl_context` argument"):
        identity(address, Security(tls_ca_file=str(good.ca), require_encryption=True))
    # plain TCP to the TLS port: the scheduler hangs up
    with pytest.raises(CommClosedError):
        identity(address.replace("tls://", "tcp://"), Security())
    # a certificate of another CA: the scheduler rejects the handshake
    impostor = Security(
        tls_ca_file=str(good.ca),
        tls_client_cert=str(rogue.cert),
        tls_client_key=str(rogue.key),
        require_encryption=True,
    )
    with pytest.raises(CommClosedError, match="SSL"):
        identity(address, impostor)
    # trusting another CA only: the client rejects the scheduler
    with pytest.raises(FatalCommClosedError, match="TLS certificate does not match"):
        identity(address, rogue.security())
    # none of them got in
    others = [
        c for c in cluster.client.run_on_scheduler(client_ids) if c != "fire-and-forget"
    ]
    assert others == [cluster.client.id]


def test_the_gateway_serves_https_and_reaches_the_scheduler_over_tls(
    cluster, certificates, tmp_path
):
    """``dflow serve`` with the cluster's certificate flags reaches the scheduler
    over TLS and, with ``--ssl-certfile``/``--ssl-keyfile``, answers HTTPS only."""
    certs = certificates["cluster"]
    args = [*certs.flags(), "--ssl-certfile", str(certs.cert)]
    args += ["--ssl-keyfile", str(certs.key)]
    with gateway_process(cluster.address, args=args, log_dir=tmp_path) as (url, _):
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(certs.ca))
        request = urllib.request.Request(
            f"{url}/images/generations",
            data=json.dumps({"model": MODEL, "prompt": "a fox", "seed": 1}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=context, timeout=300) as answer:
            assert len(json.load(answer)["data"]) == 1
        with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"{url.replace('https', 'http')}/models", timeout=60)
