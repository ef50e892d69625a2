"""Schedule maths (radius r(t) with its curriculum, loss weights w(t)) and how the training loss uses them."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from critsample.errors import UserError
from critsample.finetune.schedules import GLOBAL_RADIUS, LossWeighting, RadiusSchedule, window_from_summary


def bump(t: torch.Tensor) -> torch.Tensor:
    """A user weighting for the tests: w(t) = t (1 - t), mean 1/6 on [0, 1]."""
    return t * (1 - t)


def test_radius_global_inside_window_and_r_outside():
    s = RadiusSchedule(window=(0.3, 0.7), radius=2)
    t = torch.tensor([0.0, 0.29, 0.3, 0.5, 0.7, 0.71, 1.0], dtype=torch.float64)
    assert s.radii(t).tolist() == [2, 2, GLOBAL_RADIUS, GLOBAL_RADIUS, GLOBAL_RADIUS, 2, 2]


def test_curriculum_anneals_from_global_to_r():
    s = RadiusSchedule(window=(0.4, 0.6), radius=1, anneal_steps=60)
    steps = list(range(0, 80, 5))
    r = [s.outside_radius(k, grid_size=8) for k in steps]
    assert r[0] == 7  # grid 8 -> radius 7 is global attention
    assert r[steps.index(30)] == 4  # halfway: round(7 + (1 - 7) / 2)
    assert all(a >= b for a, b in itertools.pairwise(r)), "the radius never grows again"
    assert all(v == 1 for k, v in zip(steps, r, strict=True) if k >= 60)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert s.radii(t, step=30, grid_size=8).tolist() == [4, GLOBAL_RADIUS, 4]
    assert s.radii(t, step=1000, grid_size=8).tolist() == [1, GLOBAL_RADIUS, 1]


def test_local_prob_keeps_a_share_of_outside_samples_global():
    s = RadiusSchedule(window=(0.4, 0.6), radius=1, local_prob=0.25)
    t = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = s.radii(t, generator=torch.Generator().manual_seed(1))
    outside = (t < 0.4) | (t > 0.6)
    assert (r[~outside] == GLOBAL_RADIUS).all()
    share = (r[outside] == 1).double().mean().item()
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / outside.sum().item()) ** 0.5


@pytest.mark.parametrize("kw", [dict(window=(0.2, 0.5), inside=3.0, outside=1.0), dict(window=(0.0, 1.0), inside=2.0),
                                dict(window=(0.6, 0.9), inside=0.0, outside=1.0), dict(function=f"{__name__}.bump")])
def test_loss_weights_have_mean_one_under_uniform_t(kw):
    w = LossWeighting(**kw)
    n = 200_000
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # midpoint rule for E_{t ~ U[0, 1]} w(t)
    assert w.weights(t).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_loss_weights_ratio_inside_to_outside():
    w = LossWeighting(window=(0.3, 0.7), inside=3.0, outside=1.0)
    v = w.weights(torch.tensor([0.1, 0.5], dtype=torch.float64))
    assert v[1] / v[0] == pytest.approx(3.0)
    assert v[0] == pytest.approx(1.0 / (3.0 * 0.4 + 1.0 * 0.6))
    f = LossWeighting(function=f"{__name__}:bump")
    assert f.weights(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(0.25 * 6, rel=1e-6)


@pytest.mark.parametrize("window", [(0.7, 0.3), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.2), (0.5,), "a"])
@pytest.mark.parametrize("cls", [RadiusSchedule, LossWeighting])
def test_bad_windows_are_rejected_in_one_sentence(cls, window):
    with pytest.raises(UserError) as e:
        cls(window=window)
    msg = str(e.value)
    assert "window" in msg and "\n" not in msg and msg.endswith(".")


@pytest.mark.parametrize("kw, fragment", [(dict(radius=-1), "radius"), (dict(local_prob=1.5), "local_prob"),
                                          (dict(anneal_steps=-3), "anneal_steps")])
def test_bad_radius_schedules_are_rejected(kw, fragment):
    with pytest.raises(UserError, match=fragment):
        RadiusSchedule(**kw)


def test_bad_loss_weightings_are_rejected():
    with pytest.raises(UserError, match="non-negative"):
        LossWeighting(inside=-1.0)
    with pytest.raises(UserError, match="Cannot import"):
        LossWeighting(function="no_such_module.w")


def test_summary_seeds_both_schedules(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"model": "dit-digits", "critical_window": {"t_start": 0.25, "t_end": 0.55}}))
    assert window_from_summary(path) == (0.25, 0.55)
    assert RadiusSchedule(summary=str(path)).window == (0.25, 0.55)
    assert LossWeighting(window=(0.1, 0.2), summary=str(path)).window == (0.25, 0.55)
    (tmp_path / "none.json").write_text(json.dumps({"critical_window": None}))
    with pytest.raises(UserError, match="explicit window"):
        RadiusSchedule(summary=str(tmp_path / "none.json"))
    with pytest.raises(UserError, match="No summary"):
        LossWeighting(summary=str(tmp_path / "missing.json"))


# -- the training loss uses them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    from critsample.finetune.data import digits_split

    x, y = digits_split("test")
    return x[:8], y[:8]


def _module(**kw):
    from critsample.finetune.module import DiTModule

    torch.manual_seed(0)
    return DiTModule(model=dict(num_layers=1, num_attention_heads=2, attention_head_dim=8), **kw)


def _loss(module, batch) -> float:
    with torch.no_grad():
        return float(module._loss(*batch, generator=torch.Generator().manual_seed(0)))


def test_radius_schedule_changes_the_loss_only_outside_the_window(batch):
    plain = _loss(_module(), batch)
    assert _loss(_module(radius_schedule=RadiusSchedule(window=(0.0, 1.0), radius=0)), batch) == plain
    narrow = _loss(_module(radius_schedule=RadiusSchedule(window=(0.0, 0.001), radius=0)), batch)
    assert narrow != pytest.approx(plain, rel=1e-4)


def test_equal_loss_weights_leave_the_loss_unchanged(batch):
    plain = _loss(_module(), batch)
    flat = _loss(_module(loss_weighting=LossWeighting(inside=1.5, outside=1.5)), batch)
    assert flat == pytest.approx(plain, rel=1e-6)
    tilted = _loss(_module(loss_weighting=LossWeighting(inside=4.0, outside=0.5)), batch)
    assert tilted != pytest.approx(plain, rel=1e-4)


def test_a_global_radius_is_refused_by_the_module():
    with pytest.raises(ValueError, match="already global"):
        _module(radius_schedule=RadiusSchedule(radius=7))
