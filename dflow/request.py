"""The request: the single place where bad input is rejected."""

from __future__ import annotations

import math
import numbers
import os
import secrets
import threading
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from dflow import spec as specs
from dflow.errors import InvalidRequest
from dflow.spec import ModelSpec

#: Output formats per kind of model; the first is the default.
OUTPUT_FORMATS = {False: ("pil", "png"), True: ("np", "gif")}
MAX_SEED = 2**64 - 1
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Request:
    """One generation request, validated on construction.

    Fields left as ``None`` take the model's defaults. The model is a preset name
    (``"tiny-flux"``), a diffusers folder, a Hugging Face id in the local cache,
    or a model served by the connected dflow cluster.

    Parameters
    ----------
    model
        Which model generates.
    prompt, negative_prompt
        Text; the prompt must be non-empty and fit the text encoder's sequence
        length. Negative prompts apply to models with classifier-free guidance
        (PixArt, Wan) when ``guidance_scale > 1``.
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

    def __post_init__(self) -> None:
        try:
            spec = specs.resolve(self.model)
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
        if self.negative_prompt and not spec.negative_prompts:
            raise InvalidRequest(
                "negative_prompt",
                f"{spec.family} models take no negative prompt (guidance is embedded); "
                "leave it empty",
            )
        multiple, largest = spec.size_multiple, spec.limit("max_size")
        for name in ("height", "width"):
            value = _integer(name, getattr(self, name))
            if not (multiple <= value <= largest and value % multiple == 0):
                raise InvalidRequest(
                    name,
                    f"{value} is not allowed for {spec.name}: use a multiple of "
                    f"{multiple} from {multiple} to {largest}",
                )
            set_(self, name, value)
        self._validate_frames(spec)
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
        self._validate_prompt_length(spec)

    def _validate_frames(self, spec: ModelSpec) -> None:
        if not spec.video:
            frames = self.num_frames
            if frames is not None and _integer("num_frames", frames) != 1:
                raise InvalidRequest(
                    "num_frames", f"{spec.name} makes images; leave num_frames unset"
                )
            return
        frames = _integer("num_frames", self.num_frames)
        step, largest = spec.vae_scale_temporal, spec.limit("max_frames")
        if not (1 <= frames <= largest and (frames - 1) % step == 0):
            raise InvalidRequest(
                "num_frames",
                f"{frames} is not allowed for {spec.name}: use {step}k + 1 frames "
                f"from 1 to {largest}",
            )
        object.__setattr__(self, "num_frames", frames)

    def _validate_prompt_length(self, spec: ModelSpec) -> None:
        tokenizer = prompt_tokenizer(spec)
        if tokenizer is None:
            return  # the model's folder is not here; the encoder worker checks
        for name in ("prompt", "negative_prompt"):
            count = len(tokenizer(getattr(self, name)).input_ids)
            if count > spec.max_sequence_length:
                raise InvalidRequest(
                    name,
                    f"{count} tokens is over the limit of {spec.max_sequence_length} "
                    f"tokens of {spec.name}'s text encoder",
                )

    @property
    def spec(self) -> ModelSpec:
        return specs.resolve(self.model)

    @cached_property
    def features(self) -> dict[str, Any]:
        """What the scheduler, predictor and planner price a request by."""
        spec = self.spec
        height, width, guidance = self.height, self.width, self.guidance_scale
        # __post_init__ filled every field the model needs
        assert height is not None and width is not None and guidance is not None
        cfg = spec.negative_prompts and guidance > 1.0
        latent_h = height // spec.vae_scale
        latent_w = width // spec.vae_scale
        frames = self.num_frames or 1
        latent_frames = (frames - 1) // spec.vae_scale_temporal + 1
        if spec.video:
            latent_shape = [spec.latent_channels, latent_frames, latent_h, latent_w]
        else:
            latent_shape = [spec.latent_channels, latent_h, latent_w]
        element = ELEMENT_BYTES.get(spec.dtype, 4)
        embedding_bytes = (
            spec.max_sequence_length * spec.text_dim + spec.pooled_dim
        ) * element
        # Wan keeps latents in float32; the image pipelines in the embeddings' dtype
        latent_element = 4 if spec.video else element
        return {
            "family": spec.family,
            "height": height,
            "width": width,
            "frames": frames,
            "steps": self.steps,
            "cfg": cfg,
            "latent_shape": latent_shape,
            "dit_tokens": latent_frames
            * (latent_h // spec.patch)
            * (latent_w // spec.patch),
            "embedding_bytes": embedding_bytes * (2 if cfg else 1),
            "latent_bytes": math.prod(latent_shape) * latent_element,
            "output_bytes": height * width * 3 * frames,
        }

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed, validated again."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Request(**values)


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


_tokenizers: dict[str, Any] = {}
_tokenizers_lock = threading.Lock()


def prompt_tokenizer(spec: ModelSpec) -> Any | None:
    """The tokenizer whose limit the prompt must fit, if it is available here."""
    from dflow import presets
    from dflow.adapters import adapter_for

    component = adapter_for(spec.pipeline).prompt_tokenizer
    with _tokenizers_lock:
        if spec.name not in _tokenizers:
            tokenizer = None
            if spec.source is not None and os.path.isdir(spec.source):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    spec.source, subfolder=component
                )
            elif spec.preset is not None:
                entry = presets.get(spec.preset)["components"][component]
                tokenizer = presets.build_component(entry)
            _tokenizers[spec.name] = tokenizer
        return _tokenizers[spec.name]
