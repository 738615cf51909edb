"""Shared fixtures: an isolated preset cache, the tiny preset folders, the
``model_folder`` parametrization that external diffusers folders join, and dflow's
config inside ``gen_test``/``gen_cluster``. Shared helpers that are not
fixtures are in :mod:`dflow.testing`.

Run the folder-parametrized tests on other diffusers folders with
``pytest --model-path PATH`` (repeatable) or ``DFLOW_TEST_MODEL_PATHS`` (paths
separated by ``os.pathsep``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

import dask.config

from dflow.testing import MODEL_PATHS_ENV, TINY_PRESETS, external_model_paths


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a diffusers folder to run the model_folder tests on, besides the tiny "
        f"presets (repeatable; also ${MODEL_PATHS_ENV}, separated by os.pathsep)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_folder" in metafunc.fixturenames:
        params = [pytest.param(name, id=name) for name in TINY_PRESETS]
        params += [
            pytest.param(path, id=Path(path).name)
            for path in external_model_paths(metafunc.config)
        ]
        metafunc.parametrize("model_folder", params, indirect=True, scope="session")


@pytest.fixture(scope="session", autouse=True)
def dflow_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide ``dflow.cache-dir``, so tests never read or fill the user's
    cache; the environment variable carries it to subprocesses."""
    path = str(tmp_path_factory.mktemp("dflow-cache"))
    with pytest.MonkeyPatch.context() as mp, dask.config.set({"dflow.cache-dir": path}):
        mp.setenv("DASK_DFLOW__CACHE_DIR", path)
        yield path


@pytest.fixture(scope="session", autouse=True)
def quiet_progress_bars():
    """No diffusers or transformers progress bars in the test output."""
    from dflow.logs import quiet_progress_bars

    with quiet_progress_bars():
        yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, while on a busy
    machine OpenMP's waiting threads make the CPU tests several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folders(dflow_cache_dir: str) -> dict[str, str]:
    """The tiny presets' diffusers folders, built once per session."""
    from dflow import presets

    return {name: presets.folder(name) for name in TINY_PRESETS}


@pytest.fixture(scope="session")
def model_folder(request: pytest.FixtureRequest, tiny_folders: dict[str, str]) -> str:
    """A diffusers folder: each tiny preset's, then each ``--model-path``."""
    return tiny_folders.get(request.param, request.param)


@pytest.fixture
def keep_dflow_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """dflow's session config (its defaults, the tests' cache dir) inside
    ``gen_test``/``gen_cluster``, which reset dask config to a copy taken when
    ``distributed.utils_test`` was imported, before dflow's were set. Returns
    that copy, for a test to change further."""
    from distributed import utils_test

    config = copy.deepcopy(utils_test.original_config)
    config["dflow"] = copy.deepcopy(dask.config.get("dflow"))
    monkeypatch.setattr(utils_test, "original_config", config)
    return config


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """List the pixel differences that tests recorded with
    ``record_property("max_abs_diff", ...)``, so exact equality shows."""
    lines = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            properties = dict(getattr(report, "user_properties", ()))
            if "max_abs_diff" in properties and report.when == "call":
                diff = properties["max_abs_diff"]
                verdict = "identical pixels" if diff == 0 else f"max |diff| {diff}/255"
                lines.append(f"{report.nodeid}: {verdict}")
    if lines:
        terminalreporter.section("pixel differences against stock diffusers")
        for line in lines:
            terminalreporter.line(line)
