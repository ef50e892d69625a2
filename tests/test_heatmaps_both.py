"""``--locality both``: the window and strict locality-gap heatmaps side by side under one log colour scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from critsample import report


def test_shared_log_range_spans_every_panel():
    a = np.array([[0.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.5, 8.0], [-1.0, 1.0]])
    assert report.shared_log_range([a, b]) == (0.5, 8.0)
    assert report.shared_log_range([a]) == (2.0, 4.0)
    assert report.shared_log_range([np.zeros((2, 2)), np.full((2, 2), 3.0)]) is None  # one positive value: no log range


def test_plot_heatmaps_one_norm_for_both_panels(tmp_path, monkeypatch):
    t, radii = np.linspace(0.05, 0.95, 6), [1, 2, 4]
    window = np.outer(np.linspace(1, 2, 6), [1e-3, 1e-2, 1e-1])  # (T, R)
    strict = 10 * window
    plt = report._plt()
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to inspect it
    path = report.plot_heatmaps(t, radii, {"window": window, "strict": strict}, tmp_path / "both.png", title="both",
                                label="gap")
    assert path == tmp_path / "both.png" and Image.open(path).size[0] > Image.open(path).size[1]
    (fig,) = figs
    meshes = [ax.collections[0] for ax in fig.axes[:2]]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["window", "strict"] and len(meshes) == 2
    assert meshes[0].norm is meshes[1].norm
    assert (meshes[0].norm.vmin, meshes[0].norm.vmax) == pytest.approx((window.min(), strict.max()))
    # the single heatmap keeps its own range
    report.plot_heatmap(t, radii, window, tmp_path / "one.png", title="one")
    assert figs[1].axes[0].collections[0].norm.vmax == pytest.approx(window.max())


def test_detect_both_draws_the_side_by_side_heatmap(tiny_folder, tmp_path):
    from critsample.cli import main

    folder = tiny_folder
    out = tmp_path / "run"
    args = ["detect", "--model", str(folder), "--preset", "fast", "--gaps.steps", "3", "--gaps.samples", "2",
            "--gaps.batch", "2",
            "--gaps.radii", "[1, 2]", "--gaps.trajectories", "[train]", "--probes", "[locality_gap]", "--out", str(out),
            "--no-wandb"]

    def figures():
        return json.loads((out / "summary.json").read_text())["outputs"]["figures"]

    assert main([*args, "--locality", "window"]) == 0
    assert "locality_heatmap_train" in figures() and not any("both" in k for k in figures())
    assert not (out / "figures" / "locality_heatmap_both_train.png").exists()
    assert main([*args, "--locality", "both"]) == 0  # same folder: the window units load, the strict ones run
    figs = figures()
    assert {"locality_heatmap_train", "locality_heatmap_strict_train"} <= set(figs)
    assert figs["locality_heatmap_both_train"] == "figures/locality_heatmap_both_train.png"
    assert (out / "figures" / "locality_heatmap_both_train.png").stat().st_size > 0
    assert "![locality_heatmap_both_train](figures/locality_heatmap_both_train.png)" in (out / "report.md").read_text()
