"""What a comparison is (rows, pairwise tests) and what it concludes (Pareto fronts, the verdict)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from scipy.stats import binomtest

from clothcli.errors import UserError
from clothcli.names import name_problem

SIGNIFICANCE = 0.05
LATENCY_TIE = 0.05  # relative: closer costs are within timing noise


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval for a proportion `correct / n` (scipy)."""
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: images only A got right, only B got right.
    Under the null hypothesis each discordant image is a fair coin: a two-sided binomial test."""
    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)


@dataclass
class PairTest:
    level: ClassVar[float] = SIGNIFICANCE  # below this p-value a difference is called significant

    a: str
    b: str
    only_a: int  # images A classified correctly and B did not
    only_b: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.level


@dataclass
class ModelRow:
    name: str
    arch: str
    input_size: int | None
    params: int | None
    macs: float | None
    receptive_field: int | None = None
    n: int = 0
    correct: int = 0
    accuracy: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    macro_f1: float | None = None
    ms_batch1: float | None = None
    ms_batch64: float | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    recipe: str = ""
    pareto_latency: bool = False
    pareto_macs: bool = False
    reference: bool = False  # a row from elsewhere (`--reference`), never measured here
    source: str = ""
    cached: bool = False


@dataclass
class Comparison:
    split: str
    data: str
    device: str
    threads: int
    rows: list[ModelRow]
    pairs: list[PairTest] = field(default_factory=list)
    verdict: str = ""
    chosen: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for pair, data in zip(self.pairs, out["pairs"]):
            data["significant"] = pair.significant
        return out


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points, whether each is on the front: no other point is at least as cheap and
    at least as accurate, and better in one of the two."""
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            c <= cost and a >= accuracy and (c < cost or a > accuracy) for j, (c, a) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


def read_references(path: Path) -> list[ModelRow]:
    """Reference rows from a YAML list or a CSV file with columns name, accuracy and optionally arch,
    input_size, params, macs, macro_f1, n, source. They are shown, never measured nor tested against."""
    if not path.is_file():
        raise UserError(f"reference file not found: {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            entries = list(csv.DictReader(fh))
    else:
        import yaml

        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of rows (name, accuracy, ...)")
    rows = []
    for i, entry in enumerate(entries, 1):
        problem = name_problem(str(entry.get("name", ""))) if isinstance(entry, dict) else None
        if problem is not None:
            raise UserError(f"{path}: row {i}: bad name: {problem}")
        try:
            macs = entry.get("macs")
            rows.append(
                ModelRow(
                    name=str(entry["name"]),
                    arch=str(entry.get("arch", "")),
                    input_size=int(entry["input_size"]) if entry.get("input_size") else None,
                    params=int(float(entry["params"])) if entry.get("params") else None,
                    macs=float(macs) if macs not in (None, "") else None,
                    accuracy=float(entry["accuracy"]),
                    macro_f1=float(entry["macro_f1"]) if entry.get("macro_f1") not in (None, "") else None,
                    n=int(entry.get("n") or 0),
                    reference=True,
                    source=str(entry.get("source", "")),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: row {i} needs at least name and accuracy as numbers ({exc})") from None
    return rows


def verdict(rows: list[ModelRow], pairs: list[PairTest], latency: bool) -> tuple[str | None, str]:
    """The cheapest model (latency at batch 1, else MACs) whose accuracy is not significantly below the best."""
    if not rows:
        return None, ""
    best = max(rows, key=lambda r: (r.accuracy, -(r.macs or 0)))
    tests = {(p.a, p.b): p for p in pairs} | {(p.b, p.a): p for p in pairs}
    cost_name = "latency" if latency else "MACs"

    def cost(row: ModelRow) -> float:
        value = row.ms_batch1 if latency else row.macs
        return value if value is not None else math.inf

    candidates = [r for r in rows if r is best or not tests[(r.name, best.name)].significant]
    cheapest = min(cost(r) for r in candidates)
    # costs within LATENCY_TIE of the cheapest count as equal (timing noise): the most accurate of those,
    # then the higher macro-F1
    near = [r for r in candidates if cost(r) <= cheapest * (1 + LATENCY_TIE)]
    chosen = max(near, key=lambda r: (r.accuracy, r.macro_f1 or 0.0, -cost(r)))
    if chosen is best:
        others = [r for r in rows if r is not best]
        if not others:
            return chosen.name, f"{chosen.name}: the only model compared"
        return chosen.name, (
            f"{chosen.name}: the most accurate ({chosen.accuracy:.2%}) is also the cheapest by {cost_name} "
            "among the models not significantly worse"
        )
    test = tests[(chosen.name, best.name)]
    ratio = cost(best) / cost(chosen) if cost(chosen) else math.inf
    return chosen.name, (
        f"{chosen.name}: {chosen.accuracy:.2%} is not significantly below the best, {best.name} "
        f"{best.accuracy:.2%} (McNemar p = {test.p_value:.2f}), at {ratio:.1f}x less {cost_name}"
    )
