"""Input images of image-to-video requests: checked once, sent only where needed.

An :class:`InputImage` holds the RGB pixels a request's image decodes to, with
its size and a digest of the pixels. Requests compare and hash images by that
digest, so a request whose image was left behind (:meth:`InputImage.reference`:
size and digest, no pixels) equals the one that carries it: stage tasks that do
not encode the image get the reference, and only the encoder gets the pixels.
Torch-free.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from dflow.errors import InvalidRequest

#: Largest height and width of an input image, in pixels
MAX_SIDE = 4096
#: Encoded images a request may bring as bytes (PIL format names)
FORMATS = ("PNG", "JPEG")
ACCEPTED = "a PIL image, an HxWx3 uint8 array, or PNG/JPEG bytes"


@dataclass(frozen=True, eq=False)
class InputImage:
    """The RGB pixels of a request's input image, or a reference to them.

    Build one with :meth:`of`; equal and hashed by size and pixel digest.
    """

    height: int
    width: int
    digest: str
    #: Row-major RGB bytes (``height * width * 3``); ``None`` in a reference
    pixels: bytes | None = None

    @classmethod
    def of(cls, value: Any) -> InputImage:
        """The image ``value`` holds: a PIL image in mode RGB, an ``(H, W, 3)``
        uint8 array, or PNG/JPEG bytes (decoded as ``diffusers.utils.load_image``
        decodes a file: EXIF orientation applied, converted to RGB). Raises
        :class:`~dflow.errors.InvalidRequest` naming ``image``."""
        if isinstance(value, InputImage):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            array = _decode(bytes(value))
        elif isinstance(value, np.ndarray):
            array = _checked_array(value)
        elif _is_pil(value):
            if value.mode != "RGB":
                raise InvalidRequest(
                    "image",
                    f"mode {value.mode!r} is not supported: give an RGB image "
                    "(PIL: image.convert('RGB'))",
                )
            _check_size(value.height, value.width)
            array = np.asarray(value)
        else:
            raise InvalidRequest(
                "image", f"expected {ACCEPTED}, got {type(value).__name__}"
            )
        pixels = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
        height, width = array.shape[:2]
        digest = hashlib.sha256(f"{height}x{width}:".encode() + pixels).hexdigest()
        return cls(height, width, digest, pixels)

    def reference(self) -> InputImage:
        """This image without its pixels: what stages that do not encode it see."""
        return InputImage(self.height, self.width, self.digest)

    def array(self) -> np.ndarray:
        """The pixels, ``(height, width, 3)`` uint8 (read-only)."""
        if self.pixels is None:
            raise ValueError(
                "image: this is a reference to the request's image, without its "
                "pixels: only the stage that encodes the image gets them (an "
                "output's request holds the reference; use the request you "
                "submitted)"
            )
        array = np.frombuffer(self.pixels, dtype=np.uint8)
        return array.reshape(self.height, self.width, 3)

    def pil(self) -> Any:
        """The pixels as a PIL image in mode RGB, as a stock pipeline takes them."""
        from PIL import Image

        return Image.fromarray(self.array(), mode="RGB")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InputImage):
            return NotImplemented
        return (self.height, self.width, self.digest) == (
            other.height,
            other.width,
            other.digest,
        )

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        held = "pixels" if self.pixels is not None else "reference"
        return f"InputImage({self.height}x{self.width}, {self.digest[:12]}, {held})"


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _check_size(height: int, width: int) -> None:
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise InvalidRequest(
            "image",
            f"{height}x{width} pixels is not allowed: use 1 to {MAX_SIDE} pixels a "
            "side (the image is resized to the request's height and width)",
        )


def _checked_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidRequest(
            "image",
            f"an array must be HxWx3 uint8 RGB, got shape {array.shape} of "
            f"{array.dtype}",
        )
    _check_size(array.shape[0], array.shape[1])
    return array


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in FORMATS:
                raise InvalidRequest(
                    "image",
                    f"{opened.format} bytes are not supported: give "
                    f"{' or '.join(FORMATS)} bytes",
                )
            # the header's size, checked before the pixels are decoded
            _check_size(opened.height, opened.width)
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InvalidRequest(
            "image", f"the bytes are not a readable PNG or JPEG image ({error})"
        ) from None
    return np.asarray(image)
