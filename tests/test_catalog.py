"""The catalog: which model a name means, resolved from configs alone; and
what a client process imports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import dask.config

from dflow import catalog, presets
from dflow.errors import InvalidRequest
from dflow.request import Request


def test_a_preset_resolves_without_building_its_folder(tmp_path):
    with dask.config.set({"dflow.cache-dir": str(tmp_path)}):
        spec = catalog.from_preset("tiny-flux")
        # named where a stage's first load will build it
        assert spec.source == str(presets.folder_path("tiny-flux"))
    assert spec.source.startswith(str(tmp_path))
    assert not os.path.exists(spec.source)
    assert list(tmp_path.iterdir()) == []
    assert spec.weight_bytes == presets.get("tiny-flux")["weight_bytes"]


def test_a_folder_resolves_by_its_configs(tiny_folders):
    folder = tiny_folders["tiny-wan"]
    spec = catalog.resolve(folder)
    assert (spec.name, spec.source, spec.preset) == (folder, folder, None)
    assert spec.family == "wan"
    # bytes of the weight files on disk, per stage
    assert all(spec.weight_bytes[stage] > 0 for stage in ("encoder", "dit", "vae"))
    assert catalog.resolve(folder + "/") is spec


def test_registered_specs_come_first():
    spec = dataclasses.replace(
        catalog.resolve("tiny-pixart"), name="served-elsewhere", source="/not/here"
    )
    with pytest.raises(ValueError, match="unknown model 'served-elsewhere'"):
        catalog.resolve("served-elsewhere")
    catalog.register(spec)
    try:
        assert catalog.resolve("served-elsewhere") is spec
        request = Request(model="served-elsewhere", prompt="a cat")
        assert request.spec is spec
    finally:
        catalog._registry.pop("served-elsewhere")


def test_unknown_model_points_to_dflow_models():
    with pytest.raises(InvalidRequest) as error:
        Request(model="someone/not-cached-here", prompt="a cat")
    assert error.value.field == "model"
    assert "dflow.models(client)" in str(error.value)


#: Runs in a fresh process: what a client imports and a request constructs
CLIENT_IMPORTS = """
import json, os, sys
import dflow.client
after_import = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
import dflow
request = dflow.Request(model="tiny-flux", prompt="a fox")
wan = dflow.Request(model="wan2.1-t2v-14b", prompt="a fox")
json.dump({
    "after_import": after_import,
    "after_request": sorted(
        m for m in ("torch", "diffusers", "transformers") if m in sys.modules
    ),
    "features": [request.features["latent_bytes"], wan.features["dit_tokens"]],
    "cache": os.listdir(os.environ["DASK_DFLOW__CACHE_DIR"]),
}, sys.stdout)
"""


def test_client_and_requests_import_no_torch(tmp_path):
    env = {**os.environ, "DASK_DFLOW__CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_IMPORTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(result.stdout)
    assert seen["after_import"] == []
    assert seen["after_request"] == []
    assert seen["features"] == [16 * 8 * 8 * 4, 21 * 30 * 52]
    assert seen["cache"] == []  # no preset folder was built
