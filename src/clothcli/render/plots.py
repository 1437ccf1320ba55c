"""Every chart clothcli draws, each once: matplotlib on the Agg backend, to a file or a buffer.

The functions take plain results (a confusion matrix, reliability bins, a comparison, an audit, a
training history) and import nothing else of clothcli's, so any layer may draw.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.errors import UserError

Target = str | Path | io.BytesIO


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, target: Target, dpi: int) -> None:
    """Write the figure as PNG to a path (its folder made) or a buffer, and free it."""
    import matplotlib.pyplot as plt

    if not isinstance(target, io.BytesIO):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=dpi)
    plt.close(fig)


def confusion(matrix_rows: list[list[int]], classes: list[str], target: Target, normalise: bool = False) -> None:
    """The confusion matrix (rows: true class), counts or shares of each true class."""
    plt = _pyplot()
    matrix = np.array(matrix_rows, dtype=float)
    if normalise:
        matrix = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{matrix[i, j]:.2f}" if normalise else f"{int(matrix[i, j])}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    fig.tight_layout()
    _save(fig, target, dpi=110)


def reliability(bins: Any, target: Target, title: str = "") -> None:
    """Accuracy against confidence per bin (the reliability diagram), with each bin's share of images
    (`metrics.reliability_bins`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    width = 1 / bins.n_bins
    ax.bar(bins.lefts, bins.accuracy, width=width, align="edge", alpha=0.7, edgecolor="black", label="accuracy per bin")
    centres = [x + width / 2 for x in bins.lefts]
    ax.scatter(centres, bins.confidence, color="C3", marker="_", s=120, zorder=3, label="mean confidence per bin")
    for x, y, share in zip(centres, bins.accuracy, bins.share):
        ax.text(x, y + 0.01, f"{share:.0%}", ha="center", fontsize=7)
    ax.set_title(title or f"ECE {bins.calibration.ece:.3f}, NLL {bins.calibration.nll:.3f}")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, target, dpi=100)


