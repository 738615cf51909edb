"""Workloads for benchmarks: arrivals, request mixes, shifts, and JSONL traces.

A :class:`Workload` is a list of :class:`Phase`\\ s, each starting at a given time
with its own arrival process and request mix, so a workload can shift from images
to video, or from a trickle to a burst, at set times. :func:`generate` draws the
requests of a run from a seeded ``numpy`` generator: the same workload and
duration give the same trace, byte for byte. Traces are JSON Lines: a header
object (``{"version": 1, "kind": "dflow-trace", ...}``, with the workload that made
it), then one request per line in time order; :func:`write_trace` and
:func:`read_trace` round-trip them exactly and :func:`replay` turns one back into
``(t, Request)`` pairs, optionally paced in real time.

Arrival processes
    ``poisson``: exponential gaps at ``rate`` requests per second.

    ``bursty``: a two-state Markov-modulated Poisson process (MMPP) with the same
    mean ``rate``. In the high state requests arrive at ``peak x rate``, in the
    low state at the rate that keeps the mean, ``rate x (1 - on_fraction x peak) /
    (1 - on_fraction)``; the process spends ``on_fraction`` of the time in the high
    state, in spells of exponential length with mean ``mean_on`` seconds (low spells
    average ``mean_on x (1 - on_fraction) / on_fraction``). ``peak = 1 /
    on_fraction`` silences the low state: an on/off source. Counts over windows
    longer than a spell have an index of dispersion (variance / mean) above 1,
    where Poisson's is 1. Defaults: ``peak=4``, ``on_fraction=0.2``,
    ``mean_on=10`` s: a fifth of the time at four times the mean rate.

Examples
--------
>>> workload = Workload(
...     phases=[
...         Phase(start=0, arrivals=Arrivals("poisson", rate=2.0),
...               mix=[Template("flux.1-dev", weight=3), Template("pixart-sigma-1024")]),
...         Phase(start=600, arrivals=Arrivals("bursty", rate=0.5),
...               mix=[Template("wan2.1-t2v-1.3b", num_frames=33)]),
...     ],
...     seed=0,
... )
>>> entries = generate(workload, duration=1200)  # doctest: +SKIP
>>> write_trace("trace.jsonl", entries, workload=workload, duration=1200)  # doctest: +SKIP
>>> for t, request in replay(read_trace("trace.jsonl")):  # doctest: +SKIP
...     ...
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dflow.request import Request

TRACE_VERSION = 1
TRACE_KIND = "dflow-trace"
PROCESSES = ("poisson", "bursty")

# Words of generated prompts: a few short, common words, so that a prompt fits the
# shortest text encoder limit of the test presets.
_ADJECTIVES = ("red", "quiet", "old", "bright", "small", "golden", "misty", "tall")
_SUBJECTS = ("fox", "bicycle", "lighthouse", "cat", "tree", "boat", "house", "robot")
_PLACES = ("in the rain", "at dawn", "by the sea", "in a forest", "on a hill")


@dataclass(frozen=True)
class Arrivals:
    """When requests arrive: ``process`` ``"poisson"`` or ``"bursty"`` at a mean of
    ``rate`` requests per second (bursty parameters: see the module docstring)."""

    process: str = "poisson"
    rate: float = 1.0
    peak: float = 4.0
    on_fraction: float = 0.2
    mean_on: float = 10.0

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ValueError(
                f"process must be one of {', '.join(PROCESSES)}, got {self.process!r}"
            )
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {self.rate}")
        if self.process == "bursty":
            if not 0 < self.on_fraction < 1:
                raise ValueError(
                    f"on_fraction must be between 0 and 1, got {self.on_fraction}"
                )
            if not 1 <= self.peak <= 1 / self.on_fraction:
                raise ValueError(
                    f"peak must be from 1 to 1 / on_fraction = {1 / self.on_fraction:g} "
                    f"(the low state's rate cannot go below 0), got {self.peak}"
                )
            if not self.mean_on > 0:
                raise ValueError(f"mean_on must be > 0 seconds, got {self.mean_on}")

    @property
    def low_rate(self) -> float:
        """Rate of the bursty process's low state (keeps the mean at ``rate``)."""
        f = self.on_fraction
        return max(0.0, self.rate * (1 - f * self.peak) / (1 - f))

    def times(self, rng: np.random.Generator, start: float, end: float) -> list[float]:
        """Arrival times in ``[start, end)``."""
        if self.process == "poisson":
            return _poisson(rng, self.rate, start, end)
        times: list[float] = []
        high = bool(rng.random() < self.on_fraction)  # the stationary state
        mean_off = self.mean_on * (1 - self.on_fraction) / self.on_fraction
        t = start
        while t < end:
            spell = rng.exponential(self.mean_on if high else mean_off)
            rate = self.rate * self.peak if high else self.low_rate
            stop = min(t + spell, end)
            times += _poisson(rng, rate, t, stop)
            t, high = stop, not high
        return times


