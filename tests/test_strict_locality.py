"""Strictly local denoisers (``Denoiser.predict(locality="strict")``): the prediction at image token i depends on the
tokens of its radius-r window alone (and the text), exactly; truncated attention (``locality="window"``) does not.

Exactness: masked keys get softmax weight exactly 0 and 0 * v adds nothing, so perturbing tokens outside the window
leaves the center's prediction bit-identical (``torch.equal``) for fp32 on CPU, the same batch shapes both times. That
is checked for every family in test_denoiser_contract.py; here: the copy layouts, per-row radii, chunks, and detect.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSIFIER, tiny_dit_transformer, tiny_sd3_transformer

from critsample.errors import UserError
from critsample.local_attention import center_blocks, window_blocks
from critsample.models.dit import DiTDenoiser
from critsample.models.sd3 import SD3Denoiser
from critsample.noise import Schedule


def _dit():
    """Two layers on a 4 x 4 token grid."""
    return DiTDenoiser(tiny_dit_transformer(num_layers=2), Schedule(kind="ddpm")), torch.tensor([3])


def test_disjoint_windows_in_one_copy_equal_one_copy_per_center():
    """The shared-copy layout of DiT / PixArt (disjoint windows tile the grid) is the one-copy-per-center layout."""
    model, cond = _dit()
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(2))
    c = cond.repeat(3)
    shared = model.predict(x, 0.3, c, radius=1, locality="strict")
    model.strict_layout = "center"
    try:
        per_center = model.predict(x, 0.3, c, radius=1, locality="strict")
    finally:
        model.strict_layout = "blocks"
    assert (shared - per_center).abs().max() <= 1e-5


def test_strict_rows_chunks_and_guidance_agree():
    """Per-row radii, guidance and chunked copies give the same rows as one radius at a time."""
    model, _ = _dit()
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(3, *model.sample_shape, generator=g), torch.tensor([1, 2, -1])
    rows = model.predict(x, 0.4, cond, radius=torch.tensor([0, 1, 2]), guidance=2.0, locality="strict", max_batch=5)
    for b, r in enumerate((0, 1, 2)):
        one = model.predict(x[b : b + 1], 0.4, cond[b : b + 1], radius=r, guidance=2.0, locality="strict")
        assert (rows[b] - one[0]).abs().max() <= 1e-5
    with pytest.raises(UserError, match="locality"):
        model.predict(x, 0.4, cond, radius=1, locality="crop")


def test_strict_copies_and_layouts():
    blocks, copy = window_blocks(5, 4, 1)
    assert blocks.shape == (9, 20)
    for n in range(20):  # every token is the center of its copy's block, and that block is its truncated window
        assert torch.equal(blocks[copy[n]] == blocks[copy[n], n], center_blocks(5, 4, 1)[n] == 0)
    dit, _ = _dit()
    assert [dit.strict_copies((8, 8), r) for r in (None, 0, 1, 2, 4, 7)] == [1, 1, 9, 25, 64, 1]
    sd3 = SD3Denoiser(tiny_sd3_transformer(num_layers=1))
    assert [sd3.strict_copies((8, 8), r) for r in (1, 7)] == [64, 1]


# -- in the probes: critsample detect --locality both -----------------------------------------------------------------


def _detect(folder, out, *extra) -> list[str]:
    small = ["--gaps.steps", "3", "--gaps.samples", "2", "--gaps.batch", "2", "--gaps.radii", "[1, 2]",
             "--gaps.trajectories", "[train]",
             "--fb.num_t", "2", "--fb.samples", "2", "--fb.steps", "3", "--fb.batch", "2", "--fb.radii", "[1]"]
    return ["detect", "--model", str(folder), "--preset", "fast", *small, "--classifier", CLASSIFIER,
            "--probes", "[cond_gap, locality_gap, forward_backward]", "--out", str(out), "--no-wandb", *extra]


def test_detect_locality_both(tiny_folder, tmp_path, capsys):
    import json
    import re

    import numpy as np

    from critsample.cli import main

    out = tmp_path / "run"
    assert main(_detect(tiny_folder, out, "--locality", "both", "--dry-run")) == 0
    text = capsys.readouterr().out
    # window units: 2 samples x 3 times x 2 (cond, null) x (1 + 2 radii) = 36; strict: 9 copies at radius 1, 25 at
    # radius 2: 2 x 3 x 2 x (1 + 9 + 25) = 420
    assert re.search(r"gaps\s+2 units\s+456 model evaluations", text) and "r=1: 9, r=2: 25" in text, text
    assert main(_detect(tiny_folder, out, "--locality", "both")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert {"locality_gap", "locality_gap_strict", "forward_backward_local",
            "forward_backward_local_strict"} <= set(s["windows"])
    assert s["locality"] == "both" and s["probes"]["locality_gap"]["strict"]["local_denoiser"] == "strict"
    assert "instantaneous_strict" in s["concurrence"] and "forward_backward_strict" not in s["concurrence"]
    assert [r["radius"] for r in s["forward_backward_excess"]["forward_backward_local_strict"]] == [1]
    assert {"locality_heatmap_train", "locality_heatmap_strict_train",
            "forward_backward_strict"} <= set(s["outputs"]["figures"])
    win, strict = np.load(out / "arrays" / "gaps.npz"), np.load(out / "arrays" / "gaps_strict.npz")
    assert np.array_equal(win["train__cond_gap_eps"], strict["train__cond_gap_eps"])  # the same global rows
    # two layers of truncated attention read radius 2 r, the strict denoiser radius r: a larger gap from the global
    # model
    lw, ls = win["train__loc_gap_uncond_eps"], strict["train__loc_gap_uncond_eps"]
    assert (ls > lw).mean() > 0.9, (lw, ls)
    fb = np.load(out / "arrays" / "forward_backward_strict.npz")
    assert fb["error"].shape == (2, 2, 2)
