"""Fuzzing :class:`~dflow.request.Request` and ``dflow.submit`` with hypothesis.

Any input gives a result, or a ``ValueError`` / ``TypeError`` whose message names
the field at fault; never another exception, a worker crash or a hang.

- ``Request`` over arbitrary values of every field: text with control characters,
  surrogates and huge lengths; integers, floats (nan, inf), booleans, ``None``,
  strings and lists where numbers go; unknown models and unknown fields.
- ``dflow.submit`` on a live cluster (tiny PixArt-Sigma, one in-process worker per
  stage) with valid but extreme requests (largest and smallest sizes, 1 and 200
  steps, guidance 0 and its maximum, prompts at the token limit, extreme seeds),
  with bad ``mode`` / ``deadline`` arguments, and with requests tampered past
  validation (as a client with stale limits, or a hostile one, would send): each
  gives an output or a clean error within its deadline, and the workers serve on.

Examples per test: ``DFLOW_FUZZ_EXAMPLES`` (default: the CI budget below).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distributed import Client, Scheduler, SpecCluster, Worker
from distributed.client import FutureCancelledError

import dflow
from dflow.catalog import resolve
from dflow.errors import InvalidRequest
from dflow.output import Output
from dflow.request import MAX_SEED, OUTPUT_FORMATS, Request
from dflow.spec import STAGES
from dflow.testing import TINY_PRESETS, wait_for_pools
from dflow.worker import StagePlugin

FIELDS = tuple(f.name for f in dataclasses.fields(Request))
EXAMPLES = int(os.environ.get("DFLOW_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(examples: int) -> settings:
    """Bounded and derandomized in CI, no example database in the repository."""
    return settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        derandomize=EXAMPLES is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- Request ------------------------------------------------------------------------------

#: Text of every kind: control characters, lone surrogates, long runs
texts = st.one_of(
    st.text(max_size=40),
    st.text(
        st.characters(codec=None, categories=["Cc", "Cs", "Zs", "Mn"]), max_size=40
    ),
    st.builds(lambda c, n: c * n, st.characters(), st.integers(1, 20_000)),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-2, 4200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 8, 16, 64, 512, 2048, 2**64 - 1, 2**64, -0.0, 1e-300]),
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    texts,
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
plausible = {
    "model": st.one_of(st.sampled_from(TINY_PRESETS), texts),
    "prompt": texts,
    "negative_prompt": texts,
    "height": numbers,
    "width": numbers,
    "num_frames": numbers,
    "steps": numbers,
    "guidance_scale": numbers,
    "seed": numbers,
    "output_format": st.sampled_from(["pil", "png", "np", "gif", "PNG", "jpeg", ""]),
    # image-to-video models' input images: arrays of any small shape and bytes
    "image": st.one_of(
        st.builds(
            lambda shape: np.zeros(shape, dtype=np.uint8),
            st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
        ),
        st.binary(max_size=64),
    ),
}


@st.composite
def request_arguments(draw) -> dict[str, Any]:
    """Keyword arguments of ``Request``: model and prompt always, others maybe,
    each plausible or anything at all, and sometimes a field that does not exist."""
    arguments = {}
    for name in FIELDS:
        if name in ("model", "prompt") or draw(st.booleans()):
            arguments[name] = draw(st.one_of(plausible[name], anything))
    if draw(st.integers(0, 9)) == 0:
        arguments[draw(st.sampled_from(["size", "num_steps", "cfg"]))] = 1
    return arguments


def check_valid(request: Request) -> None:
    """What a constructed request guarantees to the stages that run it."""
    spec = request.spec
    for name in ("height", "width", "steps", "seed"):
        assert type(getattr(request, name)) is int, name
    assert spec.size_multiple <= request.height <= spec.limit("max_size")
    assert (
        request.height % spec.size_multiple == request.width % spec.size_multiple == 0
    )
    assert 1 <= request.steps <= spec.limit("max_steps")
    assert type(request.guidance_scale) is float and math.isfinite(
        request.guidance_scale
    )
    assert 0 <= request.guidance_scale <= spec.limit("max_guidance_scale")
    assert 0 <= request.seed <= MAX_SEED
    assert request.output_format in OUTPUT_FORMATS[spec.video]
    assert isinstance(request.prompt, str) and request.prompt.strip()
    if spec.video:
        assert (request.num_frames - 1) % spec.vae_scale_temporal == 0
    else:
        assert request.num_frames in (None, 1)
    assert request.features["latent_bytes"] > 0
    assert pickle.loads(pickle.dumps(request)) == request  # it travels to workers


@fuzz_settings(examples=400)
@given(arguments=request_arguments())
def test_request_is_valid_or_names_the_field(arguments):
    try:
        request = Request(**arguments)
    except InvalidRequest as error:
        assert error.field in FIELDS
        assert str(error).startswith(f"{error.field}: ")
        # or a field the model needs and the request left to a default
        assert error.field in arguments or error.field in (
            "height",
            "width",
            "steps",
            "image",
        )
        return
    except (ValueError, TypeError) as error:
        # the dataclass's own checks: unknown or missing keyword arguments
        named = [name for name in arguments if repr(name) in str(error)]
        assert named, f"{type(error).__name__} names no field: {error}"
        return
    check_valid(request)


# -- dflow.submit on a live cluster ----------------------------------------------------------

MODEL = "tiny-pixart"
#: The in-process cluster's threads use the ``random`` module while hypothesis
#: draws an example; hypothesis would blame the strategy for it
cluster_randomness = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
)
#: Bound on any one request: extreme ones (512x512, 200 steps) may take longer on
#: a loaded CPU and are then cancelled, which is a clean outcome too
DEADLINE = 20.0


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """One in-process worker per stage of tiny PixArt-Sigma, behind a scheduler
    with dflow's preload (workers in this process: a crash would fail the test
    run, not hide in a log)."""
    workers = {
        stage: {
            "cls": Worker,
            "options": {
                "nthreads": 2,
                "host": "127.0.0.1",
                "plugins": {StagePlugin(stage, MODEL)},
            },
        }
        for stage in STAGES
    }
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard_address": ":0",
            "preload": ["dflow.preload"],
        },
    }
    with (
        SpecCluster(workers=workers, scheduler=scheduler) as cluster,
        Client(cluster) as client,
    ):
        wait_for_pools(client, {MODEL: STAGES}, timeout=120)
        token_prompt(1)  # builds the tokenizer outside hypothesis's strategies
        yield client


@functools.cache
def token_prompt(count: int) -> str:
    """A prompt of exactly ``count`` tokens of the model's tokenizer."""
    from dflow import prompts

    tokenizer = prompts.tokenizer(Request(model=MODEL, prompt="x").spec)
    words = ["fox"] * count
    while len(tokenizer(" ".join(words)).input_ids) > count:
        words.pop()
    return " ".join(words)


