"""Real dflow clusters in subprocesses, for tests (like ``distributed.utils_test``).

Start a ``dask scheduler`` with dflow's preload and ``dflow-worker`` processes on
127.0.0.1, wait until their pools are ready, and stop every process on exit::

    from dflow.testing import scheduler_process, wait_for_pools, worker_processes

    with scheduler_process() as address, worker_processes(
        address, [("encoder", "tiny-flux"), ("dit", "tiny-flux"), ("vae", "tiny-flux")]
    ) as workers, Client(address) as client:
        wait_for_pools(client, {"tiny-flux": ["encoder", "dit", "vae"]}, processes=workers)
        future = dflow.submit(client, dflow.Request(model="tiny-flux", prompt="a fox"))

Each process logs to a file (``ServiceProcess.log``); a process that fails to
start or a pool that does not become ready raises with the tail of every log.
Processes get this process's environment plus ``DASK_DFLOW__CACHE_DIR`` (so the
workers find the presets this process built).

Also what tests and benchmarks share besides clusters: an elastic fleet seen
and steered through dflow's scheduler handlers, the equivalence requests and
the pixels of dflow's and the stock pipeline's outputs, and the model folders
tests run on (fixtures are in ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import psutil

import dask.config
from distributed import Client

import dflow.config  # noqa: F401
from dflow.pools import base_stage, expert_of
from dflow.spec import canonical_name

__all__ = [
    "EQUIVALENCE_CASES",
    "TINY_PRESETS",
    "SchedulerAddress",
    "ServiceProcess",
    "controller_on",
    "decisions",
    "dflow_events",
    "elastic",
    "emulated_predictor",
    "equivalence_image",
    "equivalence_request",
    "external_model_paths",
    "fleet_layout",
    "fleet_settled",
    "fleet_workers",
    "gateway_process",
    "move",
    "pixels",
    "poll",
    "scheduler_process",
    "set_layout",
    "set_roles",
    "stock_pixels",
    "stop",
    "wait_for_pools",
    "worker_processes",
]

HOST = "127.0.0.1"
#: Seconds a process gets to exit after SIGTERM before it is killed. Closing
#: takes well under a second; a worker process then spends seconds tearing down
#: torch's modules, which no test needs to wait for.
STOP_TIMEOUT = 5.0


@dataclass
class ServiceProcess:
    """A scheduler or ``dflow-worker`` process started by this module.

    Attributes
    ----------
    name
        ``"scheduler"``, or ``"<stage> <model>"`` for a worker.
    popen
        The process. For a worker it is the ``dflow-worker`` command, which runs
        the Nanny; the Dask worker is its child (see :meth:`worker_pids`).
    log
        The file its stdout and stderr go to.
    """

    name: str
    popen: subprocess.Popen
    log: Path
    stage: str | None = None
    model: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def worker_pids(self) -> list[int]:
        """PIDs of the Dask worker processes this Nanny process runs."""
        return [
            child.pid
            for child in self._children(recursive=False)
            # multiprocessing's resource tracker is a child of the Nanny too
            if not _is_resource_tracker(child)
        ]

    def addresses(self, client: Client) -> list[str]:
        """Scheduler addresses of this process's Dask workers."""
        pids = set(self.worker_pids())
        return [a for a, pid in client.run(os.getpid).items() if pid in pids]

    def kill(self) -> None:
        """SIGKILL the process and its workers, as a machine crash would: the
        Nanny goes first, so that nothing restarts the worker."""
        children = self._children()
        if self.alive():
            self.popen.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.popen.wait()
        psutil.wait_procs(children, timeout=STOP_TIMEOUT)

    def tail(self, lines: int = 30) -> str:
        """The last lines of the process's log."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _children(self, recursive: bool = True) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=recursive)
        except psutil.NoSuchProcess:
            return []

    def __str__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log})"


class SchedulerAddress(str):
    """A scheduler's address (a plain ``str``) that also knows its process."""

    process: ServiceProcess


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def describe(processes: Iterable[ServiceProcess], lines: int = 30) -> str:
    """Each process's state and the tail of its log, for error messages."""
    return "\n".join(
        f"--- {process} ---\n{process.tail(lines)}" for process in processes
    )


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, plus what dflow processes under test need."""
    environment = dict(os.environ)
    cache_dir = dask.config.get("dflow.cache-dir", None)
    if cache_dir:
        environment["DASK_DFLOW__CACHE_DIR"] = str(cache_dir)
    environment.update(env or {})
    return environment


@contextlib.contextmanager
def _log_folder(log_dir: str | os.PathLike | None) -> Iterator[Path]:
    if log_dir is not None:
        path = Path(log_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="dflow-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(
    name: str, command: list[str], log: Path, env: Mapping[str, str] | None, **info
) -> ServiceProcess:
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_environment(env),
        )
    return ServiceProcess(name, popen, log, **info)


def stop(processes: Sequence[ServiceProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every process, wait up to ``timeout`` for all, then SIGKILL what is
    left (with its children) and reap it."""
    children = {p.pid: p._children() for p in processes}
    for process in processes:
        if process.alive():
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.alive():
            process.popen.kill()
            process.popen.wait()
        leftovers = [c for c in children[process.pid] if c.is_running()]
        for child in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(leftovers, timeout=timeout)


