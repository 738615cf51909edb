"""``dflow demo``: the embedded default.

Starts a local cluster with one worker per stage on a tiny model (CPU here, a
GPU if present), generates a few prompts through the disaggregated path with a
progress bar, writes the images (or GIFs for video models) to a folder, prints
per-stage times and the dashboard address, and shuts the cluster down. With
``--serve`` it serves the cluster's HTTP API instead, until interrupted.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from pathlib import Path

import click

import dask.config
from distributed import Client, progress

from dflow.client import map as submit_many
from dflow.cluster import StageCluster
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


def _layout(text: str) -> dict[str, int]:
    layout = {}
    for part in text.split(","):
        stage, _, count = part.partition("=")
        layout[stage.strip()] = int(count or 1)
    return layout


@click.command(name="demo")
@click.option("--model", default="tiny-flux", show_default=True, help="Model to serve.")
@click.option("--prompts", "-n", default=8, show_default=True, help="Requests to run.")
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
    "--serve",
    is_flag=True,
    help="Instead of generating, serve the cluster's OpenAI-compatible HTTP API "
    "(the dflow.gateway config: 127.0.0.1:8000) until interrupted.",
)
def demo(model, prompts, out, layout, steps, dashboard_address, serve):
    """Generate a few prompts on a local disaggregated cluster."""
    if serve:
        _serve(model, _layout(layout), dashboard_address)
        return
    requests = [
        Request(model=model, prompt=PROMPTS[i % len(PROMPTS)], steps=steps, seed=i)
        for i in range(prompts)
    ]
    start = time.perf_counter()
    # worker processes import torch and load the model before serving
    with (
        dask.config.set({"dflow.client.model-timeout": "300s"}),
        StageCluster(
            model,
            _layout(layout),
            dashboard_address=dashboard_address,
            silence_logs=logging.WARNING,
            worker_options={"silence_logs": logging.WARNING},
        ) as cluster,
        Client(cluster) as client,
    ):
        click.echo(f"dashboard: {cluster.dashboard_link}  (dflow page: /dflow)")
        futures = submit_many(client, requests)
        progress(futures)
        outputs = client.gather(futures)
        elapsed = time.perf_counter() - start
        folder = Path(out)
        for i, output in enumerate(outputs):
            slug = re.sub(r"[^a-z0-9]+", "-", output.request.prompt.lower()).strip("-")
            for path in output.save(folder / f"{i:03d}-{slug}"):
                click.echo(f"wrote {path}")
        click.echo(
            f"\n{len(outputs)} requests of {model} in {elapsed:.1f}s (cluster start included)"
        )
        for stage in ("encode", "denoise", "decode", "generate"):
            times = [o.timings[stage] for o in outputs if stage in o.timings]
            if times:
                click.echo(
                    f"  {stage:<8} median {statistics.median(times) * 1000:8.1f} ms"
                    f"   max {max(times) * 1000:8.1f} ms"
                )
        click.echo(f"dashboard was at {cluster.dashboard_link}")


def _serve(model: str, layout: dict[str, int], dashboard_address: str) -> None:
    """The local cluster behind the HTTP gateway, until interrupted."""
    from dflow.gateway.server import serve

    def announce(url: str) -> None:
        click.echo(f"\ndflow gateway: {url}  (the OpenAI base URL; Ctrl-C stops)")
        click.echo(
            f"  curl {url}/images/generations -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model}", "prompt": "a red fox"}}\''
        )

    with (
        dask.config.set({"dflow.client.model-timeout": "300s"}),
        StageCluster(
            model,
            layout,
            dashboard_address=dashboard_address,
            silence_logs=logging.WARNING,
            worker_options={"silence_logs": logging.WARNING},
        ) as cluster,
    ):
        click.echo(f"dashboard: {cluster.dashboard_link}  (dflow page: /dflow)")
        serve(cluster.scheduler_address, announce=announce)
