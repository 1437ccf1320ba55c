"""Out-of-distribution scores in feature space, beside the logit scores of `metrics.ood_scores`.

Scores computed from the logits alone (the maximum softmax probability, the energy) are weak on
inputs far from the training data. Two scores read the penultimate features instead, from a bank
`clothcli calibrate --ood` builds on the training images and stores as safetensors (tensors and a
few strings: data, never a pickle):

- `knn`: the cosine similarity of an image's L2-normalised features to its k-th nearest training
  image (Sun et al., ICML 2022); one matrix product against the bank, stored in half precision;
- `mahalanobis`: minus the smallest Mahalanobis distance of the normalised features to a class mean
  under one shared covariance (Lee et al., NeurIPS 2018), shrunk towards a multiple of the identity
  so that it inverts with fewer images than dimensions.

Every score is oriented as the logit scores are: higher is more like the training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clothcli.errors import UserError
from clothcli.io_utils import atomic_path

FEATURE_SCORES = ("knn", "mahalanobis")
BANK_FORMAT = "clothcli-ood-bank/1"
K_CHOICES = (1, 5, 10, 20, 50)  # the k `calibrate --ood` chooses among on its out-of-distribution folder
SHRINKAGE = 1e-3  # of the covariance's mean eigenvalue, added to its diagonal
QUERY_CHUNK = 256  # images per matrix product: bounds the similarity matrix to QUERY_CHUNK x bank rows
DIFFERENCE_ELEMENTS = 1 << 22  # images x classes x features per block of Mahalanobis differences (16 MB)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass
class FeatureBank:
    """What the feature scores need: the normalised training features (a seeded subsample when asked),
    the class means of the normalised features and the precision matrix of their shared covariance."""

    features: np.ndarray  # (N, D) float16, unit rows
    means: np.ndarray  # (C, D) float32
    precision: np.ndarray  # (D, D) float32
    k: int
    trained_on: int  # training images the means and covariance come from (the bank may hold fewer)

    def __post_init__(self) -> None:
        self._bank32 = np.asarray(self.features, dtype=np.float32)
        # precision = L L^T: distances as plain squared differences in the whitened space (expanding
        # q P q - 2 q P m + m P m instead cancels catastrophically in float32 when P is large)
        self._whiten = np.linalg.cholesky(np.asarray(self.precision, dtype=np.float64)).astype(np.float32)
        self._white_means = np.asarray(self.means, dtype=np.float32) @ self._whiten

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def knn(self, features: np.ndarray, k: int | None = None) -> np.ndarray:
        """Similarity to the k-th nearest bank row, per image (higher: closer to the training data)."""
        k = min(k or self.k, len(self._bank32))
        query = normalise(features)
        scores = np.empty(len(query), dtype=np.float32)
        for start in range(0, len(query), QUERY_CHUNK):
            similarity = query[start : start + QUERY_CHUNK] @ self._bank32.T
            scores[start : start + QUERY_CHUNK] = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return scores

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Minus the smallest squared Mahalanobis distance to a class mean, per image."""
        white = normalise(features) @ self._whiten
        scores = np.empty(len(white), dtype=np.float32)
        rows = max(1, DIFFERENCE_ELEMENTS // self._white_means.size)
        for start in range(0, len(white), rows):
            differences = white[start : start + rows, None, :] - self._white_means[None, :, :]
            scores[start : start + rows] = -np.einsum("ncd,ncd->nc", differences, differences).min(1)
        return scores

    def scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return {"knn": self.knn(features), "mahalanobis": self.mahalanobis(features)}

    def with_k(self, k: int) -> FeatureBank:
        return FeatureBank(self.features, self.means, self.precision, k, self.trained_on)

    def save(self, path: Path) -> None:
        """The bank as a safetensors file at `path`, written atomically."""
        from safetensors.numpy import save_file

        tensors = {"features": self.features, "means": self.means, "precision": self.precision}
        metadata = {"format": BANK_FORMAT, "k": str(self.k), "trained_on": str(self.trained_on)}
        with atomic_path(path) as staged:
            save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(staged), metadata=metadata)


def fit_bank(
    features: np.ndarray, targets: np.ndarray, classes: int, *, k: int = 10, size: int | None = None, seed: int = 0
) -> FeatureBank:
    """The bank of training `features` (rows) with their class indices `targets`: all of them, or a seeded
    random `size` of them, in half precision; the means and covariance from all of them."""
    unit = normalise(features)
    if len(unit) == 0:
        raise UserError("no training images to build the out-of-distribution bank from")
    means = np.stack([unit[targets == c].mean(0) if (targets == c).any() else np.zeros(unit.shape[1]) for c in
                      range(classes)]).astype(np.float32)  # fmt: skip
    centred = (unit - means[targets]).astype(np.float64)
    covariance = centred.T @ centred / len(unit)
    ridge = max(SHRINKAGE * np.trace(covariance) / len(covariance), 1e-6)  # a floor for identical features
    covariance += ridge * np.eye(len(covariance))
    precision = np.linalg.inv(covariance).astype(np.float32)
    kept = unit
    if size is not None and size < len(unit):
        kept = unit[np.sort(np.random.default_rng(seed).choice(len(unit), size, replace=False))]
    return FeatureBank(kept.astype(np.float16), means, precision, k, len(unit))


def load_bank(path: Path, dim: int | None = None, classes: int | None = None) -> FeatureBank:
    """The bank at `path`, checked: a UserError when it is missing, not a clothcli bank, or its shapes do not
    fit the model (`dim` features, `classes` classes)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{path}: the out-of-distribution bank is missing; run clothcli calibrate --ood again")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("features", "means", "precision")}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a readable out-of-distribution bank ({str(exc)[:120]})") from None
    if metadata.get("format") != BANK_FORMAT:
        raise UserError(f"{path}: not a clothcli out-of-distribution bank")
    features, means, precision = tensors["features"], tensors["means"], tensors["precision"]
    width = features.shape[1] if features.ndim == 2 else -1
    shapes_fit = means.ndim == 2 and means.shape[1] == width and precision.shape == (width, width)
    if not shapes_fit or (dim is not None and width != dim) or (classes is not None and len(means) != classes):
        raise UserError(f"{path}: its shapes do not fit this model (features {features.shape}, means {means.shape})")
    try:
        k, trained_on = int(metadata.get("k", "")), int(metadata.get("trained_on", ""))
    except ValueError:
        raise UserError(f"{path}: its k or image count is not a number") from None
    if not 1 <= k <= len(features):
        raise UserError(f"{path}: k={k} does not fit a bank of {len(features)} images")
    try:
        return FeatureBank(features.astype(np.float16), means.astype(np.float32), precision.astype(np.float32), k,
                           trained_on)  # fmt: skip
    except np.linalg.LinAlgError:
        raise UserError(f"{path}: its precision matrix is not positive definite") from None
