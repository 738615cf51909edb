"""Benchmark scenarios: YAML files of a fleet, a workload and how to run it.

A scenario fixes a fleet of emulated GPU types, a workload (arrival phases and
request mixes), how long it runs, how much it compresses time, the SLOs and the
serving modes to compare; ``--quick`` applies the file's ``quick`` overrides
(fewer emulated seconds, more compression) so that it runs in minutes on two
cores. The shipped scenarios are ``configs/scenarios/<NAME>.yaml`` (S1, S2,
S2-80, S3, S5, S6, S6-MIX, S7, S8); ``dflow bench --scenario FILE.yaml``
runs any other file. Files are checked against ``configs/scenarios/schema.yaml``, then for
what a schema cannot say (GPU types, models, modes, times); every error names
the field (``S7.yaml: workload.phases[1].arrivals.rate: ...``). The keys are
explained in ``docs/scenarios.md``.

S4 (1,000 workers on one scheduler) is not a file: :mod:`dflow.bench.scale`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dflow.bench import DEFAULT_MODES, MODES
from dflow.bench.workload import Arrivals, Phase, Template, Workload

#: dflow's controller settings, in emulated seconds: its defaults but for the
#: interval (5 s rather than 2 s: each plan walks the scheduler's tasks, and at
#: a time scale of 0.05 a 2 s interval would plan 10 times a wall second on two
#: cores) and the horizon (120 s rather than 30 s: a Flux request takes 25 s on
#: a 4090 and a DiT load 17 s, so over 30 s a move could never pay)
CONTROLLER = {
    "interval": 5.0,
    "horizon": 120.0,
    "cooldown": 60.0,
    "hysteresis": 0.1,
    "window": 30.0,
    "default-switch": 10.0,
}

#: Ray Serve's request-based policy; downscale after 60 s (Ray's default is
#: 600 s), which favours the baseline on a shifting mix
AUTOSCALER = {
    "target_ongoing": 2.0,
    "upscale_delay": 30.0,
    "downscale_delay": 60.0,
    "interval": 10.0,
    "look_back": 30.0,
    "min_replicas": 1,
}

#: DisagFusion's prototype policy (``zhtshr/LightX2V``, its controller; see
#: :mod:`dflow.bench.baselines`): per stage, scale out above 80% GPU
#: utilization or a queue deeper than 2, scale in below 20%, 30 s cooldown, no
#: scaling during the first ``warmup`` seconds; utilization over ``window``
DISAGFUSION = {
    "scale_out_utilization": 0.8,
    "scale_out_queue": 2.0,
    "scale_in_utilization": 0.2,
    "cooldown": 30.0,
    "warmup": 60.0,
    "interval": 5.0,
    "window": 30.0,
}

#: Defaults of a scenario file's optional keys
DEFAULTS = {
    "warmup": 0.0,
    "drain": 300.0,
    "time-scale": 0.1,
    "sample-every": 5.0,
    "slo-factor": 5.0,
    "repeats": 1,
    "jobs": 1,
}
SUFFIXES = (".yaml", ".yml")


class ScenarioError(ValueError):
    """A scenario file that cannot run; the message names the file and field."""


@dataclass(frozen=True)
class Scenario:
    """One benchmark scenario.

    Parameters
    ----------
    fleet
        Emulated GPUs per type (``configs/gpus.yaml``).
    duration, warmup, drain
        Emulated seconds of arrivals; the first ``warmup`` seconds are left out
        of the metrics; after the arrivals the run waits up to ``drain`` seconds
        for requests in flight.
    time_scale
        ``dflow.emulation.time-scale`` of the run.
    slo_factor, slo
        A request's SLO is its template's ``slo``, else ``slo[model]``, else
        ``slo_factor`` times its latency alone on the fleet's best deployment.
    modes, repeats
        The serving modes to run, and how many times each (seeds ``seed``,
        ``seed + 1``, ...).
    jobs
        Fleets run at once, each in a process of its own (a light fleet's
        runs are mostly emulated waiting).
    data
        The file's content (``quick_variant`` and ``reseeded`` rebuild from it).
    """

    name: str
    title: str
    fleet: dict[str, int]
    workload: Workload
    duration: float
    warmup: float
    drain: float
    time_scale: float
    goals: str
    slo_factor: float = 5.0
    slo: dict[str, float] = field(default_factory=dict)
    sample_every: float = 5.0
    modes: tuple[str, ...] = DEFAULT_MODES
    repeats: int = 1
    jobs: int = 1
    #: dask config of the scenario's runs and its physics (8-bit DiT weights)
    config: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=lambda: dict(CONTROLLER))
    autoscaler: dict[str, Any] = field(default_factory=lambda: dict(AUTOSCALER))
    disagfusion: dict[str, Any] = field(default_factory=lambda: dict(DISAGFUSION))
    source: str = ""
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def quick_variant(self) -> Scenario:
        """The scenario as ``--quick`` runs it (the file's ``quick`` overrides)."""
        if not self.data.get("quick"):
            return self
        data = merge(self.data, self.data["quick"])
        del data["quick"]
        return from_dict(data, self.source)

    def reseeded(self, seed: int) -> Scenario:
        """The scenario with its workload drawn from ``seed``."""
        if not self.data:
            return replace(self, workload=Workload(self.workload.phases, seed))
        data = copy.deepcopy(self.data)
        data["workload"]["seed"] = seed
        return from_dict(data, self.source)

    def at_rate(self, multiple: float) -> Scenario:
        """The scenario with every phase's arrival rate times ``multiple``."""
        return replace(self, workload=self.workload.scaled(multiple))


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; mappings merge key by key."""
    result = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# -- files -----------------------------------------------------------------------------


def folder() -> Path:
    """Where the shipped scenario files are."""
    return Path(str(files("dflow.configs") / "scenarios"))


def names() -> list[str]:
    """The shipped scenarios' names."""
    return sorted(p.stem for p in folder().glob("*.yaml") if p.stem != "schema")


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load((folder() / "schema.yaml").read_text())


def get(name: str) -> Scenario:
    """The scenario named ``name`` (a shipped one, case-insensitive) or in the
    YAML file at ``name``; :class:`ScenarioError` when it is neither or does not
    validate."""
    path = Path(name)
    if path.suffix.lower() in SUFFIXES:
        if not path.is_file():
            raise ScenarioError(f"scenario file {name} does not exist")
    else:
        known = {n.upper(): n for n in names()}
        if name.upper() not in known:
            raise ScenarioError(
                f"unknown scenario {name!r}; known: {', '.join(names())}, S4, "
                "or a YAML file (docs/scenarios.md)"
            )
        path = folder() / f"{known[name.upper()]}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path.name}: not valid YAML: {error}") from None
    return load(data, path.name, default_name=path.stem)


