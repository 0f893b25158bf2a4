"""How well do re-detected faces reproduce RAF-DB's aligned crops? (docs/inference.md)

Each sampled test crop is placed in a larger picture by each of evaluate.redetect's contexts
(soundmood.inference.redetect), re-detected with detect_faces, cropped with every candidate
method and margin, and classified; accuracy is compared with the same model on the original
crops. Also times detection + classification per photo.

    python -m soundmood.inference.measure --model models/model.keras [--n 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from soundmood.config import load
from soundmood.data.images import load_face, open_image, to_rgb
from soundmood.data.layout import list_split
from soundmood.inference.detect import detect_faces
from soundmood.inference.predict import classify, input_size, load_model, predict_photo
from soundmood.inference.redetect import CONTEXTS, matching_face
from soundmood.inference.settings import Settings, from_config

CANDIDATES = [("box", m) for m in (-0.1, -0.05, 0.0, 0.05, 0.1, 0.2)] + [
    ("align", m) for m in (-0.05, 0.0, 0.05, 0.1)
]


def measure(
    model_path: str,
    n: int,
    seed: int,
    tta_flip: bool,
    settings: Settings,
    root: Path,
    classes: list[str],
    contexts: Mapping[str, Mapping[str, Any] | None],
) -> dict:
    model = load_model(model_path)
    size = input_size(model)
    samples = list_split(root, "test", classes)
    samples = random.Random(seed).sample(samples, min(n, len(samples)))
    y = np.array([s.label for s in samples])
    original = classify(model, np.stack([load_face(s.path, size) for s in samples]), tta_flip)
    report = {
        "model": model_path,
        "images": len(samples),
        "seed": seed,
        "tta_flip": tta_flip,
        "original_accuracy": _acc(original, y),
        "conditions": {},
    }
    for name, params in contexts.items():
        if params is None:
            continue  # a context turned off in conf
        rng, make = random.Random(seed), CONTEXTS[name]
        crops = {c: [] for c in CANDIDATES}
        pixel_mae = {c: [] for c in CANDIDATES}
        found, confidences = [], []
        for s in samples:
            original_crop = to_rgb(open_image(s.path))
            reference = np.asarray(original_crop, dtype=np.float32)
            photo, truth = make(original_crop, rng, **params)
            face = matching_face(detect_faces(photo, _permissive(settings)), truth)
            found.append(face is not None)
            confidences.append(face.confidence if face else 0.0)
            for method, margin in CANDIDATES if face else []:
                cropped = replace(
                    face, settings=replace(settings.crop, method=method, margin=margin)
                )
                crops[(method, margin)].append(cropped.crop(size))
                pixel_mae[(method, margin)].append(
                    float(np.abs(cropped.crop().astype(np.float32) - reference).mean())
                )
        found_arr, conf = np.array(found), np.array(confidences)
        result = {
            "detected": float(found_arr.mean()),
            "detected_at_confidence": {
                str(t): float((conf >= t).mean()) for t in (0.8, 0.9, 0.95, 0.98)
            },
            "original_accuracy_on_detected": _acc(original[found_arr], y[found_arr]),
            "crops": {},
            "pixel_mae": {
                f"{m} {g:+.2f}": round(float(np.mean(v)), 2) for (m, g), v in pixel_mae.items()
            },
        }
        for (method, margin), faces in crops.items():
            probs = classify(model, np.stack(faces), tta_flip)
            result["crops"][f"{method} {margin:+.2f}"] = _acc(probs, y[found_arr])
        report["conditions"][name] = result
        print(json.dumps({name: result}), flush=True)
    return report


def _permissive(settings: Settings) -> Settings:
    """Detection without the final confidence cut, so the report can show what it costs."""
    return replace(settings, detector=replace(settings.detector, min_confidence=0.0))


def _acc(probs: np.ndarray, y: np.ndarray) -> float:
    return round(float((probs.argmax(axis=1) == y).mean()), 4) if len(y) else float("nan")


def latency(model_path: str, photos: list[Path], repeats: int, cfg: object) -> dict:
    """Median seconds per photo (detection, classification) after one warm-up call."""
    model = load_model(model_path)
    out = {}
    for path in photos:
        photo = to_rgb(open_image(path))
        predict_photo(model, photo, cfg)
        runs = [predict_photo(model, photo, cfg) for _ in range(repeats)]
        out[path.name] = {
            "size": f"{photo.width}x{photo.height}",
            "faces": len(runs[0].faces),
            "detect_s": round(float(np.median([r.seconds["detect"] for r in runs])), 3),
            "classify_s": round(float(np.median([r.seconds["classify"] for r in runs])), 3),
        }
        print(json.dumps({path.name: out[path.name]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=1000, help="test images sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--latency", nargs="*", default=[], help="photos to time instead")
    args = parser.parse_args()
    cfg = load()
    if args.latency:
        cfg = OmegaConf.merge(cfg, {"inference": from_config(cfg.get("inference")).to_dict()})
        report = latency(args.model, [Path(p) for p in args.latency], 5, cfg)
    else:
        start = time.perf_counter()
        report = measure(
            args.model,
            args.n,
            args.seed,
            bool(cfg.evaluate.tta_flip),
            from_config(cfg.get("inference")),
            Path(cfg.data.root),
            list(cfg.data.classes),
            OmegaConf.to_container(cfg.evaluate.redetect.contexts),
        )
        report["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
