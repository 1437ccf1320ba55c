"""Tables for what a network costs: MACs and parameters (flops), receptive fields (rf)."""

from __future__ import annotations

from rich.table import Table

from clothcli.render.console import console, warn


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
