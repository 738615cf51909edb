"""Operator experience (issue 12): workers that cannot serve exit non-zero with
one reason, errors that say what to do, true help texts, quiet logs and a
readiness line, a quiet shutdown, ``dflow demo`` without noise.

The worker and demo tests start real ``dask scheduler``, ``dflow-worker`` and
``dflow demo`` processes and read what they print, as an operator would.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from distributed import Client
from distributed.client import FutureCancelledError
from distributed.utils_test import gen_test

from dflow import logs
from dflow.cli import dflow as dflow_group
from dflow.client import RequestFuture
from dflow.cluster import StageCluster
from dflow.errors import StageLoadError
from dflow.plugins.admission import Admission, MemoryRouting
from dflow.plugins.extension import Decision, DflowExtension, WorkerRecord
from dflow.plugins.predictions import Predictions
from dflow.plugins.status import status
from dflow.plugins.telemetry import Telemetry
from dflow.pools import Pool
from dflow.testing import (
    child_environment,
    move,
    poll,
    scheduler_process,
    stop,
    wait_for_pools,
    worker_command,
    worker_processes,
)

MODEL = "tiny-pixart"
BIN = Path(sys.executable).parent
#: Seconds a process that must fail gets: a worker imports torch and loads a
#: tiny model first, slowly on a busy machine
EXIT_TIMEOUT = 300


def broken_folders(source: str, into: Path) -> dict[str, Path]:
    """Copies of a tiny Flux folder that each break one way."""
    folders = {name: into / name for name in ("corrupt", "warmup", "sd3")}
    for folder in folders.values():
        shutil.copytree(source, folder)
    weights = folders["corrupt"] / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # loads, but the DiT's input width no longer matches the text encoder's
    config = folders["warmup"] / "text_encoder_2" / "config.json"
    config.write_text(re.sub(r'"d_model": \d+', '"d_model": 48', config.read_text()))
    index = folders["sd3"] / "model_index.json"
    index.write_text(
        index.read_text().replace("FluxPipeline", "StableDiffusion3Pipeline")
    )
    return folders


def assert_quiet(text: str) -> None:
    """No traceback, no dependency warning, no nanny killing a slow process."""
    assert "Traceback" not in text, text
    assert "still alive after" not in text, text
    assert "torchvision" not in text, text
    assert "died unexpectedly" not in text, text


# -- the worker command --------------------------------------------------------------


def test_mistakes_on_the_command_line_end_in_one_sentence(tmp_path, tiny_folders):
    folders = broken_folders(tiny_folders["tiny-flux"], tmp_path)
    cases = {
        "scheduler": (
            ["--stage", "dit", "--model", MODEL],
            "Missing the scheduler's address",
        ),
        "missing": (
            ["tcp://127.0.0.1:1", "--stage", "dit", "--model", "/models/nope"],
            "the folder /models/nope does not exist",
        ),
        "family": (
            ["tcp://127.0.0.1:1", "--stage", "dit", "--model", str(folders["sd3"])],
            "'StableDiffusion3Pipeline' is not supported; dflow serves FluxPipeline",
        ),
    }
    runs = {
        case: subprocess.Popen(
            [*worker_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_environment(),
        )
        for case, (args, _) in cases.items()
    }
    for case, run in runs.items():
        out, _ = run.communicate(timeout=EXIT_TIMEOUT)
        assert run.returncode == 2, out
        assert cases[case][1] in out, out
        assert_quiet(out)


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_stage_exits_nonzero(tmp_path, tiny_folders):
    folders = broken_folders(tiny_folders["tiny-flux"], tmp_path)
    expected = {
        str(folders["corrupt"]): "the files may be missing, incomplete or corrupt",
        str(folders["warmup"]): "its warm-up (one step at the smallest size) failed",
        "flux.1-dev": "it does not fit in the device's memory",
    }
    with (
        scheduler_process(log_dir=tmp_path / "logs") as address,
        worker_processes(
            address,
            [("dit", str(folders["corrupt"])), ("dit", str(folders["warmup"]))],
            log_dir=tmp_path / "real",
        ) as real,
        # an emulated L4 has no room for Flux's DiT
        worker_processes(
            address,
            [("dit", "flux.1-dev")],
            args=["--gpu-type", "l4"],
            env={"DASK_DFLOW__RUNTIME__BACKEND": "emulated"},
            log_dir=tmp_path / "emulated",
        ) as emulated,
    ):
        for process in (*real, *emulated):
            process.popen.wait(EXIT_TIMEOUT)
            text = process.log.read_text()
            assert process.popen.returncode == 1, text
            errors = [line for line in text.splitlines() if " - ERROR - " in line]
            assert len(errors) == 1, text
            assert f"could not serve stage dit of {process.model}" in errors[0]
            assert expected[str(process.model)] in errors[0], errors[0]
            assert_quiet(text)


@pytest.mark.slow
def test_stage_cluster_raises_a_workers_load_failure(tmp_path, tiny_folders):
    with pytest.raises(ValueError, match="the folder /models/nope does not exist"):
        StageCluster("/models/nope", {"dit": 1})
    corrupt = broken_folders(tiny_folders["tiny-flux"], tmp_path)["corrupt"]
    with (
        StageCluster(str(corrupt), {"dit": 1}, dashboard_address=None) as cluster,
        pytest.raises(StageLoadError, match="could not serve stage dit of"),
    ):
        cluster.wait_until_ready(EXIT_TIMEOUT)


@pytest.mark.slow
def test_a_workers_life_in_its_log(tmp_path, tiny_folders):
    """Ready with its times, switched with a reason, drained, ready again; a name
    without a stage; a manual cancel that says so; a quiet end when the
    scheduler stops."""
    with (
        scheduler_process(log_dir=tmp_path) as address,
        worker_processes(address, [("dit", MODEL)], log_dir=tmp_path) as (worker,),
        Client(address) as client,
    ):
        wait_for_pools(client, {MODEL: ["dit"]}, processes=[worker])
        poll(lambda: "Stage dit of tiny-pixart ready (load" in worker.tail(200), 30)
        (record,) = client.sync(client.scheduler.dflow_workers)
        assert not record["name"].startswith("dit"), record["name"]

        move(client, record["name"], "vae", MODEL, "test: the VAE needs it")
        wait_for_pools(client, {MODEL: ["vae"]}, processes=[worker])
        poll(lambda: "Stage vae of tiny-pixart ready" in worker.tail(200), 30)
        assert "Drained stage dit of tiny-pixart" in worker.tail(200)
        switch = f"Switching {record['name']} from dit:{MODEL} to vae:{MODEL}"
        poll(lambda: switch in address.process.tail(200), 30, "the switch's line")

        # dflow's output futures (the notebook test cancels one of dflow.map's)
        # short: if the worker starts it before the cancel arrives, the worker's
        # close waits for it
        future = RequestFuture(client.submit(time.sleep, 2).key, client)
        future.cancel()
        with pytest.raises(FutureCancelledError, match="reason: cancelled"):
            future.result(timeout=30)

        stop([address.process])
        worker.popen.wait(EXIT_TIMEOUT)
        text = worker.log.read_text()
        assert worker.popen.returncode == 0, text
        assert_quiet(text)


# -- help texts ------------------------------------------------------------------


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
    return found


def named_options(text: str) -> set[str]:
    """The ``--options`` a help text names (click wraps words at hyphens)."""
    return set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", re.sub(r"-\n\s*", "-", text)))


def test_every_help_names_only_options_that_exist():
    runner = CliRunner()
    for path, command in _commands(dflow_group):
        result = runner.invoke(dflow_group, [*path, "--help"], terminal_width=80)
        assert result.exit_code == 0, result.output
        options = {"--help"} | {
            o
            for p in command.params
            for o in (*p.opts, *p.secondary_opts)
            if o.startswith("--")
        }
        assert named_options(result.output) <= options, (path, result.output)
        if isinstance(command, click.Group):
            assert "..." not in result.output.partition("Commands:")[2], result.output
    # the console scripts and dask's CLI show the same worker command
    for command in ([BIN / "dflow-worker"], [BIN / "dask", "dflow", "worker"]):
        out = subprocess.run(
            [*map(str, command), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        assert "--nworkers" not in out
        worker = dflow_group.commands["worker"]
        exist = {o for p in worker.params for o in (*p.opts, *p.secondary_opts)}
        assert named_options(out) <= exist | {"--help"}, out
    profile = runner.invoke(dflow_group, ["profile", "--help"]).output
    assert "[default: auto]" in profile


# -- messages and views, on a scheduler --------------------------------------------


@pytest.mark.usefixtures("keep_dflow_config")
@gen_test()
async def test_model_not_served_and_status_say_what_is_missing() -> None:
    from distributed import Scheduler

    async with Scheduler(host="127.0.0.1", dashboard=False) as scheduler:
        extension = DflowExtension()
        telemetry = Telemetry(extension, Predictions())
        for plugin in (extension, telemetry):
            await plugin.start(scheduler)
            scheduler.add_plugin(plugin)
        admission = Admission(extension, MemoryRouting(extension, Predictions()))
        await admission.start(scheduler)
        extension.workers["tcp://127.0.0.1:1"] = WorkerRecord(
            "tcp://127.0.0.1:1", "node1-gpu0", "ready", "encoder", MODEL, "cpu"
        )
        failed = WorkerRecord(
            "tcp://127.0.0.1:2",
            "node1-gpu1",
            "failed",
            "dit",
            MODEL,
            "cpu",
            error="could not serve stage dit of tiny-pixart: it does not fit",
        )
        extension.workers[failed.address] = failed
        extension.failures.append(failed)
        extension.record_decision(
            Decision(time.time(), "node1-gpu2", Pool("vae", MODEL), None, "idle")
        )

        answer = await admission.admit(
            requests=[{"model": MODEL, "features": {}}], model_timeout=0
        )
        message = answer["message"]
        assert answer["error"] == "ModelNotServed"
        assert "has workers for stage encoder but none for dit, vae" in message
        assert "the last worker that tried could not serve stage dit" in message
        for stage in ("dit", "vae"):
            command = (
                f"dflow-worker {scheduler.address} --stage {stage} --model {MODEL}"
            )
            assert command in message

        answer = await admission.admit(
            requests=[{"model": "flux.1-dev", "features": {}}], model_timeout=0
        )
        assert (
            f"no worker serves model 'flux.1-dev' (the cluster serves: {MODEL})"
            in (answer["message"])
        )

        view = status(extension, telemetry)
        assert view["stages"]["dit"]["failed"] == 1
        states = {w["name"]: (w["state"], w["reason"]) for w in view["workers"]}
        assert states == {
            "node1-gpu0": ("ready", None),
            "node1-gpu1": ("failed", failed.error),
        }
        assert [f["reason"] for f in view["failures"]] == [failed.error]
        (decision,) = view["decisions"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", decision["time"])
        assert isinstance(decision["timestamp"], float)


def test_known_dependency_noise_is_dropped_and_the_rest_kept():
    from tornado.websocket import WebSocketHandler

    logs.configure()
    handler = WebSocketHandler.__new__(WebSocketHandler)
    handler.ws_connection = None
    try:
        handler.selected_subprotocol  # noqa: B018 (what Bokeh's open() reads)
    except AssertionError:
        aborted = sys.exc_info()
    tornado = logging.getLogger("tornado.application")
    transformers = logging.getLogger("transformers.utils.import_utils")

    def record(
        logger: logging.Logger, message: str, exc_info=None
    ) -> logging.LogRecord:
        return logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, message, (), exc_info
        )

    assert not tornado.filter(record(tornado, "Uncaught exception", aborted))
    try:
        raise AssertionError("another")
    except AssertionError:
        assert tornado.filter(record(tornado, "Uncaught exception", sys.exc_info()))
    fallback = "`CLIPImageProcessor` requires torchvision (not installed); falling back"
    assert not transformers.filter(record(transformers, fallback))
    assert transformers.filter(record(transformers, "something else"))

    # a heartbeat refused by a stopped scheduler: one line, no traceback
    worker = logging.getLogger("distributed.worker")
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except OSError:
        refused = sys.exc_info()
    heartbeat = record(
        worker, "Failed to communicate with scheduler during heartbeat.", refused
    )
    assert worker.filter(heartbeat)
    line = logging.Formatter().format(heartbeat)
    assert line == (
        "Failed to communicate with scheduler during heartbeat. "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    try:
        raise KeyError("state")
    except KeyError:
        unexpected = record(
            worker, "Unexpected exception during heartbeat.", sys.exc_info()
        )
    assert worker.filter(unexpected)
    assert "Traceback" in logging.Formatter().format(unexpected)


# -- the demo ---------------------------------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_demo_is_quiet_and_keeps_its_dashboard_up(tmp_path):
    demo = subprocess.Popen(
        [
            str(BIN / "dflow"),
            "demo",
            "-n",
            "2",
            "--keep",
            "--out",
            str(tmp_path / "out"),
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a demo that hangs on the way out is aborted, and faulthandler prints
        # where each of its threads was
        env=child_environment({"PYTHONFAULTHANDLER": "1"}),
        # Ctrl-C reaches a terminal's foreground job; a shell ignores SIGINT in
        # its background jobs (as CI may run this), and children inherit that
        preexec_fn=_default_sigint,
    )
    lines = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "stay up at" in line:
                break
        url = re.search(r"stay up at (\S+);", lines[-1])
        assert url, "".join(lines)
        with urllib.request.urlopen(url.group(1), timeout=30) as page:
            assert page.status == 200
        base = url.group(1).rsplit("/", 1)[0]
        with urllib.request.urlopen(base + "/metrics", timeout=30) as page:
            metrics = page.read().decode()
        assert 'dflow_requests_in_flight{model="tiny-flux"} 0.0' in metrics
        demo.send_signal(signal.SIGINT)
        try:
            rest, _ = demo.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            demo.send_signal(signal.SIGABRT)
            rest, _ = demo.communicate(timeout=30)
            pytest.fail("the demo did not exit within 120 s of Ctrl-C:\n" + rest)
    finally:
        if demo.poll() is None:
            demo.kill()
    text = "".join(lines) + rest
    assert demo.returncode == 0, text
    assert_quiet(text)
    assert "warn" not in text.lower() and "\r" not in text, text
    assert "dashboard was at" not in text
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


# -- the examples notebook -------------------------------------------------------

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.slow
def test_the_examples_notebook_runs_against_a_local_cluster(tmp_path, tiny_folders):
    """The README's notebook path: executed as Jupyter would, on the cluster it
    starts (a cell that raises fails the test)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / "dflow.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute(env=child_environment())

    def text(cell: int) -> str:
        return "".join(o.get("text", "") for o in notebook.cells[cell].outputs)

    cells = {c.source.partition("\n")[0]: i for i, c in enumerate(notebook.cells)}
    assert "reason: cancelled" in text(
        cells["slow = dflow.submit(client, request.replace(steps=200, seed=99))"]
    )
    assert "height" in text(cells["try:"])
    status = text(cells["status = dflow.status(client)"])
    assert "ready since" in status and "tiny-wan" in status
    assert (tmp_path / "waves.gif").is_file()
