"""Tables for the results of evaluate, predict, calibrate, export and compare."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from clothcli.render.console import _fmt_bytes, console, err_console, note, warn


def evaluation(report, normalise: bool = False) -> None:
    """Render the evaluate report: accuracy, averages, per class, confusion matrix."""
    console.print(
        f"[bold]{report.arch}[/] on {report.folder} at {report.preprocess['input_size']} px"
        + (" (with horizontal-flip TTA)" if report.tta_flip else ""),
        highlight=False,
    )
    console.print(
        f"Accuracy: [bold]{report.accuracy:.2%}[/] [{report.correct}/{report.n}]   error rate {report.error_rate:.2%}",
        highlight=False,
    )
    if report.calibration:
        scaled = f" (temperature {report.temperature:.3f})" if report.temperature != 1.0 else " (uncalibrated)"
        console.print(
            f"Calibration{scaled}: ECE {report.calibration['ece']:.4f}, NLL {report.calibration['nll']:.4f}, "
            f"Brier {report.calibration['brier']:.4f}",
            highlight=False,
        )
    if report.ood:
        rejection_scores(report.ood, f"{report.split} against the out-of-distribution folder, at its own threshold")
    stored = report.rejection
    if stored:
        method = stored["method"] + (f" (k={stored['k']})" if stored.get("k") else "")
        outside = f"; accepts {stored['ood_accepted']:.1%} of the out-of-distribution folder" if "ood_accepted" in \
            stored else ""  # fmt: skip
        note(
            f"stored rejection ({method} below {stored['threshold']:.4g}): keeps {stored['kept']:.1%} of {report.split}"
            f"{outside}; accuracy {stored['accuracy_kept']:.2%} on the kept images, {report.accuracy:.2%} on all"
        )
    averages = Table(title="Averages")
    for col in ("average", "precision", "recall", "F1"):
        averages.add_column(col, justify="right" if col != "average" else "left")
    for name, values in report.averages.items():
        averages.add_row(name, f"{values['precision']:.4f}", f"{values['recall']:.4f}", f"{values['f1']:.4f}")
    console.print(averages)
    per_class = Table(title="Per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right" if col != "class" else "left")
    for row in report.per_class:
        per_class.add_row(
            row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])
        )
    console.print(per_class)
    classes = report.classes
    matrix = Table(title="Confusion matrix (rows: true, columns: predicted)" + (" — normalised" if normalise else ""))
    matrix.add_column("")
    for name in classes:
        matrix.add_column(name[:8], justify="right")
    for name, row in zip(classes, report.confusion_matrix):
        total = max(sum(row), 1)
        matrix.add_row(name, *[(f"{v / total:.2f}" if normalise else str(v)) for v in row])
    console.print(matrix)
    confused_pairs(report.confused_pairs)
    if report.cams:
        cam_summary(report.cams)
    if report.unreadable:
        warn(f"{len(report.unreadable)} unreadable image(s) were not evaluated:")
        for item in report.unreadable:
            err_console.print(f"  {item['path']}: {item['reason']}", highlight=False)


def confused_pairs(pairs: list[dict], top: int = 10) -> None:
    """The classes most often taken for each other, both directions counted."""
    if not pairs:
        return
    table = Table(title=f"Most-confused pairs (top {min(top, len(pairs))} of {len(pairs)})")
    for col in ("class a", "class b", "a taken for b", "b taken for a", "total"):
        table.add_column(col, justify="left" if col.startswith("class") else "right")
    for pair in pairs[:top]:
        table.add_row(pair["a"], pair["b"], str(pair["a_as_b"]), str(pair["b_as_a"]), str(pair["total"]))
    console.print(table)


def cam_summary(cams: dict) -> None:
    """Where the overlays went, the layer they were read at, and whether they pass the randomisation check."""
    grid = "x".join(str(v) for v in cams["grid"])
    note(
        f"wrote {cams['written']} {cams['method']} overlays ({cams['mistakes']} mistakes) to {cams['directory']}, "
        f"index {Path(cams['index']).name}; maps read at '{cams['layer']}' ({cams['layer_choice']}, {grid} map)"
    )
    check = cams.get("check")
    if not check:
        return
    table = Table(title=f"Randomisation check of the maps ({check['images']} images, cascading from the head down)")
    for col in ("re-initialised down to", "mean Spearman vs trained", "constant maps"):
        table.add_column(col, justify="left" if col.startswith("re-") else "right")
    for i, step in enumerate(check["steps"]):
        marker = "  <- the map's layer and all above it" if i == check["verdict_step"] else ""
        rho = "-" if step["spearman"] is None else f"{step['spearman']:.3f}"
        table.add_row(step["group"] + marker, rho, str(step["constant_maps"]))
    console.print(table)
    if check["passed"] is None:
        warn(
            f"the randomisation check cannot tell: every map of the trained model is of one value "
            f"({'x'.join(str(v) for v in cams['grid'])} map); name an earlier layer with --cam-layer"
        )
        return
    verdict = "[green]passes[/]" if check["passed"] else "[red]fails[/]"
    left_out = f"; {check['constant_trained']} flat trained maps left out" if check["constant_trained"] else ""
    console.print(
        f"maps of the trained model vs a random one: mean Spearman {check['spearman']:.3f} "
        f"({verdict}: below {check['limit']} says the maps depend on what was learnt{left_out})",
        highlight=False,
    )


def predictions(rows: list, summary, top_k: int) -> None:
    """Results table (first rows), then per-class counts, unreadable files and speed. A process of a sharded
    run other than rank 0 says only what it wrote where."""
    shard = summary.shard
    if shard.world > 1 and shard.rank != 0:
        note(
            f"rank {shard.rank} of {shard.world}: {summary.total} classified into {summary.part} "
            f"in {summary.seconds:.1f}s; rank 0 merges the parts"
        )
        return
    for line in summary.refused[:20]:
        warn(line)
    if len(summary.refused) > 20:
        warn(f"{len(summary.refused) - 20} more input-list entries refused")
    if rows:
        table = Table(
            title=f"Predictions (first {len(rows)} of {summary.total})" if summary.total > len(rows) else "Predictions"
        )
        table.add_column("path", overflow="fold")
        table.add_column("class")
        table.add_column("confidence", justify="right")
        if top_k > 1:
            table.add_column(f"top {top_k}")
        for p in rows:
            if p.error:
                cells = [str(p.path), "[red]unreadable[/]", "", *([p.error] if top_k > 1 else [])]
                if top_k == 1:
                    cells[2] = ""
                table.add_row(*cells)
                continue
            cells = [str(p.path), p.label, f"{p.confidence:.1%}"]
            if top_k > 1:
                cells.append(", ".join(f"{lab} {pr:.0%}" for lab, pr in zip(p.labels, p.probs)))
            table.add_row(*cells)
        console.print(table)
    counts = Table(title="Images per predicted class")
    counts.add_column("class")
    counts.add_column("images", justify="right")
    for label, n in sorted(summary.per_class.items(), key=lambda kv: -kv[1]):
        counts.add_row(label, str(n))
    console.print(counts)
    if summary.errors:
        warn(f"{len(summary.errors)} file(s) could not be read:")
        for path, reason in summary.errors[:50]:
            err_console.print(f"  {path}: {reason}", highlight=False)
    if summary.already_done:
        note(f"{summary.already_done} image(s) were already in the output file and were not classified again")
    note(
        f"{summary.classified} classified, {len(summary.errors)} unreadable, "
        f"{summary.total} in {summary.seconds:.1f}s ({summary.images_per_s:.0f} images/s)"
    )
    if summary.merged_rows is not None:
        note(f"{shard.world} processes' parts merged: {summary.merged_rows} rows, in the order one process writes")


def calibration(report, stored: bool) -> None:
    """Render a `calibration.CalibrationReport`: each split's calibration before and after scaling."""
    table = Table(title=f"Temperature scaling — {report.checkpoint}")
    for col in (
        "split",
        "accuracy",
        "ECE before",
        "ECE after",
        "NLL before",
        "NLL after",
        "Brier before",
        "Brier after",
    ):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, values in report.splits.items():
        before, after = values["before"], values["after"]
        table.add_row(
            split,
            f"{report.accuracy[split]:.2%}",
            f"{before.ece:.4f}",
            f"{after.ece:.4f}",
            f"{before.nll:.4f}",
            f"{after.nll:.4f}",
            f"{before.brier:.4f}",
            f"{after.brier:.4f}",
        )
    console.print(table)
    fitted = next(iter(report.splits))
    where = "stored with the model" if stored else "not stored (--dry-run)"
    note(f"temperature {report.temperature:.4f}, fitted on {fitted}: {where}")
    rejection = report.rejection
    if rejection:
        rejection_scores(rejection["separation"], f"{fitted} against the out-of-distribution folder", chosen=rejection)
        kept = ", ".join(f"{name} {share:.1%}" for name, share in rejection["kept"].items() if name != "ood")
        method = rejection["method"] + (f" (k={rejection['k']})" if rejection.get("k") else "")
        note(
            f"rejection: {method} below {rejection['threshold']:.4f} (keeps {rejection['recall']:.0%} of {fitted}) "
            f"keeps {kept}; accepts {rejection['kept']['ood']:.1%} of the {rejection['ood_images']} "
            "out-of-distribution images. " + ("predict --min-confidence auto uses it." if stored else "")
        )