@contextlib.contextmanager
def scheduler_process(
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    scheduler_file: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    timeout: float = 120.0,
) -> Iterator[SchedulerAddress]:
    """Run ``dask scheduler --preload dflow.preload`` on 127.0.0.1; yields its
    address, whose ``process`` attribute is the scheduler's :class:`ServiceProcess`.

    Parameters
    ----------
    env
        Environment variables on top of this process's, e.g.
        ``{"DASK_DFLOW__SCHEDULER__UNSERVED_TIMEOUT": "2s"}``.
    args
        More ``dask scheduler`` options.
    scheduler_file
        Where the scheduler writes its address (default: in ``log_dir``), for
        workers started with ``--scheduler-file``.
    log_dir
        Folder of the log (default: a temporary folder removed on exit).
    timeout
        Seconds to wait for the scheduler to start.
    """
    with _log_folder(log_dir) as folder:
        path = Path(scheduler_file or folder / "scheduler.json")
        path.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            HOST,
            "--port",
            "0",
            # the HTTP server (health, metrics) runs even without the dashboard
            "--no-dashboard",
            "--dashboard-address",
            f"{HOST}:0",
            "--preload",
            "dflow.preload",
            "--scheduler-file",
            str(path),
            *args,
        ]
        process = _start("scheduler", command, folder / "scheduler.log", env)
        try:
            yield _scheduler_address(process, path, timeout)
        finally:
            stop([process])


def _scheduler_address(
    process: ServiceProcess, path: Path, timeout: float
) -> SchedulerAddress:
    deadline = time.monotonic() + timeout
    while True:
        try:
            address = SchedulerAddress(json.loads(path.read_text())["address"])
            address.process = process
            return address
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass  # not written yet, or written halfway
        if not process.alive() or time.monotonic() > deadline:
            raise RuntimeError(
                f"the scheduler did not start within {timeout:g}s\n"
                + describe([process])
            )
        time.sleep(0.05)


def worker_command() -> list[str]:
    """The ``dflow-worker`` console script of this Python environment."""
    script = Path(sys.executable).with_name("dflow-worker")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from dflow.cli import worker; worker()"]