def _poisson(rng: np.random.Generator, rate: float, start: float, end: float) -> list:
    if rate <= 0 or end <= start:
        return []
    count = rng.poisson(rate * (end - start))
    return sorted(start + (end - start) * rng.random(count))


@dataclass(frozen=True)
class Template:
    """One kind of request in a mix, drawn with probability proportional to
    ``weight``. Fields left ``None`` take the model's defaults when the request is
    built.

    ``images`` per prompt: a prompt asking for ``k`` images is ``k`` requests
    arriving together, with the same prompt and seeds ``seed``, ``seed + 1``,
    ... (as the HTTP gateway submits ``n`` images); they share one text
    encoding. A ``(least, most)`` pair draws ``k`` uniformly per prompt. ``slo``:
    the requests' latency objective in seconds (``None``: the scenario's).
    """

    model: str
    weight: float = 1.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    output_format: str | None = None
    images: int | tuple[int, int] = 1
    slo: float | None = None
    #: image-to-video models: the requests carry an input image
    image: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {self.weight}")
        images = self.images
        if isinstance(images, (list, tuple)):
            if len(images) != 2 or not 1 <= images[0] <= images[1]:
                raise ValueError(
                    f"images must be a count >= 1 or [least, most] with 1 <= least "
                    f"<= most, got {list(images)}"
                )
            object.__setattr__(self, "images", (int(images[0]), int(images[1])))
        elif not (isinstance(images, int) and images >= 1):
            raise ValueError(f"images must be an integer >= 1, got {images!r}")
        if self.slo is not None and not (math.isfinite(self.slo) and self.slo > 0):
            raise ValueError(f"slo must be a finite number > 0, got {self.slo}")

    def draw_images(self, rng: np.random.Generator) -> int:
        """Images of one prompt (a range draws from ``rng``; a count does not)."""
        if isinstance(self.images, tuple):
            least, most = self.images
            return int(rng.integers(least, most + 1))
        return self.images

    @property
    def mean_images(self) -> float:
        if isinstance(self.images, tuple):
            return (self.images[0] + self.images[1]) / 2
        return float(self.images)


@dataclass(frozen=True)
class Phase:
    """From ``start`` seconds until the next phase: ``arrivals`` of requests drawn
    from ``mix``."""

    start: float
    arrivals: Arrivals
    mix: Sequence[Template]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.mix:
            raise ValueError("a phase needs at least one template in its mix")
        object.__setattr__(self, "mix", tuple(self.mix))

    def weights(self) -> np.ndarray:
        weights = np.array([t.weight for t in self.mix], dtype=float)
        return weights / weights.sum()


@dataclass(frozen=True)
class Workload:
    """Phases (sorted by start; the first starts at 0) and the seed of the
    generator that draws arrivals, templates, seeds and prompts."""

    phases: Sequence[Phase]
    seed: int = 0

    def __post_init__(self) -> None:
        phases = tuple(sorted(self.phases, key=lambda p: p.start))
        if not phases or phases[0].start != 0:
            raise ValueError("a workload needs phases, the first starting at 0")
        if len({p.start for p in phases}) != len(phases):
            raise ValueError("two phases start at the same time")
        object.__setattr__(self, "phases", phases)

    def scaled(self, multiple: float) -> Workload:
        """The workload with every phase's arrival rate times ``multiple``."""
        return Workload(
            [
                replace(
                    p, arrivals=replace(p.arrivals, rate=p.arrivals.rate * multiple)
                )
                for p in self.phases
            ],
            self.seed,
        )

    def phase_at(self, t: float) -> Phase:
        """The phase in force at time ``t``."""
        current = self.phases[0]
        for phase in self.phases:
            if phase.start <= t:
                current = phase
        return current

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "phases": [
                {
                    "start": p.start,
                    "name": p.name,
                    "arrivals": asdict(p.arrivals),
                    "mix": [_template_dict(t) for t in p.mix],
                }
                for p in self.phases
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workload:
        """A workload from :meth:`to_dict`'s form (also what a YAML file holds)."""
        return cls(
            phases=[
                Phase(
                    start=float(p["start"]),
                    name=p.get("name", ""),
                    arrivals=Arrivals(**p.get("arrivals", {})),
                    mix=[Template(**t) for t in p["mix"]],
                )
                for p in data["phases"]
            ],
            seed=int(data.get("seed", 0)),
        )


#: The input image of image-to-video requests in a trace (emulated runs cost
#: the encode by the request's size, not the image's)
BLANK_IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)


def _template_dict(template: Template) -> dict[str, Any]:
    data = asdict(template)
    if isinstance(template.images, tuple):
        data["images"] = list(template.images)
    return data


