"""Probes, window estimators and the resumable store: against direct computations, oracle theory and invariants."""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import torch
from conftest import TinyClassifier, gen, small_config

import critsample
from critsample import NULL, Schedule
from critsample.detect import DetectConfig, ForwardBackwardArgs, GapArgs, WindowArgs, estimators, run
from critsample.models import bundled_path
from critsample.probes.forward_backward import forward_backward, start_index
from critsample.probes.gaps import sampling_states, score_gaps, train_states, trajectory_plan
from critsample.probes.windows import window_plan
from critsample.sampling import step_times
from critsample.store import Store, stable_hash, unit_generator

DIGITS_WEIGHTS = bundled_path("dit-digits") / "transformer" / "diffusion_pytorch_model.safetensors"
needs_dit_digits = pytest.mark.skipif(not DIGITS_WEIGHTS.exists(),
                                      reason=f"bundled dit-digits weights absent ({DIGITS_WEIGHTS})")


# -- instantaneous probes ---------------------------------------------------------------------


def test_gaps_equal_direct_scores_and_batched_equals_plain(tiny):
    x0 = torch.rand(3, 1, 8, 8, generator=gen(1)) * 2 - 1
    times = [0.9, 0.5, 0.1]
    states = train_states(tiny, x0, times, gen(2))
    cond = torch.tensor([0, 4, 9])
    out = score_gaps(tiny, states, times, cond, [0, 2], max_batch=64)
    plain = score_gaps(tiny, states, times, cond, [0, 2], max_batch=1)
    for k in out:
        assert torch.allclose(out[k], plain[k], rtol=1e-4, atol=1e-6), k
    # eq. 6 for one (sample, t) from the public interface
    b, i = 1, 2
    x, t = states[i, b : b + 1], times[i]
    sc = tiny.predict(x, t, cond[b : b + 1], kind="score")
    su = tiny.predict(x, t, torch.tensor([NULL]), kind="score")
    ref = (sc - su).double().norm() / 64
    assert out["cond_gap_score"][b, i] == pytest.approx(float(ref), rel=1e-4)
    # eq. 7, unconditional, radius 2
    sl = tiny.predict(x, t, torch.tensor([NULL]), radius=2, kind="score")
    assert out["loc_gap_uncond_score"][b, i, 1] == pytest.approx(float((sl - su).double().norm() / 64), rel=1e-4)
    # score gap = eps gap / sigma(t)
    _, sigma = tiny.schedule.alpha_sigma(torch.tensor(times, dtype=torch.float64))
    assert torch.allclose(out["cond_gap_score"], out["cond_gap_eps"] / sigma[None], rtol=1e-10)
    assert out["loc_gap_cond_score"].shape == (3, 3, 2) and out["cond_gap_score"].dtype == torch.float64


def test_locality_gap_vanishes_at_global_radius(tiny):
    x0 = torch.rand(2, 1, 8, 8, generator=gen(1)) * 2 - 1
    states = train_states(tiny, x0, [0.7, 0.3], gen(2))
    out = score_gaps(tiny, states, [0.7, 0.3], torch.tensor([1, 2]), [1, 7])
    assert out["loc_gap_uncond_eps"][..., 1].max() < 1e-5  # r = 7 = grid - 1 is the global model
    assert out["loc_gap_uncond_eps"][..., 0].min() > 1e-4


def test_sampling_states_are_the_sampler_trajectory(tiny):
    plan = trajectory_plan(tiny, "sample_cond", 4, 2.0)
    states, times, final = sampling_states(tiny, plan, torch.tensor([3, 5]), gen(4))
    assert states.shape == (4, 2, 1, 8, 8) and times == step_times(tiny, 4)
    ref = critsample.sample(tiny, plan, torch.tensor([3, 5]), x=states[0])
    assert torch.equal(ref, final)


