"""``dflow demo``: the embedded default.

Starts a local cluster with one worker per stage on a tiny model (CPU here, a
GPU if present), waits for its workers, generates a few prompts through the
disaggregated path (with a progress bar on a terminal), writes the images (or
GIFs for video models) to a folder and prints per-stage times. The dashboard
address is printed while the dashboard is up: with ``--keep`` the cluster and
its dashboard stay up until Ctrl-C. With ``--serve`` it serves the cluster's
HTTP API instead, until interrupted.
"""

from __future__ import annotations

import logging
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import click

from distributed import Client, wait

from dflow.client import map as submit_many
from dflow.cluster import StageCluster
from dflow.diagnosis import model_problem
from dflow.errors import StageLoadError
from dflow.events import progress
from dflow.request import Request

PROMPTS = (
    "a lighthouse on a cliff at dawn",
    "a red fox in fresh snow",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on mars",
    "a watercolor of a quiet harbor",
    "a robot reading a book in a library",
    "a field of sunflowers under a storm",
    "a cat wearing sunglasses on a beach",
)
#: Seconds the workers get to load and warm up (tiny models on a busy CPU)
READY_TIMEOUT = 600


def _layout(text: str) -> dict[str, int]:
    layout = {}
    for part in text.split(","):
        stage, _, count = part.partition("=")
        try:
            layout[stage.strip()] = int(count or 1)
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not STAGE=COUNT (e.g. encoder=1,dit=2,vae=1)",
                param_hint="--layout",
            ) from None
    return layout


@click.command(name="demo")
@click.option("--model", default="tiny-flux", show_default=True, help="Model to serve.")
@click.option(
    "--prompts",
    "-n",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests to run.",
)
@click.option(
    "--out",
    default="dflow-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the outputs.",
)
@click.option(
    "--layout",
    default="encoder=1,dit=1,vae=1",
    show_default=True,
    help="Workers per stage; 'all=2' runs monolithic replicas instead.",
)
@click.option(
    "--steps", default=None, type=int, help="Denoising steps (model default)."
)
@click.option(
    "--dashboard-address", default=":8787", show_default=True, help="Dask dashboard."
)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the cluster and its dashboard up after the requests, until Ctrl-C.",
)
@click.option(
    "--serve",
    is_flag=True,
    help="Instead of generating, serve the cluster's OpenAI-compatible HTTP API "
    "(the dflow.gateway config: 127.0.0.1:8000) until interrupted.",
)
def demo(model, prompts, out, layout, steps, dashboard_address, keep, serve):
    """Generate a few prompts on a local disaggregated cluster."""
    problem = model_problem(model)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--model")
    requests = [
        Request(model=model, prompt=PROMPTS[i % len(PROMPTS)], steps=steps, seed=i)
        for i in range(prompts)
    ]
    # Ctrl-C and a supervisor's SIGTERM both close the cluster on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.perf_counter()
    try:
        with StageCluster(
            model,
            _layout(layout),
            dashboard_address=dashboard_address,
            silence_logs=logging.WARNING,
            worker_options={"silence_logs": logging.WARNING},
        ) as cluster:
            dashboard = _dflow_page(cluster.dashboard_link)
            click.echo(f"dashboard: {dashboard}")
            click.echo(f"loading {model} on {len(cluster.worker_spec)} workers ...")
            cluster.wait_until_ready(READY_TIMEOUT)
            ready = time.perf_counter()
            click.echo(f"workers ready in {ready - start:.1f}s")
            if serve:
                _serve(cluster.scheduler_address, model)
                return
            with Client(cluster) as client:
                _run(client, requests, Path(out), ready)
            if keep:
                click.echo(
                    f"\nthe cluster and its dashboard stay up at {dashboard}; "
                    "Ctrl-C stops them"
                )
                while True:
                    time.sleep(3600)
    except StageLoadError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        if not (keep or serve):
            click.echo("interrupted", err=True)
            sys.exit(130)


def _run(client: Client, requests: list[Request], folder: Path, ready: float) -> None:
    """Generate ``requests``, write their outputs and print the stage times."""
    futures = submit_many(client, requests)
    if sys.stderr.isatty():
        progress(futures, client=client)  # denoising steps, on standard error
    else:
        wait(futures)  # no bar: its carriage returns would flood a log
    outputs = client.gather(futures)
    elapsed = time.perf_counter() - ready
    for i, output in enumerate(outputs):
        slug = re.sub(r"[^a-z0-9]+", "-", output.request.prompt.lower()).strip("-")
        for path in output.save(folder / f"{i:03d}-{slug}"):
            click.echo(f"wrote {path}")
    model = requests[0].model
    click.echo(f"\n{len(outputs)} requests of {model} in {elapsed:.1f}s")
    for stage in ("encode", "denoise", "decode", "generate"):
        times = [o.timings[stage] for o in outputs if stage in o.timings]
        if times:
            click.echo(
                f"  {stage:<8} median {statistics.median(times) * 1000:8.1f} ms"
                f"   max {max(times) * 1000:8.1f} ms"
            )


def _dflow_page(dashboard_link: str) -> str:
    """The address of dflow's dashboard page, from the cluster's status page."""
    return dashboard_link.rsplit("/", 1)[0] + "/dflow"


def _serve(scheduler_address: str, model: str) -> None:
    """Serve the cluster's HTTP gateway until interrupted."""
    from dflow.gateway.server import serve

    def announce(url: str) -> None:
        click.echo(f"\ndflow gateway: {url}  (the OpenAI base URL; Ctrl-C stops)")
        click.echo(
            f"  curl {url}/images/generations -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model}", "prompt": "a red fox"}}\''
        )

    serve(scheduler_address, announce=announce)
