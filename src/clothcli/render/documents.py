"""Results as documents: Markdown, JSON and CSV files (written atomically), from plain result objects."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a CSV file with a header, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def evaluation_markdown(report: Any) -> str:
    """An evaluation (`engines.evaluate.EvalReport`) as a Markdown document."""
    lines = [
        f"# Evaluation of `{report.arch}` on `{report.folder}`",
        "",
        f"Accuracy: **{report.accuracy:.2%}** [{report.correct}/{report.n}], error rate {report.error_rate:.2%}",
        "",
        "| average | precision | recall | F1 |",
        "|---|---|---|---|",
    ]
    for name, values in report.averages.items():
        lines.append(f"| {name} | {values['precision']:.4f} | {values['recall']:.4f} | {values['f1']:.4f} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for row in report.per_class:
        lines.append(
            f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        )
    classes = report.classes
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for name, row in zip(classes, report.confusion_matrix):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    if report.confused_pairs:
        lines += ["", "Most-confused pairs", "", "| class a | class b | a taken for b | b taken for a | total |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for pair in report.confused_pairs[:10]:
            lines.append(f"| {pair['a']} | {pair['b']} | {pair['a_as_b']} | {pair['b_as_a']} | {pair['total']} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(comparison: Any) -> str:
    """The comparison as a Markdown document: the table, the pairwise tests and the verdict."""
    lines = [
        f"Split `{comparison.split}` of `{comparison.data}`; latency on {comparison.device}, "
        f"{comparison.threads} threads, median of repeated runs, each model through its own runtime, once per "
        "network and format. ◆ on the Pareto front (accuracy against "
        "latency / against MACs). Reference rows were measured elsewhere and are not tested here.",
        "",
        "| model | arch | input | params | GMACs | RF px | accuracy [95% CI] | macro-F1 | ms/img b1 | ms/img b64 "
        "| training | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comparison.rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    if comparison.pairs:
        lines += ["", "| A | B | only A right | only B right | McNemar p |", "|---|---|---|---|---|"]
        for p in comparison.pairs:
            mark = " *" if p.significant else ""
            lines.append(f"| {p.a} | {p.b} | {p.only_a} | {p.only_b} | {p.p_value:.3f}{mark} |")
        lines += ["", f"\\* p < {comparison.pairs[0].level}: the accuracy difference is unlikely to be chance."]
    if comparison.verdict:
        lines += ["", f"**Verdict:** {comparison.verdict}."]
    return "\n".join(lines) + "\n"


def _cells(r: Any) -> list[str]:
    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    accuracy = f"{r.accuracy:.2%}"
    if not r.reference:
        accuracy += f" [{r.correct}/{r.n}] ({r.ci_low:.1%}–{r.ci_high:.1%})"
    training = "reference: " + r.source if r.reference else ""
    if not r.reference and r.train_seconds is not None:
        training = f"{r.train_seconds / 60:.1f} min, {r.recipe}"
    front = "".join(("◆ latency " if r.pareto_latency else "", "◆ MACs" if r.pareto_macs else "")).strip()
    return [
        r.name + (" (reference)" if r.reference else ""),
        r.arch,
        number(r.input_size, "d"),
        "-" if r.params is None else f"{r.params / 1e6:.2f} M",
        number(None if r.macs is None else r.macs / 1e9, ".3f"),
        number(r.receptive_field, "d"),
        accuracy,
        number(None if r.macro_f1 is None else 100 * r.macro_f1, ".2f"),
        number(r.ms_batch1, ".2f"),
        number(r.ms_batch64, ".2f"),
        training,
        front,
    ]


def write_comparison(comparison: Any, path: Path) -> None:
    """The comparison as Markdown, JSON or CSV, by `path`'s extension."""
    kind = path.suffix.lower()
    if kind == ".md":
        atomic_write_text(path, comparison_markdown(comparison))
    elif kind == ".json":
        atomic_write_text(path, json.dumps(comparison.to_dict(), indent=2) + "\n")
    elif kind == ".csv":
        columns = list(asdict(comparison.rows[0]).keys()) if comparison.rows else ["name"]
        write_csv(path, [asdict(r) for r in comparison.rows], columns)
    else:
        raise UserError(f"-o must end in .md, .json or .csv, got '{path.name}'")
