"""The request: the single place where bad input is rejected.

A :class:`Request` is a pure value: constructing one validates it against its
model's spec (:mod:`dflow.catalog`) and family (:mod:`dflow.families`) with no
I/O. The prompt's token limit needs the model's tokenizer, so
:mod:`dflow.prompts` checks it at submit time and on the encoder worker.
"""

from __future__ import annotations

import copy
import math
import numbers
import secrets
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from dflow import catalog, families
from dflow.errors import InvalidRequest
from dflow.images import InputImage
from dflow.spec import ModelSpec

#: Output formats per kind of model; the first is the default.
OUTPUT_FORMATS = {False: ("pil", "png"), True: ("np", "gif")}
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Request:
    """One generation request, validated on construction.

    Fields left as ``None`` take the model's defaults. The model is a preset name
    (``"tiny-flux"``), a diffusers folder, a Hugging Face id in the local cache,
    or a model a dflow cluster serves once ``dflow.models(client)`` made it
    known in this process.

    Parameters
    ----------
    model
        Which model generates.
    prompt, negative_prompt
        Text; the prompt must be non-empty and fit the text encoder's sequence
        length (checked at submit time and by the encoder). Negative prompts
        apply to models with classifier-free guidance (PixArt, Wan) when
        ``guidance_scale > 1``.
    height, width
        Pixels; multiples of the VAE's downsampling times the DiT's patch size.
    num_frames
        Video models only: ``4k + 1`` frames (the Wan VAE's temporal compression).
    steps
        Denoising steps.
    guidance_scale
        Classifier-free guidance (PixArt, Wan) or embedded guidance (Flux).
    seed
        Seed of the initial noise: the same noise as a stock diffusers pipeline
        given ``torch.Generator("cpu").manual_seed(seed)``. Random when ``None``.
    output_format
        ``"pil"`` or ``"png"`` for images, ``"np"`` or ``"gif"`` for video: what
        the VAE worker sends back (raw pixels or encoded bytes).
    image
        Image-to-video models only, and required there: the first frame, as a
        PIL image in mode RGB, an ``(H, W, 3)`` uint8 array, or PNG/JPEG bytes
        (decoded here, EXIF orientation applied). Any size up to 4096 pixels a
        side: the encoder resizes it to ``height`` x ``width`` as the stock
        pipeline does (aspect not kept). Held as a
        :class:`~dflow.images.InputImage`; only the encoder stage receives its
        pixels.

    Examples
    --------
    >>> Request(model="tiny-flux", prompt="a red bicycle", seed=0)  # doctest: +SKIP
    """

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
    image: Any = None

    def __post_init__(self) -> None:
        try:
            spec = catalog.resolve(self.model)
        except ValueError as error:
            # resolve() only says "model: ..."; callers also read the field by name
            raise InvalidRequest("model", str(error).removeprefix("model: ")) from error
        set_ = object.__setattr__
        set_(self, "model", spec.name)
        for name in ("height", "width", "steps", "guidance_scale"):
            if getattr(self, name) is None:
                set_(self, name, spec.defaults[name])
        if spec.video and self.num_frames is None:
            set_(self, "num_frames", spec.defaults["num_frames"])
        if self.seed is None:
            set_(self, "seed", secrets.randbits(63))
        if self.output_format is None:
            set_(self, "output_format", OUTPUT_FORMATS[spec.video][0])
        self._validate(spec)

    def _validate(self, spec: ModelSpec) -> None:
        set_ = object.__setattr__
        set_(self, "prompt", _text("prompt", self.prompt, allow_empty=False))
        set_(self, "negative_prompt", _text("negative_prompt", self.negative_prompt))
        height, width = _integer("height", self.height), _integer("width", self.width)
        frames = self.num_frames
        if frames is not None:
            frames = _integer("num_frames", frames)
        family = families.of(spec)
        family.check_inputs(
            spec,
            height=height,
            width=width,
            num_frames=frames,
            negative_prompt=self.negative_prompt,
        )
        image = None if self.image is None else InputImage.of(self.image)
        family.check_image(spec, image)
        set_(self, "image", image)
        set_(self, "height", height)
        set_(self, "width", width)
        set_(self, "num_frames", frames)
        steps = _integer("steps", self.steps)
        if not 1 <= steps <= spec.limit("max_steps"):
            raise InvalidRequest(
                "steps", f"{steps} is out of range: use 1 to {spec.limit('max_steps')}"
            )
        set_(self, "steps", steps)
        guidance = _real("guidance_scale", self.guidance_scale)
        if not 0.0 <= guidance <= spec.limit("max_guidance_scale"):
            raise InvalidRequest(
                "guidance_scale",
                f"{guidance} is out of range: use a finite value from 0 to "
                f"{spec.limit('max_guidance_scale')}",
            )
        set_(self, "guidance_scale", guidance)
        seed = _integer("seed", self.seed)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequest("seed", f"{seed} is out of range: use 0 to 2**64 - 1")
        set_(self, "seed", seed)
        allowed = OUTPUT_FORMATS[spec.video]
        if self.output_format not in allowed:
            raise InvalidRequest(
                "output_format",
                f"{self.output_format!r} is not one of {', '.join(allowed)}",
            )

    @property
    def spec(self) -> ModelSpec:
        return catalog.resolve(self.model)

    @cached_property
    def features(self) -> dict[str, Any]:
        """What the scheduler, predictor and planner price a request by
        (:meth:`dflow.families.Family.features`)."""
        spec = self.spec
        family = families.of(spec)
        height, width, guidance = self.height, self.width, self.guidance_scale
        # __post_init__ filled every field the model needs
        assert height is not None and width is not None and guidance is not None
        assert self.steps is not None
        return family.features(
            spec,
            height=height,
            width=width,
            frames=self.num_frames or 1,
            steps=self.steps,
            cfg=family.uses_cfg(spec, guidance),
        )

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed, validated again."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Request(**values)

    def with_pixels(self, image: InputImage) -> Request:
        """This request with its input image's pixels put back (an equal
        request, not validated again): what the encode task runs. Raises
        ``ValueError`` for pixels of another image."""
        if image != self.image or image.pixels is None:
            raise InvalidRequest("image", "the pixels are not this request's image")
        full = copy.copy(self)
        object.__setattr__(full, "image", image)
        return full

    def without_pixels(self) -> Request:
        """This request with its input image's pixels left out (an equal
        request, not validated again): what the stage tasks that do not encode
        the image get."""
        if self.image is None or self.image.pixels is None:
            return self
        light = copy.copy(self)
        object.__setattr__(light, "image", self.image.reference())
        return light


def _text(field: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRequest(field, "must not be empty")
    return value


def _integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequest(field, f"expected an integer, got {value!r}")
    return int(value)


def _real(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(field, f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(field, f"must be finite, got {value}")
    return value
