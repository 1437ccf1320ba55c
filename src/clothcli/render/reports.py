"""Tables for the results of analyze-data, evaluate, predict, flops and rf."""

from __future__ import annotations

from rich.table import Table

from clothcli.render.console import _fmt_bytes, _relative, console, err_console, note, warn


def analysis(result) -> None:
    """Render `analyze_dataset` output."""
    classes = result.classes
    splits = result.splits
    table = Table(title=f"Images per class — {result.root}")
    table.add_column("class")
    for name in splits:
        table.add_column(name, justify="right")
    table.add_column("train weight", justify="right")
    weights = result.balance["class_weights"]
    for i, cls in enumerate(classes):
        cells = [f"{splits[s]['classes'][cls]} ({splits[s]['shares'][cls]:.1%})" for s in splits]
        table.add_row(cls, *cells, f"{weights[i]:.2f}")
    table.add_section()
    table.add_row("total", *[str(splits[s]["total"]) for s in splits], "")
    table.add_row(
        "imbalance (max/min)",
        *[f"{splits[s]['imbalance_ratio']:.2f}" if splits[s]["imbalance_ratio"] else "-" for s in splits],
        "",
    )
    console.print(table)

    images = result.images
    props = Table(title="Image properties", show_header=False)
    props.add_column("property")
    props.add_column("value")
    top_sizes = list(images["sizes"].items())[:5]
    props.add_row("most common sizes (WxH)", ", ".join(f"{s} ×{n}" for s, n in top_sizes) or "-")
    props.add_row("distinct sizes", str(len(images["sizes"])))
    for key in ("width", "height"):
        d = images[key]
        if d:
            props.add_row(key, f"min {d['min']}, median {d['median']:.0f}, max {d['max']}")
    aspect = images["aspect_ratio"]
    if "min" in aspect:
        bins = ", ".join(f"{k} {v}" for k, v in aspect["bins"].items())
        props.add_row(
            "aspect ratio (W/H)",
            f"min {aspect['min']:.2f}, median {aspect['median']:.2f}, max {aspect['max']:.2f}; {bins}",
        )
    props.add_row("modes", ", ".join(f"{k} {v}" for k, v in images["modes"].items()) or "-")
    props.add_row("formats", ", ".join(f"{k} {v}" for k, v in images["formats"].items()) or "-")
    fb = images["file_bytes"]
    if "min" in fb:
        props.add_row(
            "file size",
            f"min {_fmt_bytes(fb['min'])}, median {_fmt_bytes(fb['median'])}, "
            f"max {_fmt_bytes(fb['max'])}, total {_fmt_bytes(fb['total'])}",
        )
    console.print(props)

    skipped = [s for split in splits.values() for s in split["skipped"]]
    if skipped:
        console.print(
            f"[yellow]{len(skipped)} file(s) skipped[/] (hidden or not images): "
            + ", ".join(sorted({s["reason"] for s in skipped}))
        )
    if result.unreadable:
        bad = Table(title=f"Unreadable files ({len(result.unreadable)})")
        bad.add_column("path")
        bad.add_column("reason")
        for item in result.unreadable:
            bad.add_row(_relative(item["path"], result.root), item["reason"])
        console.print(bad)
    else:
        console.print(
            "[green]no unreadable files[/]"
            + ("" if result.deep else " (headers and end markers checked; --deep decodes every image)")
        )
    dups = result.duplicates
    if dups:
        table = Table(title=f"Duplicate groups ({len(dups)})")
        table.add_column("kind")
        table.add_column("splits")
        table.add_column("labels")
        table.add_column("files", overflow="fold")
        for group in dups:
            flags = []
            if group["cross_split"]:
                flags.append("[red]leak across splits[/]")
            if group["conflicting_labels"]:
                flags.append("[red]conflicting labels[/]")
            table.add_row(
                group["kind"] + ("\n" + "\n".join(flags) if flags else ""),
                ", ".join(group["splits"]),
                ", ".join(group["labels"]),
                "\n".join(_relative(p, result.root) for p in group["paths"]),
            )
        console.print(table)
    else:
        console.print("[green]no duplicates found[/]")
    for message in result.warnings:
        warn(message)


def evaluation(report, normalize: bool = False) -> None:
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
        ood = Table(title="Out-of-distribution images told apart (higher score: more like the classes)")
        for col in ("score", "AUROC", "threshold", "split images kept", "other images accepted (FPR)"):
            ood.add_column(col, justify="left" if col == "score" else "right")
        for row in report.ood:
            name = {"msp": "max softmax probability", "energy": "energy"}[row["score"]]
            ood.add_row(
                name, f"{row['auroc']:.4f}", f"{row['threshold']:.4f}", f"{row['recall']:.1%}", f"{row['fpr']:.1%}"
            )
        console.print(ood)
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
    matrix = Table(title="Confusion matrix (rows: true, columns: predicted)" + (" — normalised" if normalize else ""))
    matrix.add_column("")
    for name in classes:
        matrix.add_column(name[:8], justify="right")
    for name, row in zip(classes, report.confusion_matrix):
        total = max(sum(row), 1)
        matrix.add_row(name, *[(f"{v / total:.2f}" if normalize else str(v)) for v in row])
    console.print(matrix)
    if report.unreadable:
        warn(f"{len(report.unreadable)} unreadable image(s) were not evaluated:")
        for item in report.unreadable:
            err_console.print(f"  {item['path']}: {item['reason']}", highlight=False)