def load(data: Any, source: str = "scenario", default_name: str = "") -> Scenario:
    """A scenario from a file's content: validated (against the schema, then
    :func:`check`), its ``quick`` overrides validated too."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: a scenario file is a mapping of keys")
    data = dict(data)
    data.setdefault("name", default_name or "scenario")
    validate(data, source)
    if data.get("quick"):
        quick = merge(data, data["quick"])
        del quick["quick"]
        validate(quick, f"{source} (quick)")
    return from_dict(data, source)


def validate(data: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ScenarioError` naming the first field that is wrong."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = path_text(error.absolute_path) or "(top level)"
        message = error.message
        allowed = error.schema.get("properties") if error.schema else None
        if error.validator == "additionalProperties" and allowed:
            unknown = sorted(set(error.instance) - set(allowed))
            message = (
                f"unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )
        raise ScenarioError(f"{source}: {where}: {message}")
    check(data, source)


def path_text(path: Sequence[Any]) -> str:
    """``["workload", "phases", 1, "rate"]`` as ``workload.phases[1].rate``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def check(data: Mapping[str, Any], source: str) -> None:
    """What the schema cannot check: GPU types, models, modes, times."""
    from dflow.bench.physics import has_experts
    from dflow.hardware import catalog
    from dflow.request import Request

    def fail(where: str, message: str) -> None:
        raise ScenarioError(f"{source}: {where}: {message}")

    gpus = catalog().gpus
    for gpu in data["fleet"]:
        if gpu not in gpus:
            fail(f"fleet.{gpu}", f"unknown GPU type; known: {', '.join(sorted(gpus))}")
    if not sum(data["fleet"].values()):
        fail("fleet", "has no GPUs")
    for index, mode in enumerate(data.get("modes", ())):
        if mode not in MODES:
            fail(f"modes[{index}]", f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    for key, defaults in (
        ("controller", CONTROLLER),
        ("autoscaler", AUTOSCALER),
        ("disagfusion", DISAGFUSION),
    ):
        for name in data.get(key, {}):
            if name not in defaults:
                fail(f"{key}.{name}", f"unknown setting; known: {', '.join(defaults)}")
    workload = data["workload"]
    durations = [("workload.phase-duration", workload.get("phase-duration"))]
    experts = False
    for index, phase in enumerate(workload["phases"]):
        where = f"workload.phases[{index}]"
        durations.append((f"{where}.duration", phase.get("duration")))
        unbounded = phase.get("duration", workload.get("phase-duration")) is None
        if unbounded and (
            index + 1 < len(workload["phases"]) or workload.get("cycles", 1) > 1
        ):
            fail(f"{where}.duration", "required (or workload.phase-duration)")
        try:
            Arrivals(**phase["arrivals"])
        except ValueError as error:
            fail(f"{where}.arrivals", str(error))
        for number, template in enumerate(phase["mix"]):
            spot = f"{where}.mix[{number}]"
            fields = {
                k: v
                for k, v in template.items()
                if k not in ("weight", "images", "slo", "image")
            }
            if template.get("image"):
                from dflow.bench.workload import BLANK_IMAGE

                fields["image"] = BLANK_IMAGE
            try:
                request = Request(prompt="a fox", seed=0, **fields)
            except ValueError as error:
                name = getattr(error, "field", None)
                if name is None:
                    fail(spot, str(error))
                fail(f"{spot}.{name}", str(error).removeprefix(f"{name}: "))
            experts = experts or has_experts(request.spec)
    modes = list(data.get("modes", ()))
    if "static_experts" in modes and not experts:
        fail(
            f"modes[{modes.index('static_experts')}]",
            "static_experts splits a two-expert model's DiT into one pool per "
            "expert; no model of the workload has two experts (Wan 2.2 A14B has)",
        )
    for where, value in durations:
        if isinstance(value, list) and value[0] > value[1]:
            fail(where, f"[least, most] with least <= most, got {value}")
    last = workload["phases"][-1]
    if "duration" not in data and (
        last.get("duration", workload.get("phase-duration")) is None
    ):
        fail("duration", "required when the last phase has no duration")
    window = data.get("warmup", DEFAULTS["warmup"])
    if "duration" in data and window >= data["duration"]:
        fail("warmup", f"must be less than duration ({data['duration']} s)")


# -- building --------------------------------------------------------------------------


def from_dict(data: Mapping[str, Any], source: str = "") -> Scenario:
    """A scenario from a validated file's content."""
    values = {**DEFAULTS, **data}
    workload, length = build_workload(data["workload"])
    duration = float(values.get("duration", length))
    return Scenario(
        name=str(values["name"]),
        title=str(values.get("title", values["name"])),
        fleet={g: int(n) for g, n in data["fleet"].items() if n},
        workload=workload,
        duration=duration,
        warmup=float(values["warmup"]),
        drain=float(values["drain"]),
        time_scale=float(values["time-scale"]),
        goals=str(values.get("goals", "")),
        slo_factor=float(values["slo-factor"]),
        slo={m: float(s) for m, s in values.get("slo", {}).items()},
        sample_every=float(values["sample-every"]),
        modes=tuple(values.get("modes", DEFAULT_MODES)),
        repeats=int(values["repeats"]),
        jobs=int(values["jobs"]),
        controller={**CONTROLLER, **values.get("controller", {})},
        autoscaler={**AUTOSCALER, **values.get("autoscaler", {})},
        disagfusion={**DISAGFUSION, **values.get("disagfusion", {})},
        config=dict(values.get("config", {})),
        source=source,
        data=copy.deepcopy(dict(data)),
    )


def build_workload(data: Mapping[str, Any]) -> tuple[Workload, float]:
    """The workload of a file's ``workload`` key, and when its last phase ends.

    Phases run in the order written, ``cycles`` times (``order: random``: each
    next phase drawn among the others); a phase lasts its ``duration`` or the
    workload's ``phase-duration``, a ``[least, most]`` range drawn uniformly
    for each phase from a generator seeded by ``seed`` (apart from the one that
    draws the requests, so the trace of fixed durations does not change)."""
    seed = int(data.get("seed", 0))
    rng = np.random.default_rng([seed, 1])
    templates = data["phases"]
    cycles = int(data.get("cycles", 1))
    rate = float(data.get("rate-scale", 1.0))
    order = list(range(len(templates))) * cycles
    if data.get("order") == "random" and len(templates) > 1:
        order = [int(rng.integers(len(templates)))]
        while len(order) < len(templates) * cycles:
            others = [i for i in range(len(templates)) if i != order[-1]]
            order.append(others[int(rng.integers(len(others)))])
    phases, start = [], 0.0
    for index in order:
        phase = templates[index]
        length = draw(phase.get("duration", data.get("phase-duration")), rng)
        arrivals = dict(phase["arrivals"])
        arrivals["rate"] = float(arrivals["rate"]) * rate
        mix = [Template(**t) for t in phase["mix"]]
        phases.append(Phase(start, Arrivals(**arrivals), mix, phase.get("name", "")))
        start += length if length is not None else math.inf
    return Workload(phases, seed=seed), start


def draw(value: Any, rng: np.random.Generator) -> float | None:
    """A phase's duration: a number, or drawn from a ``[least, most]`` range."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return float(rng.uniform(value[0], value[1]))
    return float(value)
