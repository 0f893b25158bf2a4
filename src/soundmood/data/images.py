"""Decode and resize face images. Training, evaluation and serving share these functions,
so a face is turned into model input the same way everywhere.

Every image is untrusted input: the header's declared size is checked before any pixel is decoded
(decompression bombs are refused unread), and whatever goes wrong while decoding becomes an
ImageError naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Ceiling for every caller (serving included); data checks pass data.limits.max_image_pixels.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image could not be decoded; the message names it and says why."""


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file or encoded bytes, honouring EXIF orientation."""
    return open_bounded(source, MAX_PIXELS, name)


def open_bounded(
    source: str | Path | bytes, max_pixels: int, name: str | None = None
) -> Image.Image:
    """open_image with an explicit bound on the pixel count the header may declare."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(
                    f"{label}: declares {img.width}x{img.height} pixels, over the limit of "
                    f"{max_pixels} (refused without decoding)"
                )
            img.load()
            return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own, larger bound, hit while opening
        raise ImageError(
            f"{label}: declared size makes it a decompression bomb; refused ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not a decodable image (no known image format)") from exc
    except OSError as exc:
        if exc.errno is not None and exc.strerror:  # the OS refused: missing, no permission...
            reason = "does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror
            raise ImageError(f"{label}: {reason}") from exc
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc  # PIL's own
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError) as exc:
        # Malformed headers surface from PIL's format plugins as assorted exception types.
        raise ImageError(f"{label}: malformed image ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the mode (greyscale, palette, alpha composited on black, CMYK, 16-bit)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / max(float(arr.max()), 1.0) if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Square uint8 RGB array of side `size` (area-aware bilinear)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def load_face(source: str | Path | bytes, size: int, name: str | None = None) -> np.ndarray:
    """Any face image to the model's input: uint8 RGB, size x size."""
    return resize(to_rgb(open_image(source, name)), size)