def rejection_scores(found: list[dict], title: str, chosen: dict | None = None) -> None:
    """One row per out-of-distribution score: AUROC, its threshold at the recall, the false-positive rate."""
    table = Table(title=f"Out-of-distribution scores: {title}")
    for col in ("score", "AUROC", "threshold", "recall", "OOD accepted"):
        table.add_column(col, justify="left" if col == "score" else "right")
    picked = None if chosen is None else chosen["method"] + (f"@{chosen['k']}" if chosen.get("k") else "")
    for r in found:
        mark = " (chosen)" if r["score"] == picked else ""
        table.add_row(r["score"] + mark, f"{r['auroc']:.4f}", f"{r['threshold']:.4g}", f"{r['recall']:.1%}",
                      f"{r['fpr']:.1%}")  # fmt: skip
    console.print(table)


def export_report(report) -> None:
    """Render `export_onnx` output: the file, the verification and, with --int8, both accuracies."""
    check = report.verification
    verdict = "[green]passed[/]" if check.passed else "[red]FAILED[/]"
    runtime = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch"}.get(check.runtime)
    console.print(
        f"{runtime} against PyTorch on {check.images} images ({check.source}): largest logit difference "
        f"{check.max_abs_diff:.2e} (allowed {check.allowed_diff:.1e}), top-1 agreement {check.top1_agreement:.2%}"
        + (f" ({check.near_ties} near-ties)" if check.near_ties else "")
        + ": "
        + verdict,
        highlight=False,
    )
    if not check.passed:
        err_console.print(f"[red]not written:[/] {report.path}")
        return
    graph = "XNNPACK" if check.runtime == "executorch" else f"opset {report.opset}"
    table = Table(title=f"{report.arch} at {report.input_size} px, {graph}")
    for col in ("file", "size", "accuracy"):
        table.add_column(col, justify="left" if col == "file" else "right")
    int8 = report.int8
    table.add_row(report.path, _fmt_bytes(report.bytes), f"{int8.fp32_accuracy:.2%}" if int8 else "-")
    if int8:
        table.add_row(int8.path, _fmt_bytes(int8.bytes), f"{int8.int8_accuracy:.2%}")
    console.print(table)
    if int8:
        note(
            f"int8: calibrated on {int8.calibration_images} training images"
            + (f", fine-tuned quantization-aware ({int8.qat_epochs} epochs)" if int8.qat_epochs else "")
            + f"; accuracy on {int8.images} images of "
            f"{int8.folder}; int8 agrees with fp32 on {int8.top1_agreement:.2%} of them"
        )
    note(f"exported in {report.seconds:.1f}s" + (f", int8 in {report.int8.seconds:.1f}s" if report.int8 else ""))


