"""MTCNN's score thresholds on the detection path, chosen on validation faces (by hand; not part of
the test suite; the decision and the table: docs/inference.md, "The detector's score floor").

    python benchmarks/detector_floor.py --model models/model.keras [--split val] [--n 120]
        [--stages 0.6,0.7,0.8 0.6,0.7,0.7] [--floors 0.6,0.7,0.8,0.9]

Each of --n sampled faces of the prepared --split is placed by every context of
evaluate.redetect (soundmood.inference.redetect), detected once per stage-threshold set with no
score floor, and classified; each floor then keeps the faces scored at or above it (a face under
the floor is a miss, as for the service). False positives: faces found at each floor on
scikit-image's sample pictures, at 640 and 1280 px on the long side, none of which holds a face
but `astronaut` and `camera` (one each, so a second face there is false too).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import skimage.data
from PIL import Image

from soundmood.config import load
from soundmood.data.prepare import load_split
from soundmood.inference.detect import detect_faces
from soundmood.inference.predict import classify, load_model
from soundmood.inference.redetect import matching_face, placed, sample
from soundmood.inference.settings import Settings, from_config

PICTURES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")
PICTURES += ("coins", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
PICTURES += ("logo", "page", "text", "horse", "moon", "clock")
FACES_IN = {"astronaut": 1, "camera": 1}
SIDES = (640, 1280)


@dataclass(frozen=True)
class Outcome:
    context: str
    label: int
    score: float | None  # the matching face's detector score; None: not found at any score
    predicted: int | None


def unfloored(settings: Settings, stages: tuple[float, float, float]) -> Settings:
    """`settings` with MTCNN's three stage thresholds set and no score floor."""
    return replace(
        settings, detector=replace(settings.detector, thresholds=stages, min_confidence=0.0)
    )


def place_all(x, y, cfg, settings: Settings, model, tta: bool) -> list[Outcome]:
    seed = int(cfg.evaluate.get("condition_seed", 0))
    rows = []
    for name, params in cfg.evaluate.redetect.contexts.items():
        if not params:
            continue
        for (picture, truth), label in zip(placed(x, name, params, seed), y, strict=True):
            face = matching_face(detect_faces(picture, settings), truth)
            predicted = None
            if face is not None:
                predicted = int(classify(model, face.crop(x.shape[1])[None], tta).argmax())
            rows.append(
                Outcome(name, int(label), None if face is None else face.confidence, predicted)
            )
    return rows


def false_faces(settings: Settings) -> dict[str, list[float]]:
    """Scores of the faces found beyond the true ones on each sample picture at each side."""
    found = {}
    for name in PICTURES:
        picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for side in SIDES:
            scale = side / max(picture.size)
            resized = picture.resize((round(picture.width * scale), round(picture.height * scale)))
            scores = sorted((f.confidence for f in detect_faces(resized, settings)), reverse=True)
            found[f"{name}@{side}"] = scores[FACES_IN.get(name, 0) :]
    return found


def _found(row: Outcome, floor: float) -> bool:
    return row.score is not None and row.score >= floor


def report(stages: str, rows: list[Outcome], false: dict[str, list[float]], floor: float) -> str:
    kept = [r for r in rows if _found(r, floor)]
    right = sum(r.predicted == r.label for r in kept)
    per = " ".join(
        f"{c} {np.mean([_found(r, floor) for r in rows if r.context == c]):.3f}"
        for c in dict.fromkeys(r.context for r in rows)
    )
    wrong = sum(s >= floor for scores in false.values() for s in scores)
    return (
        f"| {stages} | {floor} | {len(kept) / len(rows):.3f} | {right / len(rows):.3f} | "
        f"{right / max(1, len(kept)):.3f} | {per} | {wrong} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a .keras model or MLflow model URI")
    parser.add_argument("--split", default="val", help="prepared split (default: %(default)s)")
    parser.add_argument("--n", type=int, default=120, help="faces (default: %(default)s)")
    parser.add_argument("--stages", nargs="+", default=["0.6,0.7,0.8", "0.6,0.7,0.7"])
    parser.add_argument("--floors", default="0.6,0.7,0.8,0.85,0.9")
    args = parser.parse_args()
    cfg = load()
    x, y = load_split(cfg.data.prepared_dir, args.split)
    picked = sample(len(x), args.n, int(cfg.evaluate.get("condition_seed", 0)))
    model, tta = load_model(args.model), bool(cfg.evaluate.tta_flip)
    base = from_config(cfg.get("inference"))
    pictures = f"{len(PICTURES)} sample pictures at {', '.join(map(str, SIDES))} px"
    print(f"{len(picked)} {args.split} faces in each context; {pictures}")
    print("| stages | floor | found | acc | acc on found | found per context | false faces |")
    print("|---|---|---|---|---|---|---|")
    for stages in args.stages:
        settings = unfloored(base, tuple(float(t) for t in stages.split(",")))
        rows = place_all(x[picked], y[picked], cfg, settings, model, tta)
        false = false_faces(settings)
        for floor in (float(f) for f in args.floors.split(",")):
            print(report(stages, rows, false, floor), flush=True)


if __name__ == "__main__":
    main()