@contextlib.contextmanager
def worker_processes(
    address: str | None,
    workers: Iterable[tuple[str, str]],
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> Iterator[list[ServiceProcess]]:
    """Run one ``dflow-worker`` process per ``(stage, model)``, all at once.

    They start in parallel (each takes seconds to import torch and load its
    model); use :func:`wait_for_pools` to wait until they serve.

    Parameters
    ----------
    address
        The scheduler's address; ``None`` when ``args`` carry
        ``--scheduler-file``.
    workers
        ``(stage, model)`` pairs, e.g. ``[("dit", "tiny-flux")]``; an expert's
        stage (``"dit-high"``) starts ``--stage dit --expert high``.
    args
        More ``dflow-worker`` options, for every worker.
    env
        Environment variables on top of this process's.
    log_dir
        Folder of the logs (default: a temporary folder removed on exit).
    """
    with _log_folder(log_dir) as folder:
        processes: list[ServiceProcess] = []
        try:
            for index, (stage, model) in enumerate(workers):
                # an expert's pool is served by `--stage dit --expert NAME`
                expert = expert_of(stage)
                command = [
                    *worker_command(),
                    *([address] if address else []),
                    "--stage",
                    base_stage(stage),
                    *(["--expert", expert] if expert else []),
                    "--model",
                    model,
                    "--host",
                    HOST,
                    "--no-dashboard",
                    "--dashboard-address",
                    f"{HOST}:0",
                    "--local-directory",
                    str(folder / f"worker-{index}"),
                    *args,
                ]
                log = folder / f"worker-{index}-{stage}.log"
                processes.append(
                    _start(
                        f"{stage} {model}", command, log, env, stage=stage, model=model
                    )
                )
            yield processes
        finally:
            stop(processes)


@contextlib.contextmanager
def gateway_process(
    address: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
    timeout: float = 300.0,
) -> Iterator[tuple[str, ServiceProcess]]:
    """Run ``dflow serve`` (the HTTP gateway) on 127.0.0.1 and a free port;
    yields the API's base URL (``http://127.0.0.1:PORT/v1``) and the process.

    Parameters
    ----------
    args
        More ``dflow serve`` options (``--api-keys``, TLS).
    env
        Environment variables on top of this process's (``DASK_DFLOW__GATEWAY__...``).
    timeout
        Seconds to wait for it to listen.
    """
    with _log_folder(log_dir) as folder:
        command = [
            str(Path(sys.executable).with_name("dflow")),
            "serve",
            address,
            "--host",
            HOST,
            "--port",
            "0",
            *args,
        ]
        process = _start("gateway", command, folder / "gateway.log", env)
        try:

            def listening() -> re.Match | None:
                if not process.alive():
                    raise RuntimeError(f"the gateway exited\n{describe([process])}")
                return re.search(r"dflow gateway: (\S+)", process.tail(100))

            found = poll(listening, timeout, "the gateway to listen")
            yield found.group(1), process
        finally:
            stop([process])


def poll(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "",
    interval: float = 0.05,
) -> Any:
    """Call ``condition`` until it returns something truthy and return that;
    fail an assertion naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s: {what}"
        time.sleep(interval)
    return result


def wait_for_pools(
    client: Client,
    pools: Mapping[str, Iterable[str]],
    timeout: float = 300.0,
    processes: Iterable[ServiceProcess] = (),
) -> dict[str, Any]:
    """Wait until the scheduler's ``dflow_pools`` shows ``pools`` ready.

    Parameters
    ----------
    pools
        ``{model: stages}``; a stage listed twice needs two ready workers, e.g.
        ``{"tiny-flux": ["encoder", "dit", "dit", "vae"]}``.
    processes
        The processes serving them: their logs go into the error if they do not
        become ready, and one that exits ends the wait at once (as does a worker
        that reports it could not load its model).

    Returns the pools as the scheduler reports them. Raises ``TimeoutError``
    after ``timeout`` seconds, ``RuntimeError`` at once if a process exits or a
    worker could not load its model.
    """
    processes = list(processes)
    wanted = {canonical_name(model): Counter(stages) for model, stages in pools.items()}
    deadline = time.monotonic() + timeout
    while True:
        current = _ask(client, "dflow_pools")
        if all(
            current.get(model, {}).get(stage, {}).get("ready", 0) >= count
            for model, stages in wanted.items()
            for stage, count in stages.items()
        ):
            return current
        exited = [p for p in processes if not p.alive()]
        failed = [
            f"{r['name']} could not load {r['stage']} of {r['model']}: {r['error']}"
            for r in _ask(client, "dflow_workers")
            if r["state"] == "failed" and canonical_name(str(r["model"])) in wanted
        ]
        if exited or failed or time.monotonic() > deadline:
            error: type[Exception] = RuntimeError
            if failed:
                reason = "; ".join(failed)
            elif exited:
                reason = f"{len(exited)} process(es) exited"
            else:
                error, reason = TimeoutError, f"not ready within {timeout:g}s"
            raise error(
                f"dflow pools {json.dumps({m: dict(s) for m, s in wanted.items()})}: "
                f"{reason}; the scheduler reports {json.dumps(current)}\n"
                + describe(processes)
            )
        time.sleep(0.1)


def _ask(client: Client, handler: str) -> Any:
    """The answer of one of dflow's scheduler handlers."""
    return client.sync(getattr(client.scheduler, handler))


# -- elastic fleets: the scheduler's view of its workers, through dflow's handlers ----


def elastic(client: Client, **settings: Any) -> dict[str, Any]:
    """The elastic controller's settings (``dflow_elastic``), after changing
    those given (``enabled``, ``actuator``); ``switching`` maps the workers
    being switched to their pool."""
    return _call(client, "dflow_elastic", **settings)


@contextlib.contextmanager
def controller_on(client: Client) -> Iterator[None]:
    """The elastic controller on, for the block."""
    elastic(client, enabled=True)
    try:
        yield
    finally:
        elastic(client, enabled=False)


def fleet_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Each dflow worker's record by name (``dflow_workers``), with
    ``switching``: whether the controller is switching it."""
    switching = elastic(client)["switching"]
    return {
        r["name"]: {**r, "switching": r["address"] in switching}
        for r in _call(client, "dflow_workers")
    }


def fleet_layout(client: Client) -> dict[str, str | None]:
    """Worker name -> the stage it serves (a switching worker's old stage while
    it drains, its new one from when it loads)."""
    return {name: w["stage"] for name, w in fleet_workers(client).items()}


def fleet_settled(client: Client) -> bool:
    """Every worker ready, none being switched."""
    return all(
        w["state"] == "ready" and not w["switching"]
        for w in fleet_workers(client).values()
    )


def decisions(client: Client) -> list[dict[str, Any]]:
    """The elastic controller's decisions, oldest first, pools as ``[stage,
    model]`` lists (``None``: no pool) as ``dflow.status`` gives them."""
    return [
        {
            **d,
            "source": d["source"] and list(d["source"]),
            "target": d["target"] and list(d["target"]),
        }
        for d in _call(client, "dflow_decisions")
    ]


def dflow_events(client: Client, action: str) -> list[tuple[float, dict[str, Any]]]:
    """(time, event) of the scheduler's dflow events of ``action``
    (``"worker-ready"``, ``"repinned"``, ...)."""
    return [
        (t, event)
        for t, event in client.get_events("dflow")
        if event.get("action") == action
    ]


def move(client: Client, worker: str, stage: str, model: str, reason: str) -> None:
    """Switch ``worker`` (name or address) to ``stage`` of ``model`` now."""
    _call(
        client,
        "dflow_move",
        worker=worker,
        pool=f"{stage}:{model}",
        reason=reason,
    )


def set_roles(
    client: Client,
    roles: Mapping[str, str],
    model: str,
    *,
    reason: str,
    cooldown: float = 0.0,
    timeout: float = 300.0,
) -> list[str]:
    """Switch the workers whose stage differs from ``roles`` (name -> stage);
    wait until every worker serves its stage, then out the moved workers'
    ``cooldown``. Returns the moved workers."""
    poll(lambda: fleet_settled(client), timeout, "no switch in progress")
    moved = [n for n, stage in fleet_layout(client).items() if roles[n] != stage]
    for name in moved:
        move(client, name, roles[name], model, reason)
    poll(
        lambda: fleet_settled(client) and fleet_layout(client) == dict(roles),
        timeout,
        f"the layout {dict(roles)}",
    )
    if moved:
        time.sleep(cooldown)
    return moved


def set_layout(
    client: Client,
    counts: Mapping[str, int],
    model: str,
    *,
    reason: str,
    cooldown: float = 0.0,
    timeout: float = 300.0,
) -> dict[str, str]:
    """Workers per stage as ``counts``, moving as few workers as possible;
    returns each worker's stage."""
    poll(lambda: fleet_settled(client), timeout, "no switch in progress")
    roles = {n: str(s) for n, s in fleet_layout(client).items()}
    by_stage: dict[str, list[str]] = {}
    for name in sorted(roles):
        by_stage.setdefault(roles[name], []).append(name)
    spare = [n for s, names in by_stage.items() for n in names[counts.get(s, 0) :]]
    for stage, count in counts.items():
        for _ in range(count - len(by_stage.get(stage, []))):
            roles[spare.pop(0)] = stage
    set_roles(client, roles, model, reason=reason, cooldown=cooldown, timeout=timeout)
    return roles