def comparison(result) -> None:
    """Render `compare_runs` output: one row per model, the pairwise tests, the verdict."""
    table = Table(
        title=f"{result.split} split of {result.data} — latency on {result.device}, {result.threads} threads",
        caption="95% Wilson interval; front: on the Pareto front of accuracy against latency (L) / MACs (M)",
    )
    for col in ("model", "px", "params", "GMACs", "RF", "accuracy", "95% CI", "F1", "ms b1", "ms b64", "train",
                "front"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "front") else "right")

    def fmt(value, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale if scale != 1.0 else value, spec)

    for r in result.rows:
        table.add_row(
            r.name + (" (ref.)" if r.reference else ""),
            fmt(r.input_size, "d"),
            fmt(r.params, ".2f", 1e6) + ("M" if r.params else ""),
            fmt(r.macs, ".3f", 1e9),
            fmt(r.receptive_field, "d"),
            f"{r.accuracy:.2%}" + ("" if r.reference else f" {r.correct}/{r.n}"),
            "-" if r.reference else f"{r.ci_low:.1%}–{r.ci_high:.1%}",
            fmt(None if r.macro_f1 is None else 100 * r.macro_f1, ".2f"),
            fmt(r.ms_batch1, ".2f"),
            fmt(r.ms_batch64, ".2f"),
            "-" if r.train_seconds is None else f"{r.train_seconds / 60:.1f}m",
            ("L" if r.pareto_latency else "") + ("M" if r.pareto_macs else ""),
            style="dim" if r.reference else None,
        )
    console.print(table)
    if result.pairs:
        pairs = Table(title="McNemar's exact test on the same images (bold: p < 0.05)")
        for col in ("A", "B", "only A right", "only B right", "p"):
            pairs.add_column(col, justify="left" if col in ("A", "B") else "right")
        for p in result.pairs:
            value = f"{p.p_value:.3f}"
            pairs.add_row(p.a, p.b, str(p.only_a), str(p.only_b), f"[bold]{value}[/]" if p.significant else value)
        console.print(pairs)
    cached = [r.name for r in result.rows if r.cached]
    if cached:
        note("evaluation reused from the cache for: " + ", ".join(cached))
    if result.verdict:
        console.print(f"[bold]Verdict:[/] {result.verdict}", highlight=False)