@st.composite
def extreme_fields(draw) -> dict[str, Any]:
    """Fields of a valid but extreme request; prompts at the token limit are
    ``("tokens", n)``, made in the test (building the tokenizer inside a
    strategy would trip hypothesis's check on the random module)."""
    spec = resolve(MODEL)
    multiple, largest = spec.size_multiple, spec.limit("max_size")
    sizes = st.sampled_from([multiple, 2 * multiple, largest])
    limit = spec.max_sequence_length
    return {
        "prompt": draw(
            st.one_of(
                st.tuples(st.just("tokens"), st.sampled_from([1, limit])),
                st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
            )
        ),
        "negative_prompt": draw(st.sampled_from(["", "blurry", ("tokens", limit)])),
        "height": draw(sizes),
        "width": draw(sizes),
        "steps": draw(st.sampled_from([1, 2, spec.limit("max_steps")])),
        "guidance_scale": draw(
            st.sampled_from([0.0, 1.0, spec.limit("max_guidance_scale")])
        ),
        "seed": draw(st.sampled_from([0, MAX_SEED])),
        "output_format": draw(st.sampled_from(OUTPUT_FORMATS[False])),
    }


def extreme_request(fields: dict[str, Any]) -> Request:
    fields = {
        name: token_prompt(value[1]) if isinstance(value, tuple) else value
        for name, value in fields.items()
    }
    try:
        return Request(model=MODEL, **fields)
    except InvalidRequest:
        assume(False)  # e.g. text over the token limit: the Request fuzz covers it
        raise


