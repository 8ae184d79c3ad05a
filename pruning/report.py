"""Per-layer sparsity report: a JSON-able table, a printable text table, and a bar chart.

The chart (kept fraction against depth) shows where global pruning removes weights: the
paper's observation that early feature-extraction layers keep relatively more.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path

import torch
from torch import nn

from pruning.masks import Masks
from pruning.selection import prunable_parameters
from pruning.atomic_file import write_bytes_atomically


def layer_table(
    model: nn.Module,
    masks: Masks | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[dict]:
    """One row per prunable layer, in model order.

    Args:
        model: the (pruned) model.
        masks: if given, rows are its layers and ``kept`` counts its True entries; otherwise
            rows are the prunable parameters and ``kept`` counts their nonzero weights.
        include, exclude: parameter-name patterns, used when ``masks`` is None.
    Returns:
        list of dicts with ``layer`` (name), ``shape`` (list of ints), ``params``, ``kept``,
        ``kept_pct`` (0..100), all plain Python values.
    """
    if masks is not None:
        counted = {name: (tuple(mask.shape), int(mask.sum())) for name, mask in masks.items()}
    else:
        params = prunable_parameters(model, include, exclude)
        counted = {name: (tuple(p.shape), int(torch.count_nonzero(p.detach()))) for name, p in params.items()}
    rows = []
    for name, (shape, kept) in counted.items():
        numel = 1
        for size in shape:
            numel *= size
        rows.append({
            "layer": name,
            "shape": list(shape),
            "params": numel,
            "kept": kept,
            "kept_pct": 100.0 * kept / numel if numel else 0.0,
        })
    return rows


def table_totals(rows: Sequence[dict]) -> dict:
    """Totals over ``rows``: ``params``, ``kept``, ``kept_pct`` and ``sparsity`` (fraction removed)."""
    params = sum(row["params"] for row in rows)
    kept = sum(row["kept"] for row in rows)
    kept_fraction = kept / params if params else 0.0
    return {"params": params, "kept": kept, "kept_pct": 100.0 * kept_fraction, "sparsity": 1.0 - kept_fraction}


PRUNED_ZERO_FRACTION = 0.2   # more zero prunable weights than this: a pruned model (a trained dense one has ~none)


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of zeros among the model's prunable weights (Conv and Linear, by default)."""
    return table_totals(layer_table(model))["sparsity"]


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table of ``rows`` with a total line."""
    header = ("layer", "shape", "params", "kept", "kept %")
    lines = [
        (row["layer"], "x".join(str(size) for size in row["shape"]), str(row["params"]), str(row["kept"]),
         f"{row['kept_pct']:.2f}")
        for row in rows
    ]
    totals = table_totals(rows)
    lines.append(("total", "", str(totals["params"]), str(totals["kept"]), f"{totals['kept_pct']:.2f}"))
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    def render(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([render(header), rule, *(render(line) for line in lines[:-1]), rule, render(lines[-1])])


def save_kept_fraction_plot(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar chart of each layer's kept fraction against its depth (row order: the n-th prunable layer,
    not the model's layer number), written atomically as PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is set.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise ValueError(f"no layer rows to plot into {path}")
    figure = Figure(figsize=(max(6.0, 0.12 * len(rows)), 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(range(len(rows)), [row["kept_pct"] / 100.0 for row in rows], width=0.8, color="tab:blue")
    axes.set_xlabel("prunable layer, in depth order (its row in the layer table)")
    axes.set_ylabel("kept fraction")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(-0.6, len(rows) - 0.4)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title or f"kept fraction per layer (overall {table_totals(rows)['kept_pct']:.2f}% kept)")
    figure.tight_layout()
    png = BytesIO()
    figure.savefig(png, format="png")
    return write_bytes_atomically(path, png.getvalue())
