"""The report's views of why a model decides as it does: class-activation maps beside its mistakes and
beside a few correct images per class, the most-confused pairs with an example each, and the embedding
map of the split. Each is a piece of the template's context; each says what extra it needs when that
extra is not installed, instead of failing the report.
"""

from __future__ import annotations

import base64
import io
import random
from typing import Any

import numpy as np
from PIL import Image

from clothcli.backends import Classifier
from clothcli.errors import UserError
from clothcli.render import plots

CORRECT_PER_CLASS = 2  # correct images per class shown with their maps


def jpeg_uri(picture: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def pair_examples(pairs: list[dict[str, Any]], files: list[dict[str, Any]], top: int = 8) -> list[dict[str, Any]]:
    """The `top` most-confused pairs, each with its most confident mistake (either direction)."""
    shown = []
    for pair in pairs[:top]:
        members = {pair["a"], pair["b"]}
        mistakes = [f for f in files if f["true"] != f["predicted"] and {f["true"], f["predicted"]} == members]
        shown.append({**pair, "example": max(mistakes, key=lambda f: f["confidence"]) if mistakes else None})
    return shown


def _correct_examples(files: list[dict[str, Any]], classes: list[str], per_class: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    chosen = []
    for name in classes:
        right = [f for f in files if f["true"] == name and f["predicted"] == name]
        chosen += sorted(rng.sample(right, min(per_class, len(right))), key=lambda f: f["path"])
    return chosen


def cam_views(
    classifier: Classifier,
    files: list[dict[str, Any]],
    mistakes: list[dict[str, Any]],
    method: str = "gradcam",
    per_class: int = CORRECT_PER_CLASS,
) -> dict[str, Any]:
    """Overlays (data URIs keyed by image path) of `mistakes` and of `per_class` correct images per
    class, with the randomisation check; or `unavailable`, saying why (an exported file, no grad-cam)."""
    from clothcli.engines.explain import cam_pictures, check_maps, prepare_cams

    try:
        setup = prepare_cams(classifier, method)
    except UserError as exc:
        return {"unavailable": str(exc)}
    correct = _correct_examples(files, list(classifier.classes), per_class)
    overlays = {row["path"]: jpeg_uri(picture) for row, picture in cam_pictures(setup, mistakes + correct)}
    return {
        "method": method,
        "layer": setup.layer.name,
        "layer_choice": setup.layer.how,
        "grid": "x".join(str(v) for v in setup.layer.grid),
        "overlays": overlays,
        "correct": [{**row, "overlay": overlays.get(row["path"])} for row in correct],
        "check": check_maps(setup, files),
    }


def embedding_view(evaluation: Any) -> dict[str, Any]:
    """The split's penultimate features in 2-D as a PNG data URI, or `unavailable` saying why."""
    from clothcli.analysis.embedding import project_2d

    features = evaluation.features
    if features is None:
        return {"unavailable": "this model gives no penultimate features (an export made before they were added)"}
    if len(features) < 4:
        return {"unavailable": "fewer than 4 images: no map to draw"}
    try:
        points = project_2d(features)
    except UserError as exc:
        return {"unavailable": str(exc)}
    index = {name: i for i, name in enumerate(evaluation.classes)}
    targets = np.array([index[f["true"]] for f in evaluation.files])
    wrong = np.array([f["true"] != f["predicted"] for f in evaluation.files])
    buffer = io.BytesIO()
    plots.embedding_map(points, targets, wrong, list(evaluation.classes), buffer)
    return {"png": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "images": len(points)}
