"""Strictly local denoisers (``Denoiser.predict(locality="strict")``): the prediction at image token i depends on the
tokens of its radius-r window alone (and the text), exactly; truncated attention (``locality="window"``) does not.

Exactness: masked keys get softmax weight exactly 0 and 0 * v adds nothing, so perturbing tokens outside the window
leaves the center's prediction bit-identical (``torch.equal``) for fp32 on CPU, the same batch shapes both times.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSIFIER, tiny_dit_transformer, tiny_flux_transformer, tiny_pixart_transformer, tiny_sd3_transformer

from critsample.denoisers import PromptCond
from critsample.errors import UserError
from critsample.local_attention import center_blocks, window_blocks
from critsample.models import load
from critsample.models.dit import DiTDenoiser
from critsample.models.flux import FluxDenoiser
from critsample.models.pixart import PixArtDenoiser
from critsample.models.sd3 import SD3Denoiser
from critsample.noise import Schedule


def _prompt(pooled: int, mask: bool = False) -> PromptCond:
    g = torch.Generator().manual_seed(0)
    return PromptCond(torch.randn(1, 5, 32, generator=g), torch.randn(1, pooled, generator=g) if pooled else torch.zeros(1, 0),
                      torch.tensor([[1, 1, 1, 0, 0]]) if mask else None)


FAMILIES = {  # two layers each (FLUX: one double- and one single-stream block), 4 x 4 token grids
    "dit": lambda: (DiTDenoiser(tiny_dit_transformer(num_layers=2), Schedule(kind="ddpm")), torch.tensor([3])),
    "sd3": lambda: (SD3Denoiser(tiny_sd3_transformer()), _prompt(16)),
    "sd3.5": lambda: (SD3Denoiser(tiny_sd3_transformer(dual_attention_layers=(0,), qk_norm="rms_norm")), _prompt(16)),
    "pixart": lambda: (PixArtDenoiser(tiny_pixart_transformer()), _prompt(0, mask=True)),
    "flux": lambda: (FluxDenoiser(tiny_flux_transformer(guidance_embeds=False), sample_size=8), _prompt(16)),
}


def _token(y: torch.Tensor, p: int, i: int, j: int) -> torch.Tensor:
    return y[..., i * p : (i + 1) * p, j * p : (j + 1) * p]


def _perturb_outside(x: torch.Tensor, grid, p: int, i: int, j: int, r: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x2 = x.clone()
    for a in range(grid[0]):
        for b in range(grid[1]):
            if abs(a - i) > r or abs(b - j) > r:
                x2[..., a * p : (a + 1) * p, b * p : (b + 1) * p] += 3 * torch.randn(x.shape[1], p, p, generator=g)
    return x2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_strict_prediction_ignores_tokens_outside_its_window(family):
    model, cond = FAMILIES[family]()
    x = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    p, grid = model.patch_size, model.token_grid
    assert grid == (4, 4)
    for (i, j), r in (((0, 1), 1), ((2, 2), 1), ((1, 1), 0)):
        x2 = _perturb_outside(x, grid, p, i, j, r)
        strict = [_token(model.predict(z, 0.5, cond, radius=r, locality="strict"), p, i, j) for z in (x, x2)]
        window = [_token(model.predict(z, 0.5, cond, radius=r), p, i, j) for z in (x, x2)]
        assert torch.equal(strict[0], strict[1]), (family, i, j, r)
        # two layers of radius r >= 1 read 2r tokens; at r = 0 only joint text attention (SD3, FLUX) carries the
        # other tokens to the center (DiT's and PixArt's r = 0 attention is already strictly local)
        if r >= 1 or family in ("sd3", "sd3.5", "flux"):
            assert (window[0] - window[1]).abs().max() > 1e-5, (family, i, j, r)
    # a radius that covers the grid is the global model (one copy, every key allowed)
    glob = model.predict(x, 0.5, cond)
    assert (model.predict(x, 0.5, cond, radius=3, locality="strict") - glob).abs().max() <= 1e-5


def test_disjoint_windows_in_one_copy_equal_one_copy_per_center():
    """The shared-copy layout of DiT / PixArt (disjoint windows tile the grid) is the one-copy-per-center layout."""
    model, cond = FAMILIES["dit"]()
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
    model, _ = FAMILIES["dit"]()
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
    dit, _ = FAMILIES["dit"]()
    assert [dit.strict_copies((8, 8), r) for r in (None, 0, 1, 2, 4, 7)] == [1, 1, 9, 25, 64, 1]
    sd3 = SD3Denoiser(tiny_sd3_transformer(num_layers=1))
    assert [sd3.strict_copies((8, 8), r) for r in (1, 7)] == [64, 1]


def test_oracle_strict_is_its_exact_local_score():
    oracle = load("gmm-field")
    x = torch.randn(2, *oracle.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, -1])
    assert oracle.strict_copies(oracle.token_grid, 1) == 1
    assert torch.equal(oracle.predict(x, 0.5, cond, radius=1, locality="strict"), oracle.predict(x, 0.5, cond, radius=1))


# -- in the probes: critsample detect --locality both -----------------------------------------------------------------


def _detect(folder, out, *extra) -> list[str]:
    small = ["--gaps.steps", "3", "--gaps.samples", "2", "--gaps.batch", "2", "--gaps.radii", "[1, 2]", "--gaps.trajectories", "[train]",
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
    assert {"locality_gap", "locality_gap_strict", "forward_backward_local", "forward_backward_local_strict"} <= set(s["windows"])
    assert s["locality"] == "both" and s["probes"]["locality_gap"]["strict"]["local_denoiser"] == "strict"
    assert {"instantaneous_strict", "forward_backward_strict"} <= set(s["concurrence"])
    assert {"locality_heatmap_train", "locality_heatmap_strict_train", "forward_backward_strict"} <= set(s["outputs"]["figures"])
    win, strict = np.load(out / "arrays" / "gaps.npz"), np.load(out / "arrays" / "gaps_strict.npz")
    assert np.array_equal(win["train__cond_gap_eps"], strict["train__cond_gap_eps"])  # the same global rows
    # two layers of truncated attention read radius 2 r, the strict denoiser radius r: a larger gap from the global model
    lw, ls = win["train__loc_gap_uncond_eps"], strict["train__loc_gap_uncond_eps"]
    assert (ls > lw).mean() > 0.9, (lw, ls)
    fb = np.load(out / "arrays" / "forward_backward_strict.npz")
    assert fb["error"].shape == (2, 2, 2)