@contextlib.contextmanager
def emulated_fleet(
    model: str,
    layout: Mapping[str, int],
    predictor: Any,
    gpu_type: str = "h200",
    timeout: float = 300,
) -> Iterator[tuple[Any, Client]]:
    """A :class:`~dflow.cluster.StageCluster` of emulated ``gpu_type`` workers in
    this process (inproc, no dashboard) and its client: dflow installed on the
    scheduler before the workers, priced by ``predictor``; ``layout`` workers
    per stage, ready. The emulated backend's config must be set around it."""
    from dflow.cluster import StageCluster
    from dflow.plugins.install import install

    with (
        StageCluster(
            model,
            fleet=[],
            processes=False,
            protocol="inproc",
            host=None,
            dashboard_address=None,
            worker_options={"memory_limit": 0},
            scheduler_options={"preload": [], "dashboard": False},
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.sync(install, cluster.scheduler, predictor=predictor)
        for stage, n in layout.items():
            cluster.scale(n, stage=stage, gpu_type=gpu_type)
        wanted = [stage for stage, n in layout.items() for _ in range(n)]
        wait_for_pools(client, {model: wanted}, timeout=timeout)
        yield cluster, client


def emulated_predictor(gpu_types: Iterable[str] = ("h200",)) -> Any:
    """A :class:`~dflow.predictor.Predictor` pricing every pool on ``gpu_types``
    as the emulated backend charges it, in wall seconds at its time scale (what
    a controller of an emulated fleet observes)."""
    from dflow.emulation import cost_model, time_scale
    from dflow.predictor import Predictor

    return Predictor(
        row
        for gpu_type in gpu_types
        for row in cost_model().rows_for(gpu_type, scale=time_scale())
    )


def _call(client: Client, handler: str, **kwargs: Any) -> Any:
    """The answer of one of dflow's scheduler handlers, called with ``kwargs``."""
    return client.sync(getattr(client.scheduler, handler), **kwargs)


# -- pixels against stock diffusers; the tests' model folders ---------------------------

#: Requests the equivalence checks run per model folder: one landscape and one
#: portrait, with the model's default guidance (classifier-free guidance for
#: PixArt and Wan) and with guidance 1.0 (no CFG); a seed above 2**63 checks
#: that the full seed range reaches the noise.
EQUIVALENCE_CASES: dict[str, dict[str, Any]] = {
    "cfg": {"guidance_scale": None, "seed": 1234, "aspect": (4, 6)},
    "no-cfg": {"guidance_scale": 1.0, "seed": 2**63 + 7, "aspect": (6, 4)},
}


@cache
def equivalence_image() -> Any:
    """The input image of image-to-video requests: another size and aspect than
    :func:`equivalence_request`'s, so the pipeline's resize runs; big enough to
    tell a task that carries its pixels from one that does not."""
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(
        np.random.default_rng(3).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    )


def equivalence_request(folder: str, case: Mapping[str, Any], **changes: Any) -> Any:
    """A small, fast :class:`dflow.Request` that still exercises every stage of
    ``folder``'s model, shaped by one of :data:`EQUIVALENCE_CASES`; an
    image-to-video model's gets :func:`equivalence_image`."""
    from dflow import families
    from dflow.catalog import resolve
    from dflow.request import Request

    spec = resolve(folder)
    rows, columns = case["aspect"]
    if spec.video:
        # video models: fewer pixels, and two latent frames
        rows, columns = rows // 2, columns // 2
    fields = {
        "model": folder,
        "prompt": "a red bicycle leaning on a stone wall",
        "negative_prompt": "blurry, low quality" if spec.negative_prompts else "",
        "height": rows * spec.size_multiple,
        "width": columns * spec.size_multiple,
        "num_frames": spec.vae_scale_temporal + 1 if spec.video else None,
        "steps": 3,
        "guidance_scale": case["guidance_scale"],
        "seed": case["seed"],
        "image": equivalence_image() if families.of(spec).image_input else None,
    }
    fields.update(changes)
    return Request(**fields)


def pixels(output: Any) -> Any:
    """uint8 pixels of a :class:`dflow.Output`: (images, H, W, 3) or (frames, H, W, 3)."""
    import numpy as np

    if output.request.spec.video:
        return output.frames
    return np.stack([np.asarray(image.convert("RGB")) for image in output.images])


def stock_pixels(pipe: Any, request: Any) -> Any:
    """The stock diffusers pipeline's pixels for ``request``, in the layout of
    :func:`pixels`."""
    import numpy as np
    import torch

    from dflow import families

    spec = request.spec
    arguments = {
        "prompt": request.prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "max_sequence_length": spec.max_sequence_length,
    }
    if spec.negative_prompts:
        arguments["negative_prompt"] = request.negative_prompt
    if request.image is not None:
        arguments["image"] = request.image.pil()
    # what dflow's adapter passes too (PixArt: no resolution binning)
    arguments.update(families.of(spec).call_options)
    if spec.video:
        arguments.update(num_frames=request.num_frames, output_type="np")
        (video,) = pipe(**arguments).frames
        return (video * 255).round().astype(np.uint8)
    images = pipe(**arguments).images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


#: The presets the tests build and run (real architectures, tiny random weights)
TINY_PRESETS = (
    "tiny-flux",
    "tiny-pixart",
    "tiny-wan",
    # Wan 2.2: two experts, text-to-video and image-to-video
    "tiny-wan22-t2v",
    "tiny-wan22-i2v",
)
#: The environment variable listing extra diffusers folders for the tests
MODEL_PATHS_ENV = "DFLOW_TEST_MODEL_PATHS"


def external_model_paths(config: Any) -> list[str]:
    """Absolute paths of the diffusers folders given to pytest (``--model-path``,
    repeatable) or in ``$DFLOW_TEST_MODEL_PATHS`` (separated by ``os.pathsep``)."""
    import pytest

    given = list(config.getoption("model_path"))
    given += [p for p in os.environ.get(MODEL_PATHS_ENV, "").split(os.pathsep) if p]
    paths = []
    for path in given:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise pytest.UsageError(
                f"--model-path {path!r} is not a diffusers folder (no model_index.json)"
            )
        paths.append(str(Path(path).resolve()))
    return list(dict.fromkeys(paths))
