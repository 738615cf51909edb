"""What a request returns: images or video frames, and where the time went."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from dflow.request import Request

GIF_FRAME_MS = 1000 // 16


@dataclass
class Output:
    """The result of one request.

    Exactly one of ``array`` (raw uint8 pixels) and ``encoded`` (PNG or GIF bytes)
    is set, following the request's ``output_format``; ``images`` and ``frames``
    read either.

    Attributes
    ----------
    request
        The request this answers (equal to the one submitted; an input image
        by reference, without its pixels, when the request was disaggregated).
    timings
        Seconds per stage (``encode``, ``denoise``, ``decode``; ``generate`` for
        a monolithic call; ``denoise_high`` and ``denoise_low`` for the experts
        of a two-expert model in pools of their own) measured on the worker
        that ran it, plus ``"<stage>_batch"``: how many requests shared that
        call.
    """

    request: Request
    array: np.ndarray | None = None
    encoded: list[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_pixels(
        cls, request: Request, pixels: np.ndarray, timings: dict[str, float]
    ) -> Output:
        """Package uint8 pixels as the request's output format asks."""
        if request.output_format == "png":
            encoded = [_encode(Image.fromarray(image), "PNG") for image in pixels]
            return cls(request, encoded=encoded, timings=timings)
        if request.output_format == "gif":
            frames = [Image.fromarray(frame) for frame in pixels]
            gif = _encode(
                frames[0],
                "GIF",
                save_all=True,
                append_images=frames[1:],
                duration=GIF_FRAME_MS,
                loop=0,
            )
            return cls(request, encoded=[gif], timings=timings)
        return cls(request, array=pixels, timings=timings)

    @property
    def images(self) -> list[Image.Image] | None:
        """PIL images, for image models."""
        if self.request.spec.video:
            return None
        if self.encoded is not None:
            return [Image.open(io.BytesIO(data)) for data in self.encoded]
        assert self.array is not None
        return [Image.fromarray(image) for image in self.array]

    @property
    def frames(self) -> np.ndarray | None:
        """uint8 array (frames, height, width, 3), for video models."""
        if not self.request.spec.video:
            return None
        if self.encoded is not None:
            gif = Image.open(io.BytesIO(self.encoded[0]))
            frames = []
            for index in range(getattr(gif, "n_frames", 1)):
                gif.seek(index)
                # the GIF writer merges repeated frames into one that lasts longer
                repeat = round(gif.info.get("duration", GIF_FRAME_MS) / GIF_FRAME_MS)
                frames += [np.asarray(gif.convert("RGB"))] * max(repeat, 1)
            return np.stack(frames)
        return self.array

    def save(self, path: str | Path) -> list[Path]:
        """Write the output: ``path.png`` per image (``path-<i>.png`` if several),
        ``path.gif`` for a video. Returns the files written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.request.spec.video:
            target = path.with_suffix(".gif")
            if self.encoded is not None:
                target.write_bytes(self.encoded[0])
            else:
                frames = [Image.fromarray(f) for f in self.frames]  # type: ignore[union-attr]
                frames[0].save(
                    target,
                    save_all=True,
                    append_images=frames[1:],
                    duration=GIF_FRAME_MS,
                    loop=0,
                )
            return [target]
        images = self.images or []
        if len(images) == 1:
            targets = [path.with_suffix(".png")]
        else:
            targets = [
                path.with_name(f"{path.stem}-{i}.png") for i in range(len(images))
            ]
        for image, target in zip(images, targets):
            image.save(target)
        return targets


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