def predictions(rows: list, summary, top_k: int) -> None:
    """Results table (first rows), then per-class counts, unreadable files and speed."""
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


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def flops(report) -> None:
    """Per-layer table, totals and the conventions behind them."""
    c, h, w = report.input_size
    table = Table(title=f"{report.model} — {c}x{h}x{w}, per layer")
    for col, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("output", "left"),
        ("MACs", "right"),
        ("params", "right"),
        ("share", "right"),
    ):
        table.add_column(col, justify=justify)
    for row in report.layers:
        indent = "  " * row.name.count(".")
        shape = "x".join(str(v) for v in row.output_shape[1:]) if row.output_shape else "-"
        table.add_row(indent + row.name, row.type, shape, _si(row.macs), _si(row.params), f"{row.share:.1%}")
    console.print(table)
    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("MACs (conv + linear + attention matmuls)", f"{report.macs / 1e9:.3f} G")
    totals.add_row("  of which thop conv + linear", f"{report.thop_macs / 1e9:.3f} G")
    totals.add_row("  of which attention matmuls", f"{report.attention_macs / 1e9:.3f} G")
    totals.add_row("FLOPs = 2 x MACs", f"{2 * report.macs / 1e9:.3f} G")
    totals.add_row("FlopCounterMode FLOPs (cross-check)", f"{report.flop_counter_flops / 1e9:.3f} G")
    totals.add_row("complete FLOPs (+ norm, activations, elementwise, pooling)", f"{report.flops_complete / 1e9:.3f} G")
    totals.add_row("parameters", f"{report.params / 1e6:.3f} M")
    totals.add_row("model size (fp32 params + buffers)", f"{report.size_mb:.2f} MB")
    for key, value in report.latency.items():
        totals.add_row(key.replace("_", " "), f"{value:.2f} ms")
    console.print(totals)
    console.print(
        "[dim]MACs follow torchvision's published convention (weights.meta['_ops']): conv and linear "
        "multiply-accumulates, bias excluded, plus attention matrix products. Complete FLOPs: 2 per MAC, "
        "1 per element for elementwise ops and activations, 2 for normalisation, 1 per input element for "
        "pooling/reductions, 3 for softmax.[/]"
    )


def receptive_fields(report, depth: int, check: dict | None) -> None:
    """Per-layer receptive fields, the overall field, merges and the optional empirical check."""
    c, h, w = report.input_size
    table = Table(title=f"{report.model} — receptive fields at {c}x{h}x{w}")
    for col in ("layer", "type", "output", "RF (h x w)", "stride", "eff. padding", "global context"):
        table.add_column(col, overflow="fold")

    def pair(v, fmt="{:g}") -> str:
        if v is None:
            return "-"
        return fmt.format(v[0]) if v[0] == v[1] else f"{fmt.format(v[0])} x {fmt.format(v[1])}"

    announced: set[str] = set()
    for row in report.layers:
        if row.name.count(".") >= depth:
            continue
        shape = "x".join(str(v) for v in row.output_shape[1:]) or "-"
        context = ""
        if row.global_from:
            context = "global" if row.global_from in announced else f"global from {row.global_from}"
            announced.add(row.global_from)
        table.add_row(
            "  " * row.name.count(".") + row.name,
            row.type,
            shape,
            pair(row.rf),
            pair(row.stride),
            pair(row.padding),
            context,
        )
    console.print(table)
    out = report.output
    if out is not None:
        console.print(
            f"Overall (last feature map, [bold]{out.name}[/]): receptive field [bold]{pair(out.rf)} px[/], "
            f"effective stride {pair(out.stride)}, effective padding {pair(out.padding)}",
            highlight=False,
        )
        if out.global_from:
            console.print(
                f"Global context from [bold]{out.global_from}[/] on: every unit after it sees the whole "
                f"input; the field above is the local one, with those global branches ignored.",
                highlight=False,
            )
    console.print(
        f"{len(report.merges)} merges (add/multiply/concatenate); "
        + ("[green]all aligned[/]" if not report.misaligned else f"[red]{len(report.misaligned)} misaligned[/]")
    )
    for merge in report.misaligned:
        warn(f"misaligned {merge.op} in {merge.layer}: {merge.detail}")
    for item in report.unsupported:
        warn(f"approximated: {item}")
    if check is not None:
        colour = "green" if check["match"] else "red"
        console.print(
            f"[{colour}]verify[/]: centre unit {tuple(check['unit'])} of {check['layer']} at input "
            f"{check['input_size'][1]}px — gradient spans rows {tuple(check['empirical'][0])}, cols "
            f"{tuple(check['empirical'][1])}; analytic rows {tuple(check['analytic'][0])}, cols "
            f"{tuple(check['analytic'][1])}: {'match' if check['match'] else 'MISMATCH'}",
            highlight=False,
        )


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
    where = "stored in the checkpoint" if stored else "not stored (--dry-run)"
    note(f"temperature {report.temperature:.4f}, fitted on {fitted}: {where}")
    rejection = report.rejection
    if rejection:
        kept = ", ".join(f"{name} {share:.1%}" for name, share in rejection["kept"].items() if name != "ood")
        aurocs = ", ".join(f"{r['score']} {r['auroc']:.4f}" for r in rejection["separation"])
        note(
            f"rejection threshold {rejection['threshold']:.4f} (calibrated top-1 probability, keeps "
            f"{rejection['recall']:.0%} of {fitted}): keeps {kept}; accepts {rejection['kept']['ood']:.1%} of the "
            f"{rejection['ood_images']} out-of-distribution images. AUROC on {fitted}: {aurocs}. "
            + ("predict --min-confidence auto uses it." if stored else "")
        )