def test_oracle_gaps_match_theory():
    """Isotropic mixture: s(x|c) - s(x) = (m / Gamma)(c - tanh B) 1, and the conditional score is local (gap 0)."""
    oracle = critsample.load("gmm-mixture:N=4,mu=0.6,s2=0.8")
    x0 = oracle.sample_data(5, torch.tensor([0, 1, 0, 1, 0]), generator=gen(0))
    times = [0.8, 0.4, 0.1]
    states = train_states(oracle, x0, times, gen(1))
    cond = torch.tensor([0, 1, 0, 1, 0])
    out = score_gaps(oracle, states, times, cond, [0, 1])
    abar = oracle.schedule.alpha_bar(torch.tensor(times, dtype=torch.float64))
    m, gam = 0.6 * abar.sqrt(), 0.8 * abar + 1 - abar
    B = m[:, None] * states.reshape(3, 5, -1).double().sum(-1) / gam[:, None]  # (T, B)
    c = 1.0 - 2.0 * cond.double()
    theory = ((m / gam)[:, None] * (c[None] - torch.tanh(B))).abs() * 4 / 16  # ||v 1|| = |v| sqrt(16), / 16 tokens
    assert torch.allclose(out["cond_gap_score"], theory.T, rtol=1e-4)
    assert out["loc_gap_cond_score"].abs().max() < 1e-6
    assert out["loc_gap_uncond_score"].min() > 0


# -- integrated probes ------------------------------------------------------------------------


def test_forward_backward_matches_oracle_theory():
    """DDIM forward-backward on the mixture oracle: error of the Bayes classifier = 1 - Phi(K) exactly (ODE readout)."""
    from critsample.detect import OracleClassifier

    oracle = critsample.load("gmm-mixture:N=4,mu=0.35,s2=1.0")
    clf = OracleClassifier(oracle)
    n = 400
    labels = torch.arange(n) % 2
    x0 = oracle.sample_data(n, labels, generator=gen(0))
    for t in (0.2, 0.5):
        out = forward_backward(oracle, x0, labels, t, [None], clf.predict_logits, torch.full((n,), NULL), steps=20,
                               generator=gen(1))
        p = float(out["error"].mean())
        theory = 1 - float(oracle.forward_backward_agreement(out["t"], reverse="ode", readout="classifier"))
        assert abs(p - theory) < 3.5 * math.sqrt(theory * (1 - theory) / n) + 0.01, (t, p, theory)


def test_forward_backward_radii_share_noise_and_start_on_the_grid(tiny):
    x0 = torch.rand(3, 1, 8, 8, generator=gen(1)) * 2 - 1
    labels = torch.tensor([1, 2, 3])
    clf = TinyClassifier()
    out = forward_backward(tiny, x0, labels, 0.42, [None, 1, 7], clf, torch.full((3,), NULL), steps=10,
                           generator=gen(5))
    assert out["t"].item() == pytest.approx(0.4)  # nearest DDIM step of 10
    assert start_index(tiny, 0.42, 10)[0] == 5
    assert out["error"].shape == (3, 3) and set(out["error"].unique().tolist()) <= {0.0, 1.0}
    # r = 7 is global: same noise, same trajectory as the global row
    assert torch.allclose(out["mse"][2], out["mse"][0], atol=1e-5)
    assert torch.equal(out["pred"][2], out["pred"][0])


def test_window_plans_switch_exactly_at_the_window(tiny):
    plan = window_plan(tiny, 10, "cond_in", 0.3, 0.2, guidance=3.0)
    assert [s.mode for s in plan.steps] == ["guided" if 0.3 <= t <= 0.5 else "uncond" for t in plan.times]
    assert plan.forwards == 10 + 3  # t = 0.3, 0.4, 0.5 guided
    loc = window_plan(tiny, 10, "loc_out", 0.9, 0.2, guidance=1.0, radius=2)  # window truncated to [0.9, 1]
    assert [(s.mode, s.radius) for s in loc.steps] == [("uncond", 2) if t >= 0.9 else ("cond", None) for t in loc.times]
    with pytest.raises(critsample.UserError):
        window_plan(tiny, 10, "cond_in", 1.2, 0.2, guidance=3.0)


# -- estimators -------------------------------------------------------------------------------


