"""Draw a photo's faces (box, label, probability) and its mood onto a copy of it, and write the
copies where they can never replace a photo or any other existing file."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from soundmood import fileio
from soundmood.errors import UserError
from soundmood.inference.predict import PhotoResult

# One colour per class index (cycled), picked to stay distinct on photos.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)
SAVE_OPTIONS = {"JPEG": {"quality": 90}, "WEBP": {"quality": 90}}
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def draw(photo: Image.Image, result: PhotoResult, classes: list[str]) -> Image.Image:
    """A copy of the (upright, RGB) photo with every face boxed and labelled (a "?" after the
    probability of a face that is not confident), the mood or why there is none at the top."""
    out = photo.convert("RGB")
    pen = ImageDraw.Draw(out)
    unit = max(1, round(max(out.size) / 400))  # line width and text size follow the photo size
    font = ImageFont.load_default(size=max(10, 6 * unit + 6))
    for face in result.faces:
        colour = PALETTE[classes.index(face.label) % len(PALETTE)]
        x, y, w, h = face.box
        pen.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=unit * 2)
        _label(
            pen,
            (x, y),
            f"{face.label} {face.probabilities[face.label]:.2f}" + ("" if face.confident else "?"),
            colour,
            font,
            above=True,
        )
    mood = f"mood: {result.mood}" if result.mood else f"mood: none, {result.mood_reason}"
    _label(pen, (0, 0), mood, (20, 20, 20), font, above=False)
    return out


def _label(
    pen: ImageDraw.ImageDraw,
    at: tuple[int, int],
    text: str,
    colour: tuple[int, int, int],
    font: ImageFont.ImageFont,
    above: bool,
) -> None:
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = at
    if above:  # above the box when there is room, inside it otherwise
        y = y - h if y - h >= 0 else y
    pen.rectangle((x, y, x + w, y + h), fill=colour)
    pen.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)


class AnnotateError(UserError):
    """--annotate names a folder whose copies would replace or mix with existing files."""


def plan(photos: list[Path], out_dir: Path, inputs: list[str]) -> list[Path]:
    """Where each photo's annotated copy goes, in the order of `photos`: OUT_DIR/<name> in the
    photo's format (PNG for other formats), a name met twice in one run with a -2, -3...
    suffix. Refused before any work (AnnotateError naming the clash): OUT_DIR that is a file or
    lies under one; OUT_DIR that is an input folder or inside one (its copies would be read as
    photos on the next run; a hidden folder is skipped by that walk, so it is allowed); and any
    copy whose name already exists, since a copy never replaces a file (a photo or an earlier
    run's copy)."""
    flag = f"--annotate {out_dir}"
    existing = next((p for p in (out_dir, *out_dir.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == out_dir else f"lies under {existing}, which is"
        raise AnnotateError(f"{flag}: {where} a file, not a folder; name a new or empty folder")
    out = out_dir.resolve()
    for folder in map(Path, inputs):
        if not folder.is_dir() or not out.is_relative_to(folder.resolve()):
            continue
        inside = out.relative_to(folder.resolve())
        if any(part.startswith(".") for part in inside.parts):  # collect_photos skips it
            continue
        what = (
            f"is the input folder {folder}: its copies would sit among its photos and"
            if not inside.parts
            else f"lies inside the input folder {folder}: its copies would"
        )
        raise AnnotateError(
            f"{flag}: {what} be read as photos on the next run; name a folder outside it"
        )
    taken: set[Path] = set()
    targets = [_output_path(photo, out_dir, taken) for photo in photos]
    clashes = [t for t in targets if os.path.lexists(t)]
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise AnnotateError(
            f"{flag}: {clashes[0]}{more} already {'exist' if more else 'exists'}; annotated "
            "copies never replace a file: remove them or name another folder"
        )
    return targets


def _output_path(source: Path, out_dir: Path, taken: set[Path]) -> Path:
    suffix = source.suffix.lower() if source.suffix.lower() in FORMATS else ".png"
    target = out_dir / f"{source.stem}{suffix}"
    n = 2
    while target in taken:
        target = out_dir / f"{source.stem}-{n}{suffix}"
        n += 1
    taken.add(target)
    return target


def save(image: Image.Image, target: Path) -> None:
    """Write `image` to `target`, which must not exist: a file that appeared meanwhile (a race)
    is never replaced, and a kill leaves no half-written copy under `target`."""
    fmt = FORMATS[target.suffix]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    try:
        fileio.write_bytes(target, buffer.getvalue(), replace=False)
    except FileExistsError as exc:
        raise AnnotateError(
            f"--annotate: {target} appeared while predict ran; it was not overwritten"
        ) from exc
    except OSError as exc:
        raise AnnotateError(f"--annotate: cannot write {target}: {exc.strerror or exc}") from exc
