"""Reading image files and matching an image's channels to what the vision tower takes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import VlmpruneError


def read_image(path: str | Path, origin: str = "") -> Any:
    """A PIL image, fully read; a clear error (naming `origin`, e.g. the dataset row) when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    where = f"{origin}: " if origin else ""
    path = Path(path)
    if not path.is_file():
        raise VlmpruneError(f"{where}image file {str(path)!r} does not exist; pass the path of a PNG/JPEG image")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VlmpruneError(f"{where}cannot read image {str(path)!r}: {err}") from err


_noticed: set[str] = set()


def _notice(text: str) -> None:
    if text not in _noticed:
        _noticed.add(text)
        print(f"vlmprune: notice: {text}", file=sys.stderr)


def conform_image(image: Any, channels: int, origin: str = "") -> Any:
    """`image` as a PIL image in the mode a `channels`-channel tower takes (``L`` for 1, ``RGB`` for 3).

    Lossless conversions happen silently (grey to RGB, a palette image, an opaque alpha channel);
    RGB to grey for a 1-channel tower happens with a one-time notice; anything else is refused."""
    from PIL import Image
    import numpy as np

    where = f"{origin}: " if origin else ""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise VlmpruneError(f"{where}an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise VlmpruneError(f"{where}expected an image, got {type(image).__name__}")
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise VlmpruneError(f"{where}the image has transparent pixels; flatten it onto a background (e.g. save it as RGB JPEG) first")
        image = image.convert("RGB" if mode == "RGBA" else "L")
        mode = image.mode
    if mode not in ("L", "RGB"):
        raise VlmpruneError(f"{where}image mode {mode!r} is not supported; save the image as 8-bit RGB or greyscale")
    if channels == 3:
        return image if mode == "RGB" else image.convert("RGB")
    if channels == 1:
        if mode == "RGB":
            _notice("converting RGB images to greyscale (L) for this model's 1-channel vision tower")
            return image.convert("L")
        return image
    raise VlmpruneError(f"{where}the vision tower takes {channels}-channel images; vlmprune converts to 1 or 3 channels only")