def test_half_max_window_of_a_gaussian_bump():
    sch = Schedule()
    t = np.linspace(0.02, 0.98, 49)
    rng = np.random.default_rng(0)
    sd = 0.08
    curves = np.exp(-((t - 0.55) ** 2) / (2 * sd**2))[None] * (1 + 0.05 * rng.standard_normal((40, 1)))
    w = estimators.half_max_window("g", "symmetry_breaking", t, curves, sch)
    half = math.sqrt(2 * math.log(2)) * sd
    # FWHM
    assert w.t_start == pytest.approx(0.55 - half, abs=0.005) and w.t_end == pytest.approx(0.55 + half, abs=0.005)
    assert w.width == pytest.approx(2 * half, abs=0.01)
    assert w.log_snr_start > w.log_snr_center > w.log_snr_end
    # the center is the log-SNR midpoint of the edges (not the t midpoint: the map t -> log-SNR is not linear)
    lam = sch.log_snr(torch.tensor([0.55 - half, 0.55 + half], dtype=torch.float64))
    assert w.log_snr_center == pytest.approx(float(lam.mean()), abs=0.03)
    assert w.valid and w.reason == ""
    # one curve per window: radii are estimated one by one (a stack of radii is refused)
    with pytest.raises(ValueError, match="per-sample curves"):
        estimators.half_max_window("g", "nonlocality", t, np.stack([curves, 0.01 * curves], axis=-1), sch)
    # a peak on the grid edge, or a curve above half maximum up to the edge, is no window
    edge = estimators.half_max_window("g", "symmetry_breaking", t[t < 0.5], curves[:, t < 0.5], sch)
    assert not edge.valid and "edge of the probed grid" in edge.reason


def test_threshold_window_of_a_logistic_error_curve():
    sch = Schedule()
    t = np.linspace(0.05, 0.95, 19)
    p = 0.05 + 0.85 / (1 + np.exp(-(t - 0.6) / 0.04))
    rng = np.random.default_rng(1)
    errors = (rng.random((2000, t.size)) < p).astype(float)
    w = estimators.threshold_window("fb", "symmetry_breaking", t, errors, sch)
    assert w.center == pytest.approx(0.6, abs=0.01)
    assert w.t_start == pytest.approx(0.6 - 0.04 * math.log(3), abs=0.02)  # 25 % of the rise
    assert 0 < w.uncertainty < 0.02
    flat = estimators.threshold_window("fb", "symmetry_breaking", t, np.zeros((10, t.size)), sch)
    assert not flat.valid and flat.to_dict()["center"] is None


def test_scan_minimum_and_concurrence():
    sch = Schedule()
    t0s = np.linspace(0.0, 0.8, 9)
    # log-SNR midpoints in t
    mid = np.array([float(sch.t_from_log_snr(v)) for v in estimators.scan_positions(sch, t0s, 0.2)[2]])
    p = 0.2 + 2.0 * (mid - 0.43) ** 2
    exact = estimators.scan_minimum("win", "symmetry_breaking", t0s, np.stack([p] * 400), 0.2, sch)
    assert exact.center == pytest.approx(0.43, abs=0.01) and exact.valid
    errors = (np.random.default_rng(2).random((3000, 9)) < p).astype(float)
    w = estimators.scan_minimum("win", "symmetry_breaking", t0s, errors, 0.2, sch)
    assert abs(w.center - 0.43) < 3 * w.uncertainty + 0.01 and w.uncertainty < 0.1
    mx = estimators.scan_minimum("win", "symmetry_breaking", t0s, 1 - errors, 0.2, sch, maximum=True)
    assert mx.center == pytest.approx(w.center, abs=1e-9)
    # the extremum on the scan's edge, or a flat scan, is no window
    edge = estimators.scan_minimum("w", "symmetry_breaking", t0s[4:], errors[:, 4:], 0.2, sch)
    assert "edge of the scan" in edge.reason
    flat = (np.random.default_rng(3).random((50, 9)) < 0.1).astype(float)
    assert not estimators.scan_minimum("w", "symmetry_breaking", t0s, flat, 0.2, sch).valid
    # concurrence: a test with three outcomes against a tolerance in log-SNR
    other = estimators.scan_minimum("loc", "nonlocality", t0s + 0.01, errors, 0.2, sch)
    c = estimators.concurrence(w, other, tolerance=1.5)  # 95% interval of the difference: about +-1.05 nats here
    assert c["outcome"] == "concurrent" and c["concurrent"] and c["iou"] > 0.8
    # too fine a tolerance to decide
    assert estimators.concurrence(w, other, tolerance=0.5)["outcome"] == "inconclusive"
    far = dataclasses.replace(w, probe="far", family="nonlocality", log_snr_center=w.log_snr_center - 4.0,
                              log_snr_start=w.log_snr_start - 4.0, log_snr_end=w.log_snr_end - 4.0)
    assert estimators.concurrence(w, far, tolerance=1.5)["outcome"] == "not concurrent"
    noisy = dataclasses.replace(other, log_snr_uncertainty=3.0)  # more noise can only make it inconclusive
    assert estimators.concurrence(w, noisy, tolerance=1.0)["outcome"] == "inconclusive"
    assert estimators.concurrence(w, dataclasses.replace(far, log_snr_uncertainty=3.0),
                                  tolerance=1.0)["outcome"] == "inconclusive"
    invalid = dataclasses.replace(other, valid=False, reason="the argmin is on the edge of the scan")
    out = estimators.concurrence(w, invalid)
    assert out["outcome"] == "no window" and not out["concurrent"]
    comb = estimators.combine([w, other], sch)
    lo, hi = sorted((w.log_snr_center, other.log_snr_center))
    assert lo <= comb.log_snr_center <= hi
    # scans contribute centers, not widths, when a member with a measured width exists
    t = np.linspace(0.02, 0.98, 49)
    noise = np.random.default_rng(4).standard_normal((30, 1))
    bump = np.exp(-((t - 0.5) ** 2) / (2 * 0.05**2))[None] * (1 + 0.05 * noise)
    gap = estimators.half_max_window("g", "symmetry_breaking", t, bump, sch)
    assert estimators.combine([w, gap], sch).log_snr_width == pytest.approx(gap.log_snr_width)