@dataclass(frozen=True)
class TraceEntry:
    """One request of a trace, arriving ``t`` seconds after the start; the other
    fields are :class:`~dflow.request.Request`'s."""

    t: float
    model: str
    prompt: str
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    output_format: str | None = None
    phase: str = ""
    image: bool = False

    def request(self) -> Request:
        """The validated request (model defaults fill fields left ``None``;
        ``image``: a blank input image, whose pixels cost nothing emulated)."""
        from dflow.request import Request

        values = asdict(self)
        del values["t"], values["phase"]
        values["image"] = BLANK_IMAGE if self.image else None
        return Request(**values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceEntry:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown trace fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def prompt(rng: np.random.Generator) -> str:
    """A short prompt drawn from ``rng`` (deterministic for a seeded generator)."""
    adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
    subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
    place = _PLACES[rng.integers(len(_PLACES))]
    return f"a {adjective} {subject} {place}"


def generate(workload: Workload, duration: float) -> list[TraceEntry]:
    """The requests of a run of ``duration`` seconds, in time order.

    Phases draw in turn from one generator seeded with ``workload.seed``: the
    same workload and duration always give the same entries. A phase's arrival
    process starts afresh at its start (a bursty source from its stationary state).
    """
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a finite number >= 0, got {duration}")
    rng = np.random.default_rng(workload.seed)
    entries = []
    phases = workload.phases
    for index, phase in enumerate(phases):
        end = phases[index + 1].start if index + 1 < len(phases) else duration
        times = phase.arrivals.times(rng, phase.start, min(end, duration))
        if not times:
            continue
        choices = rng.choice(len(phase.mix), size=len(times), p=phase.weights())
        for t, choice in zip(times, choices):
            template = phase.mix[choice]
            first = TraceEntry(
                t=float(t),
                model=template.model,
                prompt=prompt(rng),
                negative_prompt=template.negative_prompt,
                height=template.height,
                width=template.width,
                num_frames=template.num_frames,
                steps=template.steps,
                guidance_scale=template.guidance_scale,
                seed=int(rng.integers(2**63)),
                output_format=template.output_format,
                phase=phase.name,
                image=template.image,
            )
            images = template.draw_images(rng)
            assert first.seed is not None
            entries += [
                replace(first, seed=first.seed + i) if i else first
                for i in range(images)
            ]
    return entries


@dataclass
class Trace:
    """A trace read back: its header (``version``, ``kind``, and what the writer
    added: ``workload``, ``duration``, ...) and entries in time order."""

    header: dict[str, Any]
    entries: list[TraceEntry] = field(default_factory=list)

    @property
    def workload(self) -> Workload | None:
        data = self.header.get("workload")
        return None if data is None else Workload.from_dict(data)


def write_trace(
    path: str | Path,
    entries: Iterable[TraceEntry],
    *,
    workload: Workload | None = None,
    duration: float | None = None,
    **header: Any,
) -> Path:
    """Write a JSONL trace: a header line, then one entry per line in time order.
    Extra keyword arguments go into the header (JSON values)."""
    path = Path(path)
    first = {"version": TRACE_VERSION, "kind": TRACE_KIND, **header}
    if workload is not None:
        first["workload"] = workload.to_dict()
    if duration is not None:
        first["duration"] = duration
    with path.open("w") as file:
        file.write(json.dumps(first, separators=(",", ":")) + "\n")
        for entry in sorted(entries, key=lambda e: e.t):
            file.write(entry.to_json() + "\n")
    return path


def read_trace(path: str | Path) -> Trace:
    """Read a trace written by :func:`write_trace` (or by hand: a header line with
    ``"version": 1``, then one JSON object per entry)."""
    with Path(path).open() as file:
        lines = [line for line in file if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty: a trace starts with a header line")
    header = json.loads(lines[0])
    if header.get("version") != TRACE_VERSION or header.get("kind", TRACE_KIND) != (
        TRACE_KIND
    ):
        raise ValueError(
            f"{path} is not a version {TRACE_VERSION} dflow trace: its first line is "
            f"{lines[0].strip()[:200]}"
        )
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            entries.append(TraceEntry.from_dict(json.loads(line)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
    entries.sort(key=lambda e: e.t)
    return Trace(header, entries)


def replay(
    trace: Trace | Iterable[TraceEntry],
    *,
    pace: bool = False,
    time_scale: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[float, Request]]:
    """``(t, request)`` of each entry in time order.

    With ``pace`` each pair is yielded no sooner than ``t x time_scale`` seconds
    after the first ``next()`` (``time_scale``: as ``dflow.emulation.time-scale``,
    so 0.01 replays an hour in 36 s against emulated workers at that scale);
    without, at once. ``t`` is always the trace's own time.
    """
    entries = trace.entries if isinstance(trace, Trace) else list(trace)
    entries = sorted(entries, key=lambda e: e.t)
    start = clock()
    for entry in entries:
        if pace:
            wait = start + entry.t * time_scale - clock()
            if wait > 0:
                sleep(wait)
        yield entry.t, entry.request()
