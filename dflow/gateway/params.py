"""Request bodies: OpenAI's fields (plus the extensions peers use) checked for
type, then turned into :class:`dflow.Request` fields, which dflow validates; a
bad value comes back as a 400 naming the field by its OpenAI name."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dflow.errors import InvalidRequest
from dflow.gateway.errors import APIError, bad_request, not_found
from dflow.request import Request

#: Seeds are taken modulo this (a request's seed is 0 to 2**64 - 1)
SEEDS = 2**64
#: dflow's field names that differ from the HTTP API's
PARAMS = {
    "steps": "num_inference_steps",
    "height": "size",
    "width": "size",
    "image": "input_reference",
}


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    return value


Integer = Annotated[int, BeforeValidator(_no_bool)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT")
    negative_prompt: str = ""
    seed: Integer | None = None
    num_inference_steps: Integer | None = None
    guidance_scale: float | None = None


class ImageGeneration(_Body):
    """``POST /v1/images/generations``."""

    n: Integer = Field(1, ge=1, le=10)
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Integer | None = Field(None, ge=0, le=100)
    user: str | None = None


class VideoGeneration(_Body):
    """``POST /v1/videos`` (``input_reference`` is read apart: it may be a file)."""

    seconds: float | None = Field(None, gt=0)
    num_frames: Integer | None = None


Body = TypeVar("Body", bound=_Body)


def parse(model: type[Body], data: Any) -> Body:
    """``data`` as ``model``; else a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise bad_request(None, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown parameter"
        elif first["type"] == "missing":
            message = "required"
        raise bad_request(param, f"{param}: {message}") from None


def request_fields(body: _Body, fps: int) -> dict[str, Any]:
    """The :class:`dflow.Request` fields a body asks for (model aside)."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
    }
    if body.size is not None:
        fields["width"], fields["height"] = parse_size(body.size)
    if isinstance(body, VideoGeneration):
        if body.seconds is not None and body.num_frames is not None:
            raise bad_request(
                "seconds", "seconds: give seconds or num_frames, not both"
            )
        if body.seconds is not None:
            fields["num_frames"] = round(body.seconds * fps) + 1
        else:
            fields["num_frames"] = body.num_frames
    return fields


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` as ``(width, height)``."""
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise bad_request("size", f"size: {size!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(width), int(height)


def invalid(error: InvalidRequest, body: _Body) -> APIError:
    """dflow's refusal of a field, in the HTTP API's names."""
    field = error.field
    message = str(error).removeprefix(f"{field}: ")
    param = PARAMS.get(field, field)
    if field == "num_frames" and getattr(body, "seconds", None) is not None:
        param = "seconds"
    if field == "model":
        return not_found(f"model: {message}", param="model", code="model_not_found")
    if param != field:
        message = f"{field} {message}"
    return bad_request(param, f"{param}: {message}")


def build(
    model: str, fields: dict[str, Any], body: _Body, n: int = 1, **extra: Any
) -> list[Request]:
    """``n`` validated :class:`dflow.Request` objects, seeds ``seed``,
    ``seed + 1``, ... (random ones without a seed); else the 400 (404 for the
    model)."""
    try:
        first = Request(model=model, **fields, **extra)
        if fields.get("seed") is None:
            return [first] + [first.replace(seed=None) for _ in range(n - 1)]
        assert first.seed is not None
        return [first] + [
            first.replace(seed=(first.seed + i) % SEEDS) for i in range(1, n)
        ]
    except InvalidRequest as error:
        raise invalid(error, body) from None


def input_image(value: Any) -> Image.Image:
    """``input_reference`` as an image: the bytes of an upload, or a
    ``data:`` URL (as a string or ``{"image_url": ...}``). Nothing is fetched:
    other URLs and file ids are refused."""
    if isinstance(value, dict):
        if "file_id" in value:
            raise bad_request(
                "input_reference", "input_reference: file ids are not supported"
            )
        value = value.get("image_url")
    if isinstance(value, str):
        value = _data_url(value)
    if not isinstance(value, bytes):
        raise bad_request(
            "input_reference",
            "input_reference: expected an uploaded image or a data: URL",
        )
    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise bad_request(
            "input_reference", "input_reference: not an image PIL can read"
        ) from None
    return image.convert("RGB")


def _data_url(url: str) -> bytes:
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise bad_request(
            "input_reference",
            "input_reference: only an upload or a base64 data: URL; the server "
            "fetches no URL",
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            "input_reference", "input_reference: the data: URL is not base64"
        ) from None
