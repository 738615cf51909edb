"""Command lines: ``dflow worker`` (also ``dflow-worker`` and ``dask dflow worker``),
``dflow demo``, ``dflow bench``, ``dflow profile``, ``dflow serve`` (the HTTP
gateway).

The worker command takes ``dask worker``'s own options (reused from distributed's
click command, so they stay in step with it) plus dflow's: the stage and model
to serve, the GPUs to use and the GPU type to publish.
"""

from __future__ import annotations

import copy
import logging
import os
import sys

import click
from tlz import valmap

import dask.config
from distributed.cli.dask_worker import _apportion_ports
from distributed.cli.dask_worker import main as dask_worker_main
from distributed.compatibility import asyncio_run
from distributed.config import get_loop_factory
from distributed.utils import import_term

from dflow import logs
from dflow.bench.cli import bench
from dflow.demo import demo
from dflow.diagnosis import model_problem
from dflow.pools import EXPERT_STAGES, MONOLITHIC, STAGES
from dflow.profile import profile
from dflow.protocol import configure_ucx_progress
from dflow.quantization import QUANTIZATIONS, holds_dit
from dflow.worker import run_nannies
from dflow.worker_options import nanny_specs

logger = logging.getLogger("dflow.worker")

#: dask worker's help texts as they read for dflow-worker, which starts one
#: worker per GPU (--gpus) where dask worker starts --nworkers
_HELP = {
    "nthreads": "Threads per worker process (default: the stage's task slots: 1 "
    "for the DiT and monolithic stages, dflow.runtime.max-batch for the encoder "
    "and the VAE).",
    "nanny": "dflow workers always run under a Nanny; --no-nanny is refused.",
}


def _dflow_help(option: click.Parameter) -> click.Parameter:
    """A copy of one of dask worker's options, its help speaking of dflow-worker."""
    option = copy.copy(option)
    if isinstance(option, click.Option):
        text = _HELP.get(option.name or "", option.help or "")
        option.help = text.replace("'--nworkers'", "--gpus").replace(
            "--nworkers", "--gpus"
        )
    return option


# dask worker's options, minus the ones a GPU-per-process worker decides itself
_DASK_WORKER_OPTIONS = [
    _dflow_help(p)
    for p in dask_worker_main.params
    if p.name not in ("n_workers", "version", "preload_argv")
]
_PRELOAD_ARGV = next(p for p in dask_worker_main.params if p.name == "preload_argv")