def label_issues(found, top: int) -> None:
    """Render `label_issues.LabelIssues`: the most suspicious images first."""
    table = Table(title=f"Suspected label errors ({len(found.issues)} of {found.images} images; first {top})")
    for col in ("path", "split", "given", "suggested", "quality"):
        table.add_column(col, justify="right" if col == "quality" else "left", overflow="fold")
    for issue in found.issues[:top]:
        path = _relative(issue["path"], found.root)
        table.add_row(path, issue["split"], issue["given"], issue["suggested"], f"{issue['quality']:.3g}")
    console.print(table)
    seconds = found.seconds
    note(
        f"backbone {found.backbone}; {found.folds}-fold out-of-sample accuracy {found.out_of_sample_accuracy:.1%}; "
        f"embedding {seconds['embedding']:.1f}s, cross-validation {seconds['cross_validation']:.1f}s, "
        f"cleanlab {seconds['cleanlab']:.1f}s"
    )
    if found.unreadable:
        warn(f"{len(found.unreadable)} unreadable image(s) were left out")


def split_fix(fixed) -> None:
    """Render `fix_split.SplitFix`: what moved, what was left out, where the new dataset is."""
    if fixed.moved:
        table = Table(title=f"Moved to keep each duplicate group in one split ({len(fixed.moved)})")
        table.add_column("from", overflow="fold")
        table.add_column("to", overflow="fold")
        table.add_column("kind")
        for move in fixed.moved:
            table.add_row(move["source"], move["destination"], move["kind"])
        console.print(table)
    if fixed.left_out:
        warn(f"{len(fixed.left_out)} file(s) left out: duplicates whose labels disagree (--keep-conflicts keeps them)")
        for item in fixed.left_out:
            err_console.print(f"  {item['source']} ({item['labels']})", highlight=False)
    linked = "hard links" if fixed.hard_links == fixed.files else f"{fixed.hard_links} hard links, the rest copies"
    note(f"wrote {fixed.files} files to {fixed.out} ({linked}); manifest: {fixed.manifest}")


def export_report(report) -> None:
    """Render `export_onnx` output: the file, the verification and, with --int8, both accuracies."""
    check = report.verification
    verdict = "[green]passed[/]" if check.passed else "[red]FAILED[/]"
    console.print(
        f"ONNX Runtime against PyTorch on {check.images} images ({check.source}): largest logit difference "
        f"{check.max_abs_diff:.2e} (allowed {check.allowed_diff:.1e}), top-1 agreement {check.top1_agreement:.2%}"
        + (f" ({check.near_ties} near-ties)" if check.near_ties else "")
        + ": "
        + verdict,
        highlight=False,
    )
    if not check.passed:
        err_console.print(f"[red]not written:[/] {report.path}")
        return
    table = Table(title=f"{report.arch} at {report.input_size} px, opset {report.opset}")
    for col in ("file", "size", "accuracy"):
        table.add_column(col, justify="left" if col == "file" else "right")
    int8 = report.int8
    table.add_row(report.path, _fmt_bytes(report.bytes), f"{int8.fp32_accuracy:.2%}" if int8 else "-")
    if int8:
        table.add_row(int8.path, _fmt_bytes(int8.bytes), f"{int8.int8_accuracy:.2%}")
    console.print(table)
    if int8:
        note(
            f"int8: calibrated on {int8.calibration_images} training images; accuracy on {int8.images} images of "
            f"{int8.folder}; int8 agrees with fp32 on {int8.top1_agreement:.2%} of them"
        )
    note(f"exported in {report.seconds:.1f}s")


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
