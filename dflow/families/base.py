"""What every model family shares: describing configs as a :class:`ModelSpec`,
checking a request's shape, and the shapes and bytes of its tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dflow.errors import InvalidRequest
from dflow.images import InputImage
from dflow.pools import EXPERT_CHAIN, EXPERT_STAGES, STAGES, expert_of
from dflow.spec import ModelSpec

#: Bytes per element of the dtypes stage tensors travel in
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (a torch dtype's name) of a tensor a stage sends on."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_BYTES[self.dtype]

    @property
    def floating(self) -> bool:
        return self.dtype != "int64"


class Family:
    """One model family, known from its configs alone (no weights, no torch).

    A subclass names its diffusers pipelines, maps pipeline components to the
    stages that hold them, reads its geometry from the component configs
    (:meth:`geometry`) and says how its pipeline's tensors look: embeddings as
    ``encode_prompt`` returns them and latents as the pipeline returns them for
    ``output_type="latent"``. Families of two-expert models also say which
    steps each expert runs (:meth:`expert_steps`).
    """

    name: ClassVar[str]
    #: The diffusers pipeline classes (``model_index.json``'s ``_class_name``)
    pipelines: ClassVar[tuple[str, ...]]
    video: ClassVar[bool] = False
    #: The chain of stages a request runs through, in order
    stages: ClassVar[tuple[str, ...]] = STAGES
    #: Which stage holds each pipeline component, or which stages do (a DiT
    #: worker holds both experts, an expert's worker one); others: no stage
    #: needs them
    components: ClassVar[Mapping[str, str | tuple[str, ...]]]
    #: Whether requests bring an input image (image-to-video), which the
    #: encoder stage encodes
    image_input: ClassVar[bool] = False
    #: The DiT's transformer components (what ``quantize`` quantizes)
    transformers: ClassVar[tuple[str, ...]] = ("transformer",)
    #: The tokenizer whose sequence length limits the prompt
    prompt_tokenizer: ClassVar[str] = "tokenizer"
    #: Classifier-free guidance on a negative prompt (else guidance is embedded)
    negative_prompts: ClassVar[bool] = True
    #: Whether the encoder sends attention masks with its embeddings
    attention_masks: ClassVar[bool] = False
    #: Text tokens the encoder pads to, unless a preset says otherwise
    max_sequence_length: ClassVar[int]
    #: Request defaults of the family's diffusers pipeline (presets carry their own)
    defaults: ClassVar[Mapping[str, Any]]
    limits: ClassVar[Mapping[str, Any]] = {
        "max_size": 2048,
        "max_frames": 129,
        "max_steps": 200,
        "max_guidance_scale": 30.0,
    }
    #: Pipeline ``__call__`` arguments dflow always passes
    call_options: ClassVar[Mapping[str, Any]] = {}

    # -- description ------------------------------------------------------------------

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """The spec's shape fields (``vae_scale``, ``vae_scale_temporal``, ``patch``,
        ``latent_channels``, ``text_dim``, ``pooled_dim``) from component configs."""
        raise NotImplementedError

    def describe(
        self,
        *,
        name: str,
        pipeline: str,
        configs: Mapping[str, Mapping[str, Any]],
        source: str | None,
        preset: str | None,
        dtype: str,
        weight_bytes: Mapping[str, int],
        defaults: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> ModelSpec:
        """A :class:`ModelSpec` from the pipeline's component configs (and the
        pipeline's own under ``"_pipeline"``); ``defaults`` and ``limits`` (a
        preset's) override the family's."""
        merged = {**self.defaults, **(defaults or {})}
        length = merged.pop("max_sequence_length", self.max_sequence_length)
        scheduler = configs.get("scheduler", {})
        return ModelSpec(
            name=name,
            family=self.name,
            pipeline=pipeline,
            source=source,
            preset=preset,
            video=self.video,
            dtype=dtype,
            **self.geometry(configs),
            max_sequence_length=length,
            negative_prompts=self.negative_prompts,
            defaults=merged,
            limits={**self.limits, **self.config_limits(configs), **(limits or {})},
            weight_bytes=dict(weight_bytes),
            boundary_ratio=self.boundary_ratio(configs),
            scheduler={k: v for k, v in scheduler.items() if not k.startswith("_")}
            | {"_class_name": scheduler.get("_class_name")},
        )

    def config_limits(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Limits the component configs set below the family's (a preset's
        limits still override them)."""
        return {}

    def boundary_ratio(self, configs: Mapping[str, Mapping[str, Any]]) -> float | None:
        """The timestep fraction where the low-noise expert takes over, for a
        model of two experts (:attr:`ModelSpec.boundary_ratio`); else ``None``."""
        return None

    def stages_of(self, component: str) -> tuple[str, ...]:
        """The stages whose workers hold a pipeline component (none: no stage
        needs it)."""
        stages = self.components.get(component, ())
        return (stages,) if isinstance(stages, str) else tuple(stages)

    def stage_weights(
        self, component_bytes: Mapping[str, int], experts: bool
    ) -> dict[str, int]:
        """Bytes of weights each stage's workers hold, from each component's:
        the chain's stages, and each expert's stage for a model of two experts."""
        stages = (*STAGES, *EXPERT_STAGES.values()) if experts else STAGES
        total = dict.fromkeys(stages, 0)
        for component, nbytes in component_bytes.items():
            for stage in self.stages_of(component):
                if stage in total:
                    total[stage] += nbytes
        return total

    def chains(self, spec: ModelSpec) -> tuple[tuple[str, ...], ...]:
        """The chains of stages a request of ``spec`` can run through, preferred
        first: one DiT stage, or one per expert for a model of two experts
        whose steps per expert :meth:`expert_steps` can tell."""
        if spec.experts and self.expert_steps(spec, 1) is not None:
            return (self.stages, EXPERT_CHAIN)
        return (self.stages,)

    def expert_steps(self, spec: ModelSpec, steps: int) -> dict[str, int] | None:
        """Denoising steps each expert runs in a request of ``steps`` steps
        (``{"high": n, "low": steps - n}``), for a model of two experts; ``None``
        for one DiT, or a scheduler whose timesteps the family cannot tell."""
        return None

    # -- rules --------------------------------------------------------------------------

    def check_inputs(
        self,
        spec: ModelSpec,
        *,
        height: int,
        width: int,
        num_frames: int | None,
        negative_prompt: str = "",
    ) -> None:
        """Reject a shape or prompt the model cannot take, naming the field."""
        if negative_prompt and not self.negative_prompts:
            raise InvalidRequest(
                "negative_prompt",
                f"{self.name} models take no negative prompt (guidance is embedded); "
                "leave it empty",
            )
        multiple, largest = spec.size_multiple, spec.limit("max_size")
        for field, value in (("height", height), ("width", width)):
            if not (multiple <= value <= largest and value % multiple == 0):
                raise InvalidRequest(
                    field,
                    f"{value} is not allowed for {spec.name}: use a multiple of "
                    f"{multiple} from {multiple} to {largest}",
                )
        self.check_frames(spec, num_frames)

    def check_image(self, spec: ModelSpec, image: InputImage | None) -> None:
        """Reject a missing input image where the model needs one, or one the
        model would not use, naming ``image``."""
        if image is None and self.image_input:
            raise InvalidRequest(
                "image",
                f"{spec.name} makes videos from an image: give one (a PIL image, "
                "an HxWx3 uint8 array, or PNG/JPEG bytes)",
            )
        if image is not None and not self.image_input:
            raise InvalidRequest(
                "image", f"{spec.name} takes no input image; leave image unset"
            )

    def check_frames(self, spec: ModelSpec, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise InvalidRequest(
                "num_frames", f"{spec.name} makes images; leave num_frames unset"
            )

    def uses_cfg(self, spec: ModelSpec, guidance_scale: float) -> bool:
        """Whether a request runs classifier-free guidance on a negative prompt:
        only models that take one, and only above guidance 1."""
        return spec.negative_prompts and guidance_scale > 1.0

    # -- tensors ------------------------------------------------------------------------

    def latent_grid(
        self, spec: ModelSpec, height: int, width: int, frames: int
    ) -> tuple[int, int, int]:
        """Latent frames, height and width of a request."""
        latent_frames = (frames - 1) // spec.vae_scale_temporal + 1
        return latent_frames, height // spec.vae_scale, width // spec.vae_scale

    def latent_shape(
        self, spec: ModelSpec, height: int, width: int, frames: int
    ) -> list[int]:
        """Latents of one request as the VAE takes them, without the batch
        dimension: (channels, height, width), or (channels, frames, height,
        width) for video."""
        latent_frames, latent_h, latent_w = self.latent_grid(
            spec, height, width, frames
        )
        if self.video:
            return [spec.latent_channels, latent_frames, latent_h, latent_w]
        return [spec.latent_channels, latent_h, latent_w]

    def latent_dtype(self, dtype: str) -> str:
        """The dtype of the pipeline's latents when its embeddings are ``dtype``."""
        return dtype

    def latents(
        self,
        spec: ModelSpec,
        height: int,
        width: int,
        frames: int = 1,
        dtype: str | None = None,
    ) -> TensorSpec:
        """The latents of one request as the pipeline returns them for
        ``output_type="latent"``, its embeddings in ``dtype`` (default the model's)."""
        shape = (1, *self.latent_shape(spec, height, width, frames))
        return TensorSpec(shape, self.latent_dtype(dtype or spec.dtype))

    def dit_tokens(self, spec: ModelSpec, height: int, width: int, frames: int) -> int:
        """The DiT's sequence length: latent patches."""
        latent_frames, latent_h, latent_w = self.latent_grid(
            spec, height, width, frames
        )
        return latent_frames * (latent_h // spec.patch) * (latent_w // spec.patch)

    def embeddings(
        self,
        spec: ModelSpec,
        cfg: bool,
        dtype: str | None = None,
        *,
        height: int = 0,
        width: int = 0,
        frames: int = 1,
    ) -> dict[str, TensorSpec]:
        """What the encoder sends for one request, by pipeline argument name:
        embeddings of the padded prompt (in ``dtype``, default the model's), the
        attention masks and pooled embeddings of families that have them, and
        the negative prompt's under classifier-free guidance. Families whose
        encoder also encodes an input image add what it makes of it, which
        depends on the request's shape (``height``, ``width``, ``frames``)."""
        dtype = dtype or spec.dtype
        length = spec.max_sequence_length
        tensors = {}
        for prefix in ("", "negative_") if cfg else ("",):
            tensors[f"{prefix}prompt_embeds"] = TensorSpec(
                (1, length, spec.text_dim), dtype
            )
            if self.attention_masks:
                tensors[f"{prefix}prompt_attention_mask"] = TensorSpec(
                    (1, length), "int64"
                )
        if spec.pooled_dim:
            tensors["pooled_prompt_embeds"] = TensorSpec((1, spec.pooled_dim), dtype)
        return tensors

    def features(
        self,
        spec: ModelSpec,
        *,
        height: int,
        width: int,
        frames: int,
        steps: int,
        cfg: bool,
    ) -> dict[str, Any]:
        """What the scheduler, predictor and planner price a request by.

        ``embedding_bytes`` counts the floating-point embeddings (masks are
        small); ``latent_bytes`` the latents at the model's dtype; ``image``
        says whether the encoder also encodes an input image; two-expert models
        add the steps each expert runs (``high_steps``, ``low_steps``).
        """
        latent_shape = self.latent_shape(spec, height, width, frames)
        embeddings = self.embeddings(
            spec, cfg, height=height, width=width, frames=frames
        )
        features = {
            "family": self.name,
            "height": height,
            "width": width,
            "frames": frames,
            "steps": steps,
            "cfg": cfg,
            "image": self.image_input,
            "latent_shape": latent_shape,
            "dit_tokens": self.dit_tokens(spec, height, width, frames),
            "embedding_bytes": sum(t.nbytes for t in embeddings.values() if t.floating),
            "latent_bytes": self.latents(spec, height, width, frames).nbytes,
            "output_bytes": height * width * 3 * frames,
        }
        split = self.expert_steps(spec, steps)
        if split is not None:
            features.update({f"{expert}_steps": n for expert, n in split.items()})
        return features

    def default_features(self, spec: ModelSpec) -> dict[str, Any]:
        """The features of the model's default request."""
        defaults = spec.defaults
        return self.features(
            spec,
            height=defaults["height"],
            width=defaults["width"],
            frames=defaults.get("num_frames", 1) if self.video else 1,
            steps=defaults["steps"],
            cfg=self.uses_cfg(spec, defaults["guidance_scale"]),
        )


def priced_as(stage: str, features: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The stage whose costs price a call of ``stage``, and the features to
    price it with: an expert's stage costs what the DiT stage costs for that
    expert's share of the steps."""
    expert = expert_of(stage)
    if expert is None:
        return stage, features
    return "dit", {**features, "steps": features[f"{expert}_steps"]}