# -- store ------------------------------------------------------------------------------------


def test_store_keys_generators_and_atomic_writes(tmp_path):
    a = Store(tmp_path, "m@1", 0, config={"gaps": {"steps": 5}})
    b = Store(tmp_path, "m@1", 0, config={"gaps": {"steps": 6}})
    u, v = a.unit("gaps", {"lo": 0}), b.unit("gaps", {"lo": 0})
    assert u.key != v.key  # a changed config never reuses a unit
    assert u.key != Store(tmp_path, "m@1", 1, config={"gaps": {"steps": 5}}).unit("gaps", {"lo": 0}).key
    assert u.key == Store(tmp_path / "x", "m@1", 0, config={"gaps": {"steps": 5}}).unit("gaps", {"lo": 0}).key
    x1 = torch.randn(3, generator=unit_generator(u.key))
    assert torch.equal(x1, torch.randn(3, generator=unit_generator(u.key)))
    assert stable_hash({"a": 1, "b": [1.5]}) == stable_hash({"b": [1.5], "a": 1})
    calls = []
    out = a.get_or_compute(u, lambda g: calls.append(1) or {"x": torch.ones(2)})
    again = a.get_or_compute(u, lambda g: calls.append(1) or {"x": torch.zeros(2)})
    assert calls == [1] and np.array_equal(out["x"], again["x"])
    assert not list((tmp_path / "units" / "gaps").glob(".*"))  # no temporary files left


# -- detection: resume, sharding --------------------------------------------------------------


class Killed(RuntimeError):
    pass


def _numbers(summary: dict) -> dict:
    return {k: (w["center"], w["t_start"], w["t_end"], w["uncertainty"]) for k, w in summary["windows"].items()}


def test_resume_after_kill_recomputes_nothing_and_gives_the_same_numbers(tiny, tmp_path):
    clf = TinyClassifier()
    full = run(small_config(tmp_path / "full"), tiny, classifier=clf)
    n_units = full["cost"]["units"]
    seen = []

    def kill_after_5(unit, computed):
        seen.append(unit.key)
        if len(seen) == 5:
            raise Killed

    with pytest.raises(Killed):
        run(small_config(tmp_path / "resumed"), tiny, classifier=clf, on_unit=kill_after_5)
    recomputed = []
    resumed = run(small_config(tmp_path / "resumed"), tiny, classifier=clf,
                  on_unit=lambda u, c: c and recomputed.append(u.key))
    assert resumed["cost"]["units_loaded"] == 5 and resumed["cost"]["units_computed_this_run"] == n_units - 5
    assert not set(recomputed) & set(seen)
    assert _numbers(resumed) == _numbers(full)
    for name in ("gaps", "forward_backward", "window_cond", "window_locality"):
        a, b = (np.load(tmp_path / run / "arrays" / f"{name}.npz") for run in ("full", "resumed"))
        for k in a.files:
            assert np.array_equal(a[k], b[k]), (name, k)
    # a changed config reuses nothing
    changed = run(small_config(tmp_path / "resumed", gaps=GapArgs(steps=4, samples=3, batch=2, radii=[1, 2]),
                               probes=["cond_gap", "locality_gap"]), tiny, classifier=clf)
    assert changed["cost"]["units_loaded"] == 0


