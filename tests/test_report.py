"""Per-layer report: table numbers, JSON, printed table, PNG chart written atomically."""
from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from torch import nn

from pruning import Masks, format_table, layer_table, magnitude_prune, save_kept_fraction_plot, table_totals


def pruned_model() -> tuple[nn.Module, Masks]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6, 2))
    return model, magnitude_prune(model, 0.5, scope="uniform")


def test_rows_count_kept_weights_from_masks_and_from_the_model():
    model, masks = pruned_model()
    rows = layer_table(model, masks)
    assert rows == [
        {"layer": "0.weight", "shape": [4, 3, 3, 3], "params": 108, "kept": 54, "kept_pct": 50.0},
        {"layer": "2.weight", "shape": [6, 4, 1, 1], "params": 24, "kept": 12, "kept_pct": 50.0},
        {"layer": "4.weight", "shape": [2, 6], "params": 12, "kept": 6, "kept_pct": 50.0},
    ]
    with torch.no_grad():
        model[4].weight[0].zero_()                               # one more row of zeros, not in the masks
    from_model = layer_table(model)
    assert [row["kept"] for row in from_model] == [54, 12, int(torch.count_nonzero(model[4].weight))]
    assert json.loads(json.dumps(from_model)) == from_model
    assert table_totals(rows) == {"params": 144, "kept": 72, "kept_pct": 50.0, "sparsity": 0.5}


def test_format_table_lists_every_layer_and_the_total():
    model, masks = pruned_model()
    text = format_table(layer_table(model, masks))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "shape", "params", "kept", "kept", "%"]
    assert lines[2].split() == ["0.weight", "4x3x3x3", "108", "54", "50.00"]
    assert lines[-1].split() == ["total", "144", "72", "50.00"]
    assert len(lines) == 3 + 3 + 1                               # header, 2 rules, 3 rows, total


def test_plot_writes_a_png_atomically_without_touching_the_global_backend(tmp_path):
    model, masks = pruned_model()
    backend = matplotlib.get_backend()
    path = save_kept_fraction_plot(layer_table(model, masks), tmp_path / "plots" / "kept.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["kept.png"]
    assert matplotlib.get_backend() == backend
    with pytest.raises(ValueError, match="no layer rows to plot"):
        save_kept_fraction_plot([], tmp_path / "empty.png")
