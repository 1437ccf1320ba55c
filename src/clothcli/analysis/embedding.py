"""The penultimate features of a split projected to two dimensions, for the report's embedding map.

t-SNE (scikit-learn) after PCA to at most 50 dimensions (the usual preparation: it removes noise and
makes t-SNE's neighbour search cheap), seeded, so one model on one split draws the same map each
time on one host. The perplexity is capped below a third of the image count, as t-SNE needs.
"""

from __future__ import annotations

import numpy as np

from clothcli.errors import require_packages

EXPLAIN_EXTRA = "pip install 'clothcli[explain]'"
PCA_DIMENSIONS = 50


def require_sklearn() -> None:
    require_packages(("sklearn",), "the embedding map", EXPLAIN_EXTRA)


def project_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) t-SNE coordinates (N >= 4)."""
    require_sklearn()
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    data = np.asarray(features, dtype=np.float64)
    if data.shape[1] > PCA_DIMENSIONS and len(data) > PCA_DIMENSIONS:
        data = PCA(PCA_DIMENSIONS, random_state=seed).fit_transform(data)
    perplexity = float(min(30.0, (len(data) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(data)