def training_curves(history: list[dict[str, Any]], target: Target) -> None:
    """Losses, accuracies and the learning rate per epoch, side by side."""
    plt = _pyplot()

    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
        ("accuracy", [("train_acc", "train"), ("val_acc", "validation"), ("val_f1", "validation macro-F1")]),
        ("learning rate (end of epoch)", [("lr", "lr")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, target, dpi=100)


def lr_range_test(result: Any, target: Target) -> None:
    """Loss against learning rate (the range test), raw and smoothed, with each suggested rate marked."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.lrs, result.raw_losses, color="0.8", lw=0.8, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    for i, (name, lr) in enumerate(result.suggestions.items()):
        idx = int(np.argmin(np.abs(np.log(result.lrs) - np.log(lr))))
        ax.scatter(
            [lr],
            [result.losses[idx]],
            color=f"C{i + 1}",
            zorder=3,
            label=f"{name}: {lr:.2e}" + (" (default)" if name == result.default else ""),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(result.losses) * 0.9, min(max(result.losses), result.losses[0] * 1.5) * 1.05)
    ax.legend()
    ax.set_title(f"LR range test, batch {result.batch_size}")
    fig.tight_layout()
    _save(fig, target, dpi=100)


def contact_sheet(issues: Any, target: Target, top: int = 20, columns: int = 5) -> None:
    """A PNG of the `top` suspected label errors, each captioned with its given and suggested label."""
    from PIL import Image

    plt = _pyplot()

    shown = issues.issues[:top]
    if not shown:
        raise UserError("no label issues found: nothing to draw")
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, issue in zip(axes.flat, shown):
        with Image.open(issue["path"]) as image:
            image.thumbnail((256, 256))
            ax.imshow(image.convert("RGB"))
        ax.set_title(
            f"given: {issue['given']}\nsuggested: {issue['suggested']}\n{issue['split']}, q={issue['quality']:.2g}",
            fontsize=8,
        )
    fig.tight_layout()
    _save(fig, target, dpi=90)


def class_distribution(analysis: Any, target: Target) -> None:
    """Bar chart of images per class, one bar group per split (a dataset audit)."""
    plt = _pyplot()

    classes = analysis.classes
    splits = list(analysis.splits)
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.8), 4))
    for i, split in enumerate(splits):
        counts = [analysis.splits[split]["classes"][c] for c in classes]
        ax.bar(x + i * width - 0.4 + width / 2, counts, width, label=split)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.legend()
    fig.tight_layout()
    _save(fig, target, dpi=100)


def pareto(comparison: Any, target: Target) -> None:
    """Accuracy against latency and against MACs, with 95% intervals, the front joined, references hollow
    (a `clothcli compare` result)."""
    import matplotlib.ticker

    plt = _pyplot()

    measured = [r for r in comparison.rows if not r.reference]
    panels = [("ms per image, batch 1", "ms_batch1", "pareto_latency"), ("GMACs", "macs", "pareto_macs")]
    panels = [p for p in panels if any(getattr(r, p[1]) is not None for r in measured)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (label, key, front_key) in zip(axes[0], panels):
        scale = 1e9 if key == "macs" else 1.0
        points = [(getattr(r, key) / scale, r) for r in measured if getattr(r, key) is not None]
        placed: list[tuple[float, float]] = []
        for index, (x, r) in enumerate(sorted(points, key=lambda p: (p[0], -p[1].accuracy))):
            ax.errorbar(
                x,
                100 * r.accuracy,
                yerr=[[100 * (r.accuracy - r.ci_low)], [100 * (r.ci_high - r.accuracy)]],
                fmt="o",
                color="tab:blue" if getattr(r, front_key) else "tab:gray",
                capsize=3,
            )
            # labels of points close together are stacked downwards instead of printed over each other
            crowd = sum(abs(math.log10(x / px)) < 0.08 and abs(100 * r.accuracy - py) < 0.8 for px, py in placed)
            placed.append((x, 100 * r.accuracy))
            # and neighbours along the axis alternate above and below their points
            lift = 4 if index % 2 == 0 else -14
            ax.annotate(
                r.name, (x, 100 * r.accuracy), textcoords="offset points", xytext=(6, lift - 11 * crowd), fontsize=8
            )
        front = sorted((x, 100 * r.accuracy) for x, r in points if getattr(r, front_key))
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="tab:blue", linewidth=1)
        if key == "macs":
            for r in comparison.rows:
                if r.reference and r.macs is not None:
                    ax.scatter(r.macs / scale, 100 * r.accuracy, facecolors="none", edgecolors="tab:red")
                    ax.annotate(
                        r.name + " (ref.)",
                        (r.macs / scale, 100 * r.accuracy),
                        textcoords="offset points",
                        xytext=(5, -10),
                        fontsize=8,
                        color="tab:red",
                    )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel(f"accuracy on {comparison.split} (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, target, dpi=110)


def embedding_map(
    points: np.ndarray, targets: np.ndarray, wrong: np.ndarray, classes: list[str], target: Target, title: str = ""
) -> None:
    """2-D points coloured by true class, the misclassified ones ringed in black."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.2, 6.4))
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for k, name in enumerate(classes):
        members = targets == k
        if members.any():
            colour = colours(k % colours.N)
            ax.scatter(points[members, 0], points[members, 1], s=14, color=colour, label=name, alpha=0.85)
    if wrong.any():
        ax.scatter(points[wrong, 0], points[wrong, 1], s=60, facecolors="none", edgecolors="black", linewidths=1.1,
                   label="misclassified")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "Penultimate features (t-SNE), coloured by true class")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, target, dpi=90)


def importance(importances: dict[str, float], target: Target) -> None:
    """Horizontal bars of each searched key's importance (Optuna's fANOVA share of the variance)."""
    plt = _pyplot()
    keys = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(keys) + 1.4))
    ax.barh(keys, [importances[k] for k in keys], color="#2457a6")
    for y, key in enumerate(keys):
        ax.text(importances[key], y, f" {importances[key]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(importances.values(), default=0) * 1.15))
    ax.set_xlabel("importance (share of the objective's variance, fANOVA)")
    ax.set_title("Which settings mattered")
    fig.tight_layout()
    _save(fig, target, dpi=100)
