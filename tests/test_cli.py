"""The worker command: ``dflow-worker`` and ``dask dflow worker``.

It takes ``dask worker``'s options plus dflow's; a real worker started with dask
options shows them on the scheduler, merged with its stage's resources, and
publishes what it serves to dflow's extension.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from distributed import Client

from dflow.cli import worker
from dflow.protocol import UCX_PROGRESS_ENVIRON
from dflow.testing import scheduler_process, wait_for_pools, worker_processes
from dflow.worker import StagePlugin, stage_slots
from dflow.worker_options import nanny_specs

MODEL = "tiny-pixart"
DASK_OPTIONS = (
    "--nthreads",
    "--memory-limit",
    "--name",
    "--resources",
    "--scheduler-file",
    "--tls-ca-file",
    "--preload",
)
DFLOW_OPTIONS = ("--stage", "--expert", "--quantize", "--model", "--gpu-type", "--gpus")


@pytest.mark.slow
def test_both_commands_show_dask_and_dflow_options():
    bin_dir = Path(sys.executable).parent
    commands = [
        [str(bin_dir / "dflow-worker"), "--help"],
        [str(bin_dir / "dask"), "dflow", "worker", "--help"],
    ]
    # both at once: each pays seconds of imports
    runs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    for command, run in zip(commands, runs, strict=True):
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
        for option in (*DASK_OPTIONS, *DFLOW_OPTIONS):
            assert option in out, (command, option)
        assert "[encoder|dit|vae|all]" in out


def test_an_unknown_stage_is_rejected():
    result = CliRunner().invoke(
        worker, ["tcp://127.0.0.1:1", "--stage", "decoder", "--model", MODEL]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--stage'" in result.output
    assert "'decoder' is not one of 'encoder', 'dit', 'vae', 'all'" in result.output


def test_expert_and_quantize_need_a_stage_with_dit_weights():
    for options, message in (
        (["--stage", "vae", "--expert", "high"], "--expert applies to --stage dit"),
        (["--stage", "encoder", "--quantize", "int8"], "--quantize applies to stages"),
    ):
        result = CliRunner().invoke(
            worker, ["tcp://127.0.0.1:1", *options, "--model", "tiny-wan22-t2v"]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output
    result = CliRunner().invoke(
        worker,
        ["tcp://127.0.0.1:1", "--stage", "dit", "--expert", "middle", "--model", MODEL],
    )
    assert result.exit_code == 2
    assert "'middle' is not one of 'high', 'low'" in result.output


def test_worker_options_carry_the_expert_and_quantization():
    (spec,) = nanny_specs("dit-low", "tiny-wan22-t2v", [], quantize="int8")
    (plugin,) = spec["plugins"]
    assert (plugin.stage, plugin.quantize) == ("dit-low", "int8")
    assert spec["nthreads"] == stage_slots("dit-low") == 1


def test_stage_and_model_are_required():
    result = CliRunner().invoke(worker, ["tcp://127.0.0.1:1", "--model", MODEL])
    assert result.exit_code == 2
    assert "Missing option '--stage'" in result.output


@pytest.mark.slow
def test_a_real_worker_takes_dask_options_and_reports_to_dflow(tmp_path, tiny_folders):
    scheduler_file = tmp_path / "scheduler.json"
    options = [
        "--scheduler-file",
        str(scheduler_file),
        "--name",
        "my-dit",
        "--resources",
        "extra=2",
        "--nthreads",
        "3",
        "--memory-limit",
        "2GB",
    ]
    with (
        scheduler_process(scheduler_file=scheduler_file, log_dir=tmp_path) as address,
        worker_processes(
            None, [("dit", MODEL)], args=options, log_dir=tmp_path / "named"
        ) as named,
        worker_processes(address, [("vae", MODEL)], log_dir=tmp_path / "default") as (
            default,
        ),
        Client(address) as client,
    ):
        wait_for_pools(client, {MODEL: ["dit", "vae"]}, processes=[*named, default])
        workers = {
            info["name"]: info
            for info in client.scheduler_info(n_workers=-1)["workers"].values()
        }

        dit = workers["my-dit"]
        assert dit["nthreads"] == 3
        assert dit["memory_limit"] == 2_000_000_000
        assert dit["resources"] == {"extra": 2, "dit": 1, f"dit:{MODEL}": 1}

        host = socket.gethostname()
        # host and CPU, no stage: a role switch would make a stage in it wrong
        default_name = f"{host}-cpu-{default.pid}"
        vae = workers[default_name]
        slots = stage_slots("vae")
        assert vae["nthreads"] == slots
        assert vae["resources"] == {"vae": slots, f"vae:{MODEL}": slots}

        records = {r["name"]: r for r in client.sync(client.scheduler.dflow_workers)}
        assert set(records) == {"my-dit", default_name}
        for name, stage in (("my-dit", "dit"), (default_name, "vae")):
            record = records[name]
            assert (record["stage"], record["model"]) == (stage, MODEL)
            assert record["state"] == "ready"
            assert record["gpu_type"] == "cpu"
            assert record["device"] == "cpu"
            assert record["memory"] > 0
            assert record["host"] == host

        # UCX progress settings for every process of the cluster (used over ucx://)
        for key, value in UCX_PROGRESS_ENVIRON.items():
            assert client.run_on_scheduler(os.environ.get, key) == value
            assert set(client.run(os.environ.get, key).values()) == {value}


def test_one_nanny_per_gpu_with_its_gpu_first():
    host = socket.gethostname()
    specs = nanny_specs("dit", MODEL, ["0", "1"])
    assert [s["env"] for s in specs] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "1,0"},
    ]
    assert [s["name"] for s in specs] == [f"{host}-gpu0", f"{host}-gpu1"]
    for spec in specs:
        assert spec["nthreads"] == stage_slots("dit")
        (plugin,) = spec["plugins"]
        assert isinstance(plugin, StagePlugin)
        assert (plugin.stage, plugin.model) == ("dit", MODEL)

    named = nanny_specs("dit", MODEL, ["2", "5", "7"], name="big", nthreads=4)
    assert [s["name"] for s in named] == ["big-0", "big-1", "big-2"]
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in named] == [
        "2,5,7",
        "5,7,2",
        "7,2,5",
    ]
    assert {s["nthreads"] for s in named} == {4}


def test_without_gpus_one_cpu_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (spec,) = nanny_specs("vae", MODEL, None, gpu_type="l4", resources={"extra": 1})
    assert spec["env"] == {}
    assert spec["name"] == f"{socket.gethostname()}-cpu-{os.getpid()}"
    # the VAE batches concurrent decodes: it runs several tasks at once
    assert spec["nthreads"] == stage_slots("vae") > 1
    assert spec["resources"] == {"extra": 1}
    (plugin,) = spec["plugins"]
    assert plugin.gpu_type == "l4"