def benchmark(report) -> None:
    """`clothcli benchmark`: one row per format, then the decode-only ceiling and decode plus preprocessing."""
    table = Table(title=f"Formats on {report.split} of {report.data} ({report.threads} threads)")
    for col in ("format", "size", "accuracy", "agrees", "McNemar p", "ms b1", "img/s b64", "predict img/s"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in report.rows:
        table.add_row(
            r.name, "-" if r.bytes is None else _fmt_bytes(r.bytes), f"{r.accuracy:.2%}", f"{r.agreement:.2%}",
            f"{r.p_value:.3f}", f"{r.ms_batch1:.2f}", f"{r.images_per_s_batch64:.0f}", f"{r.predict_images_per_s:.0f}",
        )  # fmt: skip
    table.add_row("decode only", "", "", "", "", "", "", f"{report.decode_images_per_s:.0f}")
    table.add_row("decode and preprocess", "", "", "", "", "", "", f"{report.preprocess_images_per_s:.0f}")
    console.print(table)


def fold_comparison(found) -> None:
    """Fold groups side by side: each one's held-out accuracy per fold, then the pairwise tests."""
    table = Table(title=f"Fold groups ({found.groups[0].folds} folds, the same held-out images)")
    for col in ("group", "model", "accuracy per fold", "mean ± std", "macro-F1 mean"):
        table.add_column(col, justify="left" if col in ("group", "model") else "right")
    for g in found.groups:
        per_fold = " ".join(f"{a:.1%}" for a in g.accuracies)
        table.add_row(
            g.name, g.model, per_fold, f"{g.mean:.2%} ± {g.std:.2%}", f"{sum(g.macro_f1) / len(g.macro_f1):.4f}"
        )
    console.print(table)
    tests = Table(title=f"Pairs: {found.test}")
    for col in ("a", "b", "mean difference (a - b)", "t", "p", "verdict"):
        tests.add_column(col, justify="left" if col in ("a", "b", "verdict") else "right")
    for p in found.pairs:
        verdict = "[bold]different[/]" if p.significant else "not significantly different"
        tests.add_row(p.a, p.b, f"{p.mean_difference:+.2%}", f"{p.statistic:.2f}", f"{p.p_value:.3g}", verdict)
    console.print(tests)
