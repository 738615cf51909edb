"""The prompt's token limit, checked where the model's tokenizer is at hand.

A :class:`~dflow.request.Request` cannot count tokens (constructing one loads
nothing), so the limit is checked at submit time on the client when the model's
tokenizer is available there (a preset's, or a local folder's), and always on
the encoder worker before encoding.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from dflow import families, presets
from dflow.errors import InvalidRequest
from dflow.request import Request
from dflow.spec import ModelSpec

#: Tokenizers by the model's name and where it comes from
_tokenizers: dict[tuple[str, str | None, str | None], Any] = {}
_lock = threading.Lock()


def tokenizer(spec: ModelSpec) -> Any | None:
    """The tokenizer whose limit the prompt must fit, loaded once per model;
    ``None`` when this process has neither the model's folder nor its preset."""
    key = (spec.name, spec.source, spec.preset)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = _load(spec)
        return _tokenizers[key]


def _load(spec: ModelSpec) -> Any | None:
    component = families.of(spec).prompt_tokenizer
    if spec.source is not None and os.path.isdir(spec.source):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec.source, subfolder=component)
    if spec.preset is not None and spec.preset in presets.names():
        entry = presets.get(spec.preset)["components"][component]
        return presets.build_component(entry)
    return None


def check_length(request: Request) -> None:
    """Raise :class:`~dflow.errors.InvalidRequest` naming ``prompt`` or
    ``negative_prompt`` if it has more tokens than the model's text encoder
    takes; a no-op where the tokenizer is not available."""
    spec = request.spec
    counter = tokenizer(spec)
    if counter is None:
        return
    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if not isinstance(text, str):
            continue  # a tampered request: its validation names the field
        count = len(counter(text).input_ids)
        if count > spec.max_sequence_length:
            raise InvalidRequest(
                field,
                f"{count} tokens is over the limit of {spec.max_sequence_length} "
                f"tokens of {spec.name}'s text encoder",
            )


def encoding_fields(request: Request) -> tuple[Any, ...]:
    """What a request's encodings depend on: the model, the prompts, whether
    guidance encodes the negative prompt and, for image-to-video, the input
    image and the output's shape (its condition is encoded with them). Requests
    with equal fields share one encode task (:func:`dflow.client.encoding_key`)
    and an encoder worker's cached encoding."""
    image = request.image
    return (
        request.model,
        request.prompt,
        request.negative_prompt,
        request.features["cfg"],
        None
        if image is None
        else (image.digest, request.height, request.width, request.num_frames),
    )
