"""dflow's dask config: defaults from ``dflow.yaml``, overridable like any dask config
(YAML in ``~/.config/dask``, ``DASK_DFLOW__...`` environment variables,
``dask.config.set``)."""

from __future__ import annotations

from importlib.resources import files

import yaml

import dask.config

defaults = yaml.safe_load(files("dflow.configs").joinpath("dflow.yaml").read_text())
dask.config.update_defaults(defaults)
