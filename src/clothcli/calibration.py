"""Whether a classifier's probabilities can be trusted, and temperature scaling to make them so.

Label smoothing and EMA move a network's confidences away from its accuracy. Calibration is measured
with the expected calibration error (15 equal-width confidence bins, torchmetrics), the negative
log-likelihood and the Brier score, and repaired with one scalar: logits divided by a temperature
fitted on validation by minimising the NLL (Guo et al. 2017, "On Calibration of Modern Neural
Networks"). Dividing by a positive scalar never changes the predicted class, so accuracy stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

N_BINS = 15


@dataclass
class Calibration:
    """How well confidences match accuracy on one set of images."""

    ece: float  # expected calibration error, |accuracy - confidence| averaged over 15 bins
    nll: float  # mean negative log-likelihood of the true class
    brier: float  # mean squared distance between the probabilities and the one-hot truth

    def to_dict(self) -> dict[str, float]:
        return {"ece": self.ece, "nll": self.nll, "brier": self.brier}


def calibration(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> Calibration:
    """ECE, NLL and Brier score of `logits / temperature` against `targets`."""
    logits = logits.float() / temperature
    probs = logits.softmax(1)
    num_classes = logits.shape[1]
    one_hot = F.one_hot(targets, num_classes).float()
    return Calibration(
        ece=float(multiclass_calibration_error(probs, targets, num_classes, n_bins=N_BINS, norm="l1")),
        nll=float(F.cross_entropy(logits, targets)),
        brier=float(((probs - one_hot) ** 2).sum(1).mean()),
    )


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (L-BFGS over log T)."""
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def plot_reliability(
    logits: torch.Tensor, targets: torch.Tensor, path: str | Path, temperature: float = 1.0, title: str = ""
) -> None:
    """Accuracy against confidence per bin (the reliability diagram), with each bin's share of images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence, predicted = (logits.float() / temperature).softmax(1).max(1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, N_BINS + 1)
    which = torch.bucketize(confidence, edges[1:-1])
    lefts, confidences, accuracy, shares = [], [], [], []
    for b in range(N_BINS):
        members = which == b
        if members.any():
            lefts.append(float(edges[b]))
            confidences.append(float(confidence[members].mean()))
            accuracy.append(float(correct[members].mean()))
            shares.append(float(members.float().mean()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    width = 1 / N_BINS
    ax.bar(lefts, accuracy, width=width, align="edge", alpha=0.7, edgecolor="black", label="accuracy per bin")
    centres = [x + width / 2 for x in lefts]
    ax.scatter(centres, confidences, color="C3", marker="_", s=120, zorder=3, label="mean confidence per bin")
    for x, y, share in zip(centres, accuracy, shares):
        ax.text(x, y + 0.01, f"{share:.0%}", ha="center", fontsize=7)
    result = calibration(logits, targets, temperature)
    ax.set_title(title or f"ECE {result.ece:.3f}, NLL {result.nll:.3f}")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class CalibrationReport:
    """What `clothcli calibrate` fitted and how much it changed, on validation (fitted there) and test."""

    checkpoint: str
    temperature: float
    previous_temperature: float | None
    # split -> {"before": Calibration, "after": Calibration}, on the raw and on the scaled logits
    splits: dict[str, dict[str, Calibration]]
    accuracy: dict[str, float]
    # with an out-of-distribution folder: the stored rejection threshold and what it does, per score
    # the AUROC on the fit split, and the share of each split's images the threshold keeps
    rejection: dict | None = None

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "temperature": self.temperature,
            "previous_temperature": self.previous_temperature,
            "splits": {k: {w: c.to_dict() for w, c in v.items()} for k, v in self.splits.items()},
            "accuracy": self.accuracy,
            "rejection": self.rejection,
        }


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    fit_split: str = "validation",
    report_splits: tuple[str, ...] = ("test",),
    batch_size: int = 64,
    workers: int = 2,
    device: str | None = None,
    write: bool = True,
    ood: str | Path | None = None,
    recall: float = 0.95,
) -> CalibrationReport:
    """Fit the temperature on `fit_split`, report calibration before and after on it and on
    `report_splits` that the dataset has, and store the temperature in the checkpoint (`write`).

    With `ood` (a folder of images that belong to none of the classes), also choose on `fit_split` the
    calibrated top-1 probability that keeps `recall` of its images, store it as the rejection
    threshold that `predict --min-confidence auto` uses, and report what it keeps and rejects."""
    from clothcli.checkpoint import update_meta
    from clothcli.data.layout import find_split_dir
    from clothcli.data.loading import IGNORE_INDEX
    from clothcli.errors import UserError
    from clothcli.evaluation import predict_folder, predict_split
    from clothcli.inference import load_for_inference
    from clothcli.ood import ood_scores, separation
    from clothcli.runtime import make_accelerator, resolve_device

    if find_split_dir(Path(data), fit_split) is None:
        raise UserError(f"{data}: no {fit_split}/ split to fit the temperature on")
    accelerator = make_accelerator("auto", device=resolve_device(device))
    loaded = load_for_inference(checkpoint, accelerator.device, calibrated=False)
    previous = loaded.meta.get("temperature")
    outputs = {}
    for split in (fit_split, *report_splits):
        if split == fit_split or find_split_dir(Path(data), split) is not None:
            out = predict_split(loaded, accelerator, data, split, batch_size, workers)
            keep = out.targets != IGNORE_INDEX
            outputs[split] = (out.logits[keep], out.targets[keep])
    out_logits = predict_folder(loaded, accelerator, ood, batch_size, workers)[0] if ood is not None else None
    accelerator.end_training()
    logits, targets = outputs[fit_split]
    temperature = fit_temperature(logits, targets)
    rejection = None
    if out_logits is not None:
        found = separation(logits, out_logits, temperature, recall)
        threshold = next(r.threshold for r in found if r.score == "msp")
        kept = {split: float((ood_scores(z, temperature)["msp"] >= threshold).float().mean()) for split, (z, _) in
                outputs.items()}  # fmt: skip
        kept["ood"] = float((ood_scores(out_logits, temperature)["msp"] >= threshold).float().mean())
        rejection = {"threshold": threshold, "recall": recall, "kept": kept, "ood_images": len(out_logits),
                     "separation": [r.to_dict() for r in found]}  # fmt: skip
    splits = {
        split: {"before": calibration(z, t), "after": calibration(z, t, temperature)}
        for split, (z, t) in outputs.items()
    }
    accuracy = {split: float((z.argmax(1) == t).float().mean()) for split, (z, t) in outputs.items()}
    if write:
        stored = {"temperature": temperature, "temperature_fitted_on": fit_split}
        if rejection is not None:
            stored.update(ood_threshold=rejection["threshold"], ood_recall=recall)
        update_meta(loaded.directory, **stored)
    return CalibrationReport(str(loaded.directory), temperature, previous, splits, accuracy, rejection)
