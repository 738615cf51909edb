"""The shipped config and its schema, read as installed (``dflow.configs``):
the defaults validate against the schema, and each describes every key of the
other (as ``distributed/tests/test_config.py`` checks ``distributed.yaml``)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import jsonschema
import pytest
import yaml


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load(files("dflow.configs").joinpath(name).read_text())


def test_defaults_validate_against_the_schema():
    jsonschema.validate(load("dflow.yaml"), load("dflow-schema.yaml"))


def test_schema_rejects_a_value_out_of_range():
    config = load("dflow.yaml")
    config["dflow"]["runtime"]["max-batch"] = 0
    with pytest.raises(jsonschema.ValidationError, match="less than the minimum of 1"):
        jsonschema.validate(config, load("dflow-schema.yaml"))


def test_schema_is_complete():
    """Every key of ``dflow.yaml`` has a schema entry and every schema entry a
    default, at every level."""

    def keys(config: dict[str, Any], schema: dict[str, Any], path: str) -> None:
        described = set(schema.get("properties", {}))
        assert set(config) == described, (
            f"{path or 'the root'}: only in dflow.yaml {sorted(set(config) - described)}, "
            f"only in dflow-schema.yaml {sorted(described - set(config))}"
        )
        for key, value in config.items():
            if isinstance(value, dict):
                keys(value, schema["properties"][key], f"{path}.{key}".lstrip("."))

    keys(load("dflow.yaml"), load("dflow-schema.yaml"), "")
