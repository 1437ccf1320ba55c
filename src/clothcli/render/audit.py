"""Tables for the dataset audit (analyze-data) and its repairs: label issues, the fixed split."""

from __future__ import annotations

from rich.table import Table

from clothcli.render.console import _fmt_bytes, _relative, console, err_console, note, warn


def analysis(result) -> None:
    """Render `audit_dataset` output: counts, image properties, then what is wrong."""
    _counts(result)
    _properties(result.images)
    _problems(result)


def _counts(result) -> None:
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


def _properties(images: dict) -> None:
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


def _problems(result) -> None:
    splits = result.splits
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
    if result.image_issues is not None:
        _image_issues(result.image_issues, result.root)
    for message in result.warnings:
        warn(message)


ISSUE_NAMES = {
    "dark": "dark",
    "blurry": "blurry",
    "low_information": "low information",
    "odd_size": "odd size",
    "odd_aspect_ratio": "odd aspect ratio",
}


def _image_issues(found: dict, root: str, shown: int = 10) -> None:
    """cleanvision's flagged images per issue type, the worst `shown` of each (score 0 worst, 1 best)."""
    if not found["flagged"]:
        console.print(f"[green]no image-quality issues[/] among {found['checked']} images (cleanvision)")
        return
    table = Table(title=f"Image-quality issues: {found['flagged']} of {found['checked']} images (cleanvision)")
    for col in ("issue", "images", "worst (score: 0 worst, 1 best)"):
        table.add_column(col, overflow="fold")
    for name, items in found["found"].items():
        if not items:
            continue
        worst = "\n".join(f"{_relative(i['path'], root)} ({i['score']:.2f})" for i in items[:shown])
        more = f"\n... and {len(items) - shown} more" if len(items) > shown else ""
        table.add_row(ISSUE_NAMES.get(name, name), str(len(items)), worst + more)
    console.print(table)


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