def test_units_shard_round_robin_over_ranks(tiny, tmp_path):
    """Two ranks on one folder (barrier stubbed): each computes every other unit, rank 0 assembles the same numbers."""
    clf = TinyClassifier()
    cfg = small_config(tmp_path / "sharded", probes=["cond_gap", "locality_gap", "window_cond"])
    def rank(r):
        return types.SimpleNamespace(global_rank=r, world_size=2, barrier=lambda: None, device=torch.device("cpu"))

    mine = {0: [], 1: []}
    assert run(cfg, tiny, classifier=clf, fabric=rank(1), on_unit=lambda u, c: mine[1].append(c)) is None
    summary = run(cfg, tiny, classifier=clf, fabric=rank(0), on_unit=lambda u, c: mine[0].append(c))
    n = summary["cost"]["units"]
    assert len(mine[1]) == n // 2 and len(mine[0]) == n - n // 2 and all(mine[0]) and all(mine[1])
    assert summary["cost"]["units_computed_this_run"] == n  # counted over both ranks, not rank 0's share
    single = run(small_config(tmp_path / "single", probes=["cond_gap", "locality_gap", "window_cond"]), tiny,
                 classifier=clf)
    assert _numbers(summary) == _numbers(single)


def test_detect_on_the_oracle_matches_forward_backward_theory(tmp_path):
    """gmm-mixture: the detected forward-backward threshold equals the threshold of the exact curve 1 - Phi(K(t))."""
    oracle = critsample.load("gmm-mixture:N=4,mu=0.35,s2=1.0")
    cfg = DetectConfig(model=oracle.name, out=str(tmp_path), wandb=False, probes=["forward_backward"],
                       fb=ForwardBackwardArgs(num_t=9, t_min=0.1, t_max=0.9, samples=300, steps=20, batch=150,
                                              radii=[1]))
    s = run(cfg, oracle)
    w = s["windows"]["forward_backward"]
    t = np.load(tmp_path / "arrays" / "forward_backward.npz")["t"]
    exact = 1 - oracle.forward_backward_agreement(torch.tensor(t), reverse="ode", readout="classifier").numpy()
    theory = estimators.threshold_window("theory", "symmetry_breaking", t, np.stack([exact, exact]), oracle.schedule)
    assert abs(w["center"] - theory.center) < 3 * w["uncertainty"] + 0.01, (w["center"], theory.center,
                                                                            w["uncertainty"])
    assert s["model"] == oracle.name and s["probes"]["forward_backward"]["source"] == "data"


def test_detect_latent_class_model_with_generated_clean_images(dit, tmp_path):
    """A 1000-class latent DiT with a VAE and no dataset: sampling trajectories only, forward-backward on generated
    images (class 207 by default, as the paper's golden retriever)."""
    cfg = DetectConfig(
        model="tiny-latent-dit", out=str(tmp_path), wandb=False, probes=["cond_gap", "forward_backward"],
        gaps=GapArgs(steps=3, samples=2, batch=2, trajectories=["sample_cond"]),
        fb=ForwardBackwardArgs(num_t=2, t_min=0.3, t_max=0.7, samples=2, steps=3, batch=2, radii=[1],
                               source="generated"),
    )
    s = run(cfg, dit, classifier=TinyClassifier())
    assert s["class_id"] == 207 and s["token_grid"] == 4
    assert s["probes"]["cond_gap"]["per_trajectory"].keys() == {"sample_cond"}
    assert np.load(tmp_path / "arrays" / "forward_backward.npz")["error"].shape == (2, 2, 2)
    with pytest.raises(critsample.UserError, match="no default dataset"):
        run(DetectConfig(model="x", out=str(tmp_path / "b"), wandb=False, probes=["cond_gap"],
                         gaps=GapArgs(steps=3, samples=2)), dit)


