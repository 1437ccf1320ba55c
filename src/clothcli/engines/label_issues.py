"""`analyze-data --label-issues`: images whose label is probably wrong, by confident learning.

cleanlab needs out-of-sample predicted probabilities for every image. Training a network per fold
would take hours on a CPU, so each image goes once through a backbone (ImageNet weights, or a
fine-tuned clothcli checkpoint) to an embedding, and a logistic regression per fold of a stratified
k-fold split predicts each image's class from the other folds' embeddings: seconds, not training runs.
cleanlab's `find_label_issues` then flags the images whose given label disagrees with confident
out-of-sample predictions, ranked by label quality (self-confidence).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clothcli.data.loading import IGNORE_INDEX, ImageFiles, decode_size, eval_transform, make_loader
from clothcli.data.sources import open_dataset
from clothcli.errors import UserError

EXTRA_HINT = "pip install 'clothcli[data]'"


def require_data_extra() -> None:
    """One line naming the extra to install when cleanlab or scikit-learn is missing."""
    try:
        import cleanlab  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--label-issues needs {exc.name}: {EXTRA_HINT}") from None


@dataclass
class LabelIssues:
    """Suspected label errors across all splits, most suspicious first."""

    root: str
    classes: list[str]
    images: int
    folds: int
    backbone: str
    seconds: dict[str, float]  # embedding, cross-validation, cleanlab
    out_of_sample_accuracy: float
    # path, split, given, suggested, quality (0: surely wrong .. 1: surely right), most suspicious first
    issues: list[dict[str, str | float]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _backbone(checkpoint: str | Path | None, model_name: str | None, weights: str | Path | None):
    """(model that returns embeddings, its Preprocess, a description)."""
    if checkpoint is not None:
        from clothcli.models.loading import load_for_inference

        loaded = load_for_inference(checkpoint, "cpu")
        loaded.model.reset_classifier(0)
        return loaded.model, loaded.preprocess, f"{loaded.arch} (checkpoint {loaded.directory})"
    if not (model_name and weights):
        raise UserError("--label-issues needs a backbone: --checkpoint RUN, or --model NAME with --weights PATH")
    from clothcli.config import ModelConfig, PreprocessConfig
    from clothcli.models.build import build_model, resolve_preprocess
    from clothcli.models.fusion import prepare_for_inference

    model = build_model(ModelConfig(name=model_name, weights=str(weights)), num_classes=0)
    pre = resolve_preprocess(model, PreprocessConfig())
    return prepare_for_inference(model, pre.input_size), pre, f"{model_name} ({Path(weights).name})"


def embed(model: torch.nn.Module, dataset: ImageFiles, batch_size: int, workers: int):
    """Embeddings of every item of `dataset`, and which items could not be read."""
    features, errors = [], {}
    with torch.inference_mode():
        for images, targets, indices, errs in make_loader(dataset, batch_size, workers):
            features.append(model(images.contiguous(memory_format=torch.channels_last)).float())
            errors.update({int(i): e for i, e, t in zip(indices.tolist(), errs, targets.tolist()) if t == IGNORE_INDEX})
    return torch.cat(features).numpy(), errors


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each image's class probabilities from a logistic regression fitted on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest = int(np.bincount(labels).min())
    if smallest < folds:
        raise UserError(f"a class has {smallest} image(s): --folds {folds} needs at least {folds} per class")
    probs = np.zeros((len(labels), int(labels.max()) + 1))
    features = features.astype(np.float64)  # in float32, a near-constant feature scales to infinity
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        classifier.fit(features[train], labels[train])
        probs[np.ix_(held_out, classifier.classes_)] = classifier.predict_proba(features[held_out])
    return probs


def find_label_issues(
    root: str | Path,
    checkpoint: str | Path | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    folds: int = 5,
    batch_size: int = 64,
    workers: int = 2,
) -> LabelIssues:
    """Rank the images of every split of `root` by how likely their label is wrong."""
    require_data_extra()
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    index = open_dataset(root).index
    model, pre, description = _backbone(checkpoint, model_name, weights)
    samples = [(path, target, name) for name, split in index.splits.items() for path, target in split.samples]
    dataset = ImageFiles([(p, t) for p, t, _ in samples], eval_transform(pre), decode_size(pre))
    start = time.perf_counter()
    features, errors = embed(model, dataset, batch_size, workers)
    embedded = time.perf_counter()
    readable = np.array([i not in errors for i in range(len(samples))])
    broken = int((~np.isfinite(features[readable]).all(1)).sum())
    if broken:
        raise UserError(
            f"{description} gives infinite or NaN features for {broken} of {int(readable.sum())} images: "
            "a diverged checkpoint cannot rank labels (use another --checkpoint, or --model with --weights)"
        )
    labels = np.array([t for _, t, _ in samples])[readable]
    probs = out_of_sample_probabilities(features[readable], labels, folds)
    fitted = time.perf_counter()
    flagged = cleanlab_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    done = time.perf_counter()
    kept = [s for s, ok in zip(samples, readable) if ok]
    issues = [
        {
            "path": str(kept[i][0]),
            "split": kept[i][2],
            "given": index.classes[labels[i]],
            "suggested": index.classes[int(probs[i].argmax())],
            "quality": round(float(quality[i]), 6),
        }
        for i in flagged
    ]
    return LabelIssues(
        root=str(index.root),
        classes=index.classes,
        images=len(samples),
        folds=folds,
        backbone=description,
        seconds={
            "embedding": round(embedded - start, 2),
            "cross_validation": round(fitted - embedded, 2),
            "cleanlab": round(done - fitted, 2),
        },
        out_of_sample_accuracy=float((probs.argmax(1) == labels).mean()),
        issues=issues,
        unreadable=[{"path": str(samples[i][0]), "reason": r} for i, r in sorted(errors.items())],
    )