def _dflow_worker_options(function):
    options = [
        click.option(
            "--stage",
            type=click.Choice((*STAGES, MONOLITHIC)),
            required=True,
            help="The stage to serve; 'all' hosts the whole pipeline (monolithic).",
        ),
        click.option(
            "--expert",
            type=click.Choice(tuple(EXPERT_STAGES)),
            default=None,
            help="With --stage dit, for a model of two experts (Wan 2.2 A14B): "
            "hold this expert alone and run its steps (default: both).",
        ),
        click.option(
            "--quantize",
            type=click.Choice(QUANTIZATIONS),
            default=None,
            help="Load the DiT's weights in 8 bits: int8 (torchao weight-only) or "
            "fp8 (compute capability 8.9+); needs dflow[quant]. Default: "
            "dflow.runtime.quantize.",
        ),
        click.option(
            "--model",
            required=True,
            help="Model to serve: a dflow preset, a diffusers folder or a Hugging "
            "Face id in the local cache.",
        ),
        click.option(
            "--gpu-type",
            default="auto",
            show_default=True,
            help="GPU type to publish; 'auto' reads it from the device.",
        ),
        click.option(
            "--gpus",
            default=None,
            help="Comma-separated GPU ids to start one worker each on "
            "(default: every visible GPU; one CPU worker if there is none).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command(name="worker", context_settings=dict(ignore_unknown_options=True))
@_dflow_worker_options
def worker(
    scheduler,
    stage,
    expert,
    quantize,
    model,
    gpu_type,
    gpus,
    nthreads,
    name,
    resources,
    nanny,
    worker_port,
    nanny_port,
    listen_address,
    contact_address,
    host,
    tls_ca_file,
    tls_cert,
    tls_key,
    worker_class,
    pid_file,
    dashboard_prefix,
    preload_nanny,
    preload_argv=(),
    **kwargs,
):
    """Start dflow stage workers attached to SCHEDULER: one per GPU.

    A worker that cannot load or warm up its stage logs why; then every worker
    stops and the command exits with status 1, for a supervisor to see.
    """
    if not nanny:
        raise click.BadParameter(
            "dflow workers always run under a Nanny", param_hint="--no-nanny"
        )
    if not (
        scheduler
        or kwargs.get("scheduler_file")
        or dask.config.get("scheduler-address", None)
    ):
        raise click.UsageError(
            "Missing the scheduler's address: give it first "
            "(dflow-worker tcp://SCHEDULER:8786 --stage ... --model ...) or pass "
            "--scheduler-file"
        )
    problem = model_problem(model)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--model")
    logs.configure()
    configure_ucx_progress()  # for the Nannies and, inherited, their workers
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    if resources:
        pairs = resources.replace(",", " ").split()
        resources = valmap(float, dict(pair.split("=") for pair in pairs))
    if expert is not None:
        if stage != "dit":
            raise click.BadOptionUsage("expert", "--expert applies to --stage dit")
        stage = EXPERT_STAGES[expert]
    if quantize is not None and not holds_dit(stage):
        raise click.BadOptionUsage(
            "quantize", "--quantize applies to stages holding DiT weights: dit, all"
        )
    gpu_list = gpus.split(",") if gpus else None
    specs = nanny_specs(
        stage,
        model,
        gpu_list,
        gpu_type=gpu_type,
        name=name,
        nthreads=nthreads or None,
        resources=resources,
        quantize=quantize,
    )
    if len(specs) > 1 and listen_address:
        raise click.BadParameter(
            "it needs a single worker: pick one GPU with --gpus",
            param_hint="--listen-address",
        )
    ports = _apportion_ports(worker_port, nanny_port, len(specs), True)
    for spec, port_kwargs in zip(specs, ports):
        spec.update(port_kwargs)
    security = {
        key: value
        for key, value in [
            ("tls_ca_file", tls_ca_file),
            ("tls_worker_cert", tls_cert),
            ("tls_worker_key", tls_key),
        ]
        if value is not None
    }
    try:
        load_errors = asyncio_run(
            run_nannies(
                scheduler,
                specs,
                security=security,
                worker_class=import_term(worker_class),
                preload_nanny=preload_nanny,
                preload_argv=list(preload_argv),
                listen_address=listen_address,
                contact_address=contact_address or listen_address,
                host=host,
                **kwargs,
            ),
            loop_factory=get_loop_factory(),
        )
    except TimeoutError:
        logger.info("Timed out starting worker")
        sys.exit(1)
    if load_errors:
        # each worker logged its reason; a supervisor needs the status
        sys.exit(1)


for _option in reversed(_DASK_WORKER_OPTIONS):
    worker.params.insert(0, _option)
worker.params.append(_PRELOAD_ARGV)


@click.group(name="dflow")
@click.version_option(package_name="dflow")
def dflow():
    """dflow: disaggregated diffusion serving on Dask."""
    logs.quiet_dependencies()


dflow.add_command(worker)
dflow.add_command(demo)
dflow.add_command(profile)
dflow.add_command(bench)


@click.command(name="serve", short_help="Serve a cluster's OpenAI-compatible HTTP API.")
@click.argument("scheduler")
@click.option("--host", default=None, help="Address to listen on [dflow.gateway.host].")
@click.option(
    "--port", default=None, type=int, help="Port to listen on [dflow.gateway.port]."
)
@click.option(
    "--api-keys",
    "api_keys",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="File of bearer API keys, one a line (also $DFLOW_API_KEYS).",
)
@click.option("--ssl-certfile", default=None, help="Serve HTTPS with this certificate.")
@click.option("--ssl-keyfile", default=None, help="The key of --ssl-certfile.")
@click.option("--tls-ca-file", default=None, help="CA of the scheduler's TLS link.")
@click.option("--tls-cert", default=None, help="Client certificate for the scheduler.")
@click.option("--tls-key", default=None, help="Key of --tls-cert.")
def serve(
    scheduler,
    host,
    port,
    api_keys,
    ssl_certfile,
    ssl_keyfile,
    tls_ca_file,
    tls_cert,
    tls_key,
):
    """Serve the OpenAI-compatible HTTP API of the dflow cluster at SCHEDULER."""
    from distributed.security import Security

    from dflow.gateway.server import serve as run_gateway

    security = None
    if tls_ca_file or tls_cert or tls_key:
        security = Security(
            tls_ca_file=tls_ca_file,
            tls_client_cert=tls_cert,
            tls_client_key=tls_key,
            require_encryption=True,
        )
    run_gateway(
        scheduler,
        host=host,
        port=port,
        api_keys_file=api_keys,
        security=security,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        announce=lambda url: click.echo(f"dflow gateway: {url}", err=True),
    )


dflow.add_command(serve)
