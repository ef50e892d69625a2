"""The bundled dit-fashion (issue 25): a class DiT on Fashion-MNIST whose 16 x 16 token grid makes r = 1, 2, 4 local.

What is checked: it loads by name with its grid, classes, dataset and judge; ``critsample sample`` runs it from the
CLI; and its windowed (truncated attention) and strictly local predictions at r = 1, 2, 4 differ from the global one,
less as the radius grows (on dit-digits' 8 x 8 grid r >= 2 already reaches every token through its 4 layers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import critsample
from critsample import judges
from critsample.cli import main
from critsample.metrics import fashion_real


@pytest.fixture(scope="module")
def model():
    return critsample.load("dit-fashion")


def test_dit_fashion_loads_with_its_grid_classes_dataset_and_judge(model):
    assert model.token_grid == (16, 16) and model.patch_size == 2 and model.sample_shape == (1, 32, 32)
    assert model.num_classes == 10 and model.dataset == "fashion-mnist" and model.default_guidance == 2.0
    assert model.meta["global_step"] > 0 and len(model.meta["training"]) > 0
    assert isinstance(judges.for_model(model), judges.FashionJudge)


def test_sample_dit_fashion_from_the_cli(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sample", "--model", "dit-fashion", "--num", "2", "--steps", "4", "--class", "7", "--out", str(out),
                 "--no-wandb"])
    assert code == 0, capsys.readouterr().err
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (2, 32, 32) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    assert json.loads((out / "run.json").read_text())["cost"]["model_evaluations"] > 0


def test_local_predictions_at_radius_1_2_4_differ_from_the_global_one(model):
    """At t = 0.5 on noised test images: both localities move the prediction by > 2 % of its scale at r = 1, 2 and 4,
    and less at a larger radius; strict (keys outside the window cut at every layer's input) differs from windowed."""
    x0 = fashion_real("test-2000")[:2] * 2 - 1
    t = 0.5
    a, s = model.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    x = a.float() * x0 + s.float() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 7])
    glob = model.predict(x, t, cond)
    scale = glob.abs().mean().item()
    gaps = {}
    for locality in ("window", "strict"):
        gaps[locality] = [(model.predict(x, t, cond, radius=r, locality=locality) - glob).abs().mean().item()
                          for r in (1, 2, 4)]
        assert min(gaps[locality]) > 0.02 * scale, (locality, gaps)
        assert gaps[locality][0] > gaps[locality][1] > gaps[locality][2], (locality, gaps)
    strict, window = (model.predict(x, t, cond, radius=1, locality=k) for k in ("strict", "window"))
    assert (strict - window).abs().mean().item() > 0.005 * scale