def workers_serve(client: Client) -> None:
    """Every stage worker is alive and ready (none crashed or was replaced)."""
    records = client.sync(client.scheduler.dflow_workers)
    assert sorted(r["stage"] for r in records if r["state"] == "ready") == sorted(
        STAGES
    )


def outcome(future) -> Output | BaseException:
    """The output, or the error, within the request's deadline plus slack."""
    try:
        return future.result(timeout=DEADLINE + 30)
    except TimeoutError:
        pytest.fail(f"{future.key} neither finished nor failed: a hang")
    except Exception as error:
        return error


@pytest.mark.slow
@cluster_randomness
@fuzz_settings(examples=12)
@given(fields=extreme_fields())
def test_submit_extreme_requests_give_outputs_or_clean_errors(client, fields):
    request = extreme_request(fields)
    result = outcome(dflow.submit(client, request, deadline=DEADLINE))
    if isinstance(result, FutureCancelledError):
        assert result.reason == "deadline-exceeded"
    else:
        assert isinstance(result, Output), repr(result)
        assert result.request == request
        if request.output_format == "pil":
            assert result.images[0].size == (request.width, request.height)
    workers_serve(client)


@pytest.mark.slow
@cluster_randomness
@fuzz_settings(examples=30)
@given(mode=anything, deadline=anything)
def test_submit_arguments_are_checked_at_the_client(client, mode, deadline):
    request = Request(model=MODEL, prompt="a fox", height=64, width=64, steps=1)
    try:
        future = dflow.submit(client, request, mode=mode, deadline=deadline)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert message.startswith(("mode", "deadline:")), message
        return
    # accepted: a known mode and a usable deadline
    assert mode in (None, "disaggregated", "monolithic")
    result = outcome(future)
    assert isinstance(result, (Output, FutureCancelledError)), repr(result)


#: Values that no client-side validation lets through, set past it
TAMPERED = {
    "steps": [0, -3],
    "guidance_scale": [math.nan, math.inf, -5.0],
    "seed": [-1, 2**64],
    "prompt": ["", None, 12],
    "negative_prompt": [None],
    "output_format": ["bmp", None],
    "num_frames": [5],
}


@pytest.mark.slow
@cluster_randomness
@fuzz_settings(examples=12)
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(TAMPERED)),
        st.integers(0, 2),
        min_size=1,
        max_size=2,
    )
)
def test_tampered_requests_fail_alone_and_workers_serve_on(client, changes):
    good = Request(model=MODEL, prompt="a fox", height=64, width=64, steps=1, seed=1)
    bad = Request(model=MODEL, prompt="a fox", height=64, width=64, steps=1, seed=2)
    for name, index in changes.items():
        values = TAMPERED[name]
        object.__setattr__(bad, name, values[index % len(values)])
    bad.__dict__.pop("features", None)  # computed from the tampered fields
    try:
        futures = dflow.map(client, [good, bad], deadline=DEADLINE)
    except (ValueError, TypeError) as error:
        # admission computes the request's features: it may refuse it at once
        assert str(error).split(":")[0] in FIELDS, error
        return
    first, second = (outcome(f) for f in futures)
    # the tampered request's own error is whatever its stage raised (under this
    # test run's warnings-as-errors, NaN pixels raise too); it fails alone
    assert isinstance(first, Output) and first.request == good, repr(first)
    assert isinstance(second, (Output, Exception)), repr(second)
    workers_serve(client)
    start = time.monotonic()
    assert dflow.submit(client, good).result(timeout=60).request == good
    assert time.monotonic() - start < 60
