"""Why a stage cannot be served, in a sentence or two that say what to do.

:func:`model_problem` checks a model name before any process starts (the
``dflow-worker`` command, :class:`~dflow.cluster.StageCluster`): it reads
configs only, like :func:`dflow.catalog.resolve`. :func:`load_failure` explains
an error a stage worker met while loading or warming up its stage; the worker
logs it and exits.
"""

from __future__ import annotations

import os

from dflow import presets

#: What a model name can be, for the messages
MODEL_FORMS = (
    "a dflow preset ({presets}), a local diffusers folder or a Hugging Face id "
    "already in the local cache"
)


def model_problem(model: str) -> str | None:
    """What makes ``model`` unservable, or ``None`` if its spec resolves.

    Names a missing folder as missing, a folder without ``model_index.json`` as
    not a diffusers folder, and an unsupported pipeline with the ones dflow
    serves.
    """
    from dflow.catalog import resolve

    try:
        resolve(model)
    except ValueError as error:
        return _unresolved(model, error)
    return None


def _unresolved(model: str, error: ValueError) -> str:
    forms = MODEL_FORMS.format(presets=", ".join(presets.names()))
    if _looks_like_path(model) and not os.path.exists(model):
        return f"the folder {model} does not exist; a model is {forms}"
    if os.path.isdir(model) and not os.path.isfile(
        os.path.join(model, "model_index.json")
    ):
        return (
            f"{model} is not a diffusers folder (it has no model_index.json); "
            f"a model is {forms}"
        )
    text = str(error).removeprefix("model: ")
    if "is not supported" in text:
        return f"{model}: {text}; use a folder of one of those pipelines"
    if "/" in model:
        return (
            f"{model!r} is neither a folder here nor a Hugging Face id in the local "
            f"cache (dflow never downloads); a model is {forms}"
        )
    return f"unknown model {model!r}; a model is {forms}"


def _looks_like_path(model: str) -> bool:
    """A name only a folder can mean: a Hugging Face id is ``owner/name``."""
    return model.startswith((os.sep, ".", "~")) or model.count("/") > 1


def load_failure(model: str, stage: str, error: BaseException, warming: bool) -> str:
    """One or two sentences: why ``stage`` of ``model`` could not be served
    (``error``, raised while loading, or warming up when ``warming``) and what
    to do."""
    what = f"could not serve stage {stage} of {model}"
    if isinstance(error, ValueError) and str(error).startswith("model: "):
        return f"{what}: {_unresolved(model, error)}"
    if _out_of_memory(error):
        return (
            f"{what}: it does not fit in the device's memory ({_first_line(error)}); "
            "give it a GPU with more free memory, or set dflow.runtime.offload"
        )
    if warming:
        return (
            f"{what}: it loaded, but its warm-up (one step at the smallest size) "
            f"failed with {_describe(error)}; check that the folder's configs "
            "match its weights"
        )
    if isinstance(error, OSError):
        return (
            f"{what}: its weights could not be read ({_first_line(error)}); the "
            "files may be missing, incomplete or corrupt: copy or build the folder "
            "again"
        )
    return f"{what}: {_describe(error)}"


def _out_of_memory(error: BaseException) -> bool:
    from dflow.errors import StageOutOfMemory

    if isinstance(error, (MemoryError, StageOutOfMemory)):
        return True
    if type(error).__name__ == "OutOfMemoryError":  # torch's, without importing it
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator" in message


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(". ") if lines else type(error).__name__
