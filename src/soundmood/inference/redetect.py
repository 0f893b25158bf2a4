"""The detection path, as the service meets faces: each aligned face crop is re-embedded in a
larger picture by a deterministic context (mirrored surroundings, a flat background, a rolled
head, a small greyscale webcam face), found again by soundmood.inference.detect, aligned by
inference.crop and resized to model input. A face the detector does not find again is a miss,
as it is for the service.

The contexts and their parameters are evaluate.redetect.contexts (conf/evaluate); soundmood.
robustness scores the re-detected faces as the `redetected` capture condition, and the measure
tool (soundmood.inference.measure) uses the same contexts to compare crop methods.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from soundmood.inference.detect import Face, detect_faces
from soundmood.inference.settings import Settings

GREY = (128, 128, 128)

# where the pasted face is in its picture: centre x, centre y, side (px)
Truth = tuple[float, float, float]
Context = Callable[..., tuple[Image.Image, Truth]]


def _resized(face: Image.Image, side: int) -> Image.Image:
    return face.resize((side, side), Image.Resampling.BILINEAR)


def _side(rng: random.Random, face_side: list[int]) -> int:
    return rng.randint(int(face_side[0]), int(face_side[1]))


def _mirrored(face: Image.Image, side: int) -> Image.Image:
    """The face at `side` px, its surroundings mirrored outwards by half a side each way (a
    context the detector can mistake for nothing but a face, unlike a flat border)."""
    big = np.asarray(_resized(face, side))
    pad = side // 2
    return Image.fromarray(np.pad(big, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))


def margin(
    face: Image.Image, rng: random.Random, face_side: list[int]
) -> tuple[Image.Image, Truth]:
    """Upright, loosely framed: the face in mirrored surroundings twice its side."""
    side = _side(rng, face_side)
    picture = _mirrored(face, side)
    return picture, (picture.width / 2, picture.height / 2, side)


def background(
    face: Image.Image, rng: random.Random, face_side: list[int], canvas: float
) -> tuple[Image.Image, Truth]:
    """The face on a flat grey picture `canvas` times its side, at a random place."""
    side = _side(rng, face_side)
    width = max(side, round(side * canvas))
    picture = Image.new("RGB", (width, width), GREY)
    x, y = rng.randint(0, width - side), rng.randint(0, width - side)
    picture.paste(_resized(face, side), (x, y))
    return picture, (x + side / 2, y + side / 2, side)


def rotation(
    face: Image.Image, rng: random.Random, face_side: list[int], degrees: float
) -> tuple[Image.Image, Truth]:
    """A rolled head: the mirrored context rotated by up to `degrees` either way about the face."""
    side = _side(rng, face_side)
    picture = _mirrored(face, side).rotate(
        rng.uniform(-degrees, degrees), Image.Resampling.BILINEAR
    )
    return picture, (picture.width / 2, picture.height / 2, side)


def webcam(
    face: Image.Image, rng: random.Random, face_side: list[int], grey: bool
) -> tuple[Image.Image, Truth]:
    """A small face as webcams and group photos give it: the mirrored context at a few dozen
    pixels a face, greyscale when `grey`."""
    picture, truth = margin(face, rng, face_side)
    return (picture.convert("L").convert("RGB") if grey else picture), truth


CONTEXTS: dict[str, Context] = {
    "margin": margin,
    "background": background,
    "rotation": rotation,
    "webcam": webcam,
}


def matching_face(faces: list[Face], truth: Truth) -> Face | None:
    """The most confident detection centred on the pasted face (mirrored copies are not it)."""
    cx, cy, side = truth
    near = [
        f
        for f in faces
        if abs(f.box[0] + f.box[2] / 2 - cx) < side / 4
        and abs(f.box[1] + f.box[3] / 2 - cy) < side / 4
    ]
    return max(near, key=lambda f: f.confidence) if near else None


@dataclass(frozen=True)
class Redetected:
    """One context's re-detection of a batch of faces: `found[i]` whether face i was found
    again; `crops` the found ones' model inputs, in order (len == found.sum())."""

    found: np.ndarray
    crops: np.ndarray


def sample(n_images: int, faces: int, seed: int) -> np.ndarray:
    """Indices of the faces the condition uses: the same `faces` of a split on every run."""
    rng = np.random.default_rng([seed, zlib.crc32(b"redetected")])
    return np.sort(rng.choice(n_images, size=min(faces, n_images), replace=False))


def placed(
    images: np.ndarray, context: str, params: Mapping[str, Any], seed: int
) -> Iterator[tuple[Image.Image, Truth]]:
    """Each uint8 face of `images` in its picture by `context`, and where it is: the same
    pictures for the same seed, on every run."""
    rng = random.Random(zlib.crc32(f"{seed}:{context}".encode()))
    place = CONTEXTS[context]
    for image in images:
        yield place(Image.fromarray(image), rng, **params)


def redetect(
    images: np.ndarray,
    context: str,
    params: Mapping[str, Any],
    settings: Settings,
    seed: int,
) -> Redetected:
    """Each uint8 face of `images` (N, H, W, 3) placed by `context` with `params`, detected and
    aligned with `settings` (cfg.inference) and resized back to H."""
    size = images.shape[1]
    found, crops = [], []
    for picture, truth in placed(images, context, params, seed):
        face = matching_face(detect_faces(picture, settings), truth)
        found.append(face is not None)
        if face is not None:
            crops.append(face.crop(size))
    empty = np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    return Redetected(np.asarray(found, dtype=bool), np.stack(crops) if crops else empty)