def test_detect_text_model_with_a_prompt(sd3, tmp_path):
    cfg = DetectConfig(
        model="tiny-sd3", out=str(tmp_path), wandb=False, prompt="a red cat",
        probes=["cond_gap", "locality_gap", "window_cond"],
        gaps=GapArgs(steps=3, samples=2, batch=2, trajectories=["sample_cond", "sample_uncond"]),
        windows=WindowArgs(steps=3, t0_step=0.5, samples=2, batch=2, complement=False),
    )
    s = run(cfg, sd3, classifier=TinyClassifier())
    assert s["schedule"]["kind"] == "flow" and s["prompt"] == "a red cat"
    assert s["probes"]["locality_gap"]["radii"] == [1, 2]
    assert np.isfinite(s["windows"]["cond_gap"]["log_snr_center"])
    with pytest.raises(critsample.UserError, match="text-conditional"):
        run(DetectConfig(model="x", out=str(tmp_path / "b"), wandb=False, class_id=3), sd3)


def test_user_data_file(tiny, tmp_path):
    from critsample.detect import load_data

    x = torch.rand(5, 1, 8, 8) * 2 - 1
    np.savez(tmp_path / "lat.npz", latents=x.numpy(), labels=np.arange(5))
    got, labels = load_data(DetectConfig(data=str(tmp_path / "lat.npz")), tiny, 3, "cpu", None)
    assert torch.equal(got, x[:3]) and labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "bad.npz", latents=np.zeros((2, 3, 8, 8)))
    with pytest.raises(critsample.UserError, match="shape"):
        load_data(DetectConfig(data=str(tmp_path / "bad.npz")), tiny, 2, "cpu", None)


# -- the bundled dit-digits --------------------------------------------------------------------


@needs_dit_digits
def test_dit_digits_probes_find_a_transition(tmp_path):
    """On the trained dit-digits: forward-backward error rises from near the classifier's floor to near chance, and
    the conditioning gap peaks strictly inside (0, 1)."""
    model = critsample.load("dit-digits")
    from critsample.datasets import digits_split

    x, y = digits_split("test")
    x0, labels = x[:48], y[:48]
    from critsample.models.classifiers import load_classifier

    clf = load_classifier("digits")
    lo = forward_backward(model, x0, labels, 0.1, [None, 1], clf.predict_logits, torch.full((48,), NULL), steps=20,
                          generator=gen(0))
    hi = forward_backward(model, x0, labels, 0.95, [None], clf.predict_logits, torch.full((48,), NULL), steps=20,
                          generator=gen(0))
    assert lo["error"][0].mean() < 0.25 and hi["error"][0].mean() > 0.6
    times = step_times(model, 20)
    states = train_states(model, x0[:8], times, gen(1))
    gaps = score_gaps(model, states, times, labels[:8], [])
    curve = gaps["cond_gap_eps"].mean(0)
    k = int(curve.argmax())
    assert 0 < k < len(times) - 1


def test_a_scan_cannot_pass_by_construction():
    """A scan whose minimum is a stretch of exact zeros (a saturated metric) or flat within noise up to the scan's edge
    is no window, each with its reason; a clear interior minimum stays valid (issue 22, item 3)."""
    sch = Schedule()
    t0s = np.linspace(0.0, 0.8, 9)
    g = np.random.default_rng(5)
    # error 0 over positions 2..5, high elsewhere: argmin used to pick position 2 and call it valid
    p = np.array([0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5, 0.7])
    sat = estimators.scan_minimum("s", "symmetry_breaking", t0s, (g.random((400, 9)) < p).astype(float), 0.2, sch)
    assert not sat.valid and "saturates" in sat.reason and sat.extra["tied_at_extremum"] == 4
    # a shallow minimum at position 3 whose neighbours down to position 0 are within noise of it
    p = np.array([0.21, 0.205, 0.2, 0.19, 0.2, 0.3, 0.4, 0.5, 0.6])
    flat = estimators.scan_minimum("f", "symmetry_breaking", t0s, (g.random((300, 9)) < p).astype(float), 0.2, sch)
    assert not flat.valid and "flat within noise up to the edge" in flat.reason
    assert 0 in flat.extra["near_extremum_positions"]
    # a clear interior minimum: valid, its near set away from the edges
    p = np.array([0.6, 0.5, 0.35, 0.1, 0.35, 0.5, 0.6, 0.7, 0.8])
    ok = estimators.scan_minimum("o", "symmetry_breaking", t0s, (g.random((300, 9)) < p).astype(float), 0.2, sch)
    assert ok.valid and ok.extra["near_extremum_positions"] == [3]
    near = estimators.near_extremum(np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert near.tolist() == [True, False, True]  # exact ties are near; a zero-variance worse position is not
