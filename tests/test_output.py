"""Output: images and video frames in every output format, and save()."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dflow.output import Output
from dflow.request import Request

TIMINGS = {"encode": 0.1, "denoise": 0.5, "decode": 0.2, "decode_batch": 1}


def image_pixels(count: int = 1, height: int = 64, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def video_pixels(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth moving gradient: what a GIF's 256-colour palette keeps well."""
    y, x = np.mgrid[0:height, 0:width]
    video = [
        np.stack([(x * 5 + 20 * t) % 256, y * 7, np.full_like(x, 25 * t)], axis=-1)
        for t in range(frames)
    ]
    return np.stack(video).astype(np.uint8)


def image_request(output_format: str) -> Request:
    return Request(
        model="tiny-flux",
        prompt="a cat",
        height=64,
        width=96,
        output_format=output_format,
    )


def video_request(output_format: str, frames: int = 9) -> Request:
    return Request(
        model="tiny-wan",
        prompt="a cat",
        height=32,
        width=48,
        num_frames=frames,
        output_format=output_format,
    )


@pytest.mark.parametrize("output_format", ["pil", "png"])
def test_images(output_format):
    pixels = image_pixels()
    output = Output.from_pixels(image_request(output_format), pixels, dict(TIMINGS))
    assert output.timings == TIMINGS
    assert output.frames is None
    if output_format == "png":
        assert output.array is None
        assert [data[:8] for data in output.encoded] == [b"\x89PNG\r\n\x1a\n"]
    else:
        assert output.encoded is None
    (image,) = output.images
    assert isinstance(image, Image.Image)
    assert image.size == (96, 64)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels[0])


def test_png_and_pil_images_are_equal():
    pixels = image_pixels(count=2)
    pil = Output.from_pixels(image_request("pil"), pixels, {})
    png = Output.from_pixels(image_request("png"), pixels, {})
    assert len(pil.images) == len(png.images) == 2
    for a, b in zip(pil.images, png.images):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.convert("RGB")))


@pytest.mark.parametrize("output_format", ["np", "gif"])
def test_video(output_format):
    pixels = video_pixels()
    output = Output.from_pixels(video_request(output_format), pixels, dict(TIMINGS))
    assert output.images is None
    assert output.timings == TIMINGS
    frames = output.frames
    assert frames.shape == (9, 32, 48, 3)
    assert frames.dtype == np.uint8
    if output_format == "np":
        assert output.encoded is None
        np.testing.assert_array_equal(frames, pixels)
    else:
        assert output.array is None
        assert output.encoded[0][:6] == b"GIF89a"
        # a palette of 256 colours: lossy, but close
        error = np.abs(frames.astype(np.int16) - pixels.astype(np.int16))
        assert error.mean() < 8
        assert error.max() < 64


@pytest.mark.parametrize(
    "frames, still",
    [
        pytest.param(9, slice(0, 4), id="still-start"),
        pytest.param(9, slice(3, 9), id="still-end"),
        pytest.param(33, slice(0, 33), id="all-still"),
    ],
)
def test_gif_keeps_repeated_frames(frames, still):
    """A still stretch of video still has one frame per requested frame."""
    pixels = video_pixels(frames=frames)
    pixels[still] = pixels[still.start]
    output = Output.from_pixels(video_request("gif", frames), pixels, {})
    assert output.frames.shape == (frames, 32, 48, 3)
    decoded = output.frames
    for index in range(still.start, still.stop):
        np.testing.assert_array_equal(decoded[index], decoded[still.start])
    error = np.abs(decoded.astype(np.int16) - pixels.astype(np.int16))
    assert error.mean() < 8


def test_save_images(tmp_path):
    pixels = image_pixels(count=1)
    for output_format in ("pil", "png"):
        output = Output.from_pixels(image_request(output_format), pixels, {})
        (path,) = output.save(tmp_path / output_format / "cat")
        assert path == tmp_path / output_format / "cat.png"
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels[0])


def test_save_several_images(tmp_path):
    pixels = image_pixels(count=3)
    output = Output.from_pixels(image_request("pil"), pixels, {})
    paths = output.save(tmp_path / "cats.png")
    assert paths == [tmp_path / f"cats-{i}.png" for i in range(3)]
    for path, expected in zip(paths, pixels):
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected)


@pytest.mark.parametrize("output_format", ["np", "gif"])
def test_save_video(tmp_path, output_format):
    pixels = video_pixels()
    output = Output.from_pixels(video_request(output_format), pixels, {})
    (path,) = output.save(tmp_path / "clip")
    assert path == tmp_path / "clip.gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 9
        assert gif.size == (48, 32)
    if output_format == "gif":
        assert path.read_bytes() == output.encoded[0]
