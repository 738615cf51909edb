"""Encoding outputs for HTTP: images as PNG, JPEG or WebP, videos as MP4 (PyAV).

These run as Dask tasks after a request's output task, so they run where the
output is (the VAE worker) and only the encoded bytes travel: a video's raw
frames (81 x 480 x 832 x 3 bytes = 97 MB) never leave the worker. No web
framework here: workers import this module.
"""

from __future__ import annotations

import io
from typing import Any

import av
import numpy as np
from PIL import Image

from dflow.output import Output

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(output: Output, fmt: str, quality: int | None = None) -> bytes:
    """The output's (first) image as ``fmt`` bytes; ``quality`` for JPEG and WebP."""
    (image, *_) = output.images or []
    return image_bytes(image, fmt, quality)


def image_bytes(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    options: dict[str, Any] = {}
    if quality is not None and fmt != "png":
        options["quality"] = quality
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=IMAGE_FORMATS[fmt], **options)
    return buffer.getvalue()


def encode_video(output: Output, fps: int) -> dict[str, Any]:
    """The output's frames as an H.264 MP4, its first frame as a PNG thumbnail,
    and the frame count: ``{"video", "thumbnail", "frames"}``."""
    frames = output.frames
    assert frames is not None, "not a video output"
    return {
        "video": mp4(frames, fps),
        "thumbnail": image_bytes(Image.fromarray(frames[0]), "png"),
        "frames": len(frames),
    }


def mp4(frames: np.ndarray, fps: int) -> bytes:
    """uint8 frames ``(n, height, width, 3)`` as an H.264 MP4 (yuv420p, which
    players expect; dflow's sizes are even)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            packets = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            container.mux(packets)
        container.mux(stream.encode())
    return buffer.getvalue()
