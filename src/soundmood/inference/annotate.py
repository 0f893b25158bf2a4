"""Draw a photo's faces (box, label, probability) and its mood onto a copy of it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
    """A copy of the (upright, RGB) photo with every face boxed and labelled, mood at the top."""
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
            f"{face.label} {face.probabilities[face.label]:.2f}",
            colour,
            font,
            above=True,
        )
    mood = f"mood: {result.mood}" if result.mood else "mood: no face found"
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


def output_path(source: Path, out_dir: Path, taken: set[Path]) -> Path:
    """OUT_DIR/<name>, in the source's format; a name already written gets a -2, -3... suffix."""
    suffix = source.suffix.lower() if source.suffix.lower() in FORMATS else ".png"
    target = out_dir / f"{source.stem}{suffix}"
    n = 2
    while target in taken:
        target = out_dir / f"{source.stem}-{n}{suffix}"
        n += 1
    taken.add(target)
    return target


def save(image: Image.Image, target: Path) -> None:
    fmt = FORMATS[target.suffix]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    image.save(tmp, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    tmp.replace(target)
