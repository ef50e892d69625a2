"""The primary test declared in the config, the nonlocality window as a function of radius, and estimators that cannot
pass by construction (issue 22, items 2 and 3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import critsample
from critsample import detect
from critsample.detect import estimators, primary
from critsample.detect.config import PrimaryArgs
from critsample.errors import UserError

ORACLE = "gmm-mixture:N=8,mu=0.5,s2=1"


def _run(tmp_path, radii, **kw):
    cfg = detect.DetectConfig.from_preset(
        "fast",
        model=ORACLE,
        out=str(tmp_path),
        wandb=False,
        probes=["cond_gap", "locality_gap", "forward_backward"],
        fb={"num_t": 8, "samples": 32, "batch": 32, "steps": 10, "radii": [1, 2]},
        gaps={"steps": 12, "samples": 16, "batch": 16, "radii": radii, "trajectories": ["train"]},
        **kw,
    )
    return detect.run(cfg, critsample.load(ORACLE))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same oracle, samples and noise probed at radii {1, 2} and {1, 2, 4}; and {1, 2, 4} with another declared
    primary pair (the stored units are shared: the primary is not part of any unit key)."""
    a = _run(tmp_path_factory.mktemp("a"), [1, 2])
    root = tmp_path_factory.mktemp("b")
    b = _run(root, [1, 2, 4])
    c = _run(root, [1, 2, 4], primary={"symmetry_breaking": "cond_gap", "radius": 1})
    return a, b, c


def test_d_of_r_does_not_depend_on_the_radii_probed(runs):
    """The old reading (the locality gap at the largest radius probed) moves by more than the tolerance when radius 4
    is added to the probe; the primary test (declared r = 2) and d(r) at every radius probed in both runs do not move
    at all, and every probed radius has its d(r) with a 95 % interval."""
    a, b, _ = runs
    old_a = a["probes"]["locality_gap"]["per_radius"]["train"]["2"]["log_snr_center"]  # largest of {1, 2}
    old_b = b["probes"]["locality_gap"]["per_radius"]["train"]["4"]["log_snr_center"]  # largest of {1, 2, 4}
    assert abs(old_a - old_b) > 0.5
    assert a["primary"]["test"]["center_difference_log_snr"] == b["primary"]["test"]["center_difference_log_snr"]
    assert (
        a["primary"]["test"]["center_difference_ci95_log_snr"] == b["primary"]["test"]["center_difference_ci95_log_snr"]
    )
    assert a["windows"]["locality_gap"]["extra"]["radius"] == b["windows"]["locality_gap"]["extra"]["radius"] == 2
    rows_a = {r["radius"]: r for r in a["nonlocality_by_radius"]["locality_gap"]}
    rows_b = {r["radius"]: r for r in b["nonlocality_by_radius"]["locality_gap"]}
    assert set(rows_a) == {1, 2} and set(rows_b) == {1, 2, 4}
    for r in (1, 2):
        assert rows_a[r]["d_log_snr"] == rows_b[r]["d_log_snr"]
        assert rows_a[r]["d_ci95_log_snr"] == rows_b[r]["d_ci95_log_snr"]
    for row in rows_b.values():
        lo, hi = row["d_ci95_log_snr"]
        assert lo < row["d_log_snr"] < hi and row["outcome"] in ("concurrent", "not concurrent", "inconclusive")
    # d(r) shrinks toward zero as the local denoiser sees more (the locality window moves to larger t with r)
    assert rows_b[1]["d_log_snr"] < rows_b[2]["d_log_snr"] < rows_b[4]["d_log_snr"]
    # local forward-backward left the nonlocality family: it is an excess per radius, never a concurrence pair
    assert "forward_backward" not in a["concurrence"] and a["windows"]["forward_backward_local"]["family"] != (
        "nonlocality"
    )
    assert [r["radius"] for r in a["forward_backward_excess"]["forward_backward_local"]] == [1, 2]
    assert "forward_backward_local" not in (a["nonlocality_window"] or {}).get("extra", {}).get("members", [])


def test_the_primary_pair_declared_in_the_config_is_the_verdict(runs):
    """The headline is the declared pair at the declared radius; every other pair is secondary."""
    _, b, c = runs
    for s, sb, r in ((b, "forward_backward", 2), (c, "cond_gap", 1)):
        head = s["concurrence"]["primary"]
        assert head["role"] == "primary" and s["verdict"] == head["verdict"] == s["primary"]["test"]["verdict"]
        assert head["symmetry_breaking"] == sb and head["radius"] == r and head["nonlocality"] == "locality_gap"
        w_nl = s["probes"]["locality_gap"]["per_radius"]["train"][str(r)]
        assert head["center_difference_log_snr"] == pytest.approx(
            s["windows"][sb]["log_snr_center"] - w_nl["log_snr_center"]
        )
        assert {v["role"] for k, v in s["concurrence"].items() if k != "primary"} == {"secondary"}
        assert s["primary"]["locality"] == "strict" and "same" in s["primary"]["rule"]  # the oracle's local score
    assert b["primary"]["test"]["outcome"] != "no window"


def test_the_gap_windows_get_min_z(runs):
    a, _, _ = runs
    assert a["windows"]["cond_gap"]["extra"]["min_z"] == a["windows"]["locality_gap"]["extra"]["min_z"] == 3.0


def test_strict_is_the_primary_local_denoiser_where_the_window_one_covers_the_grid():
    """auto: strict exactly when depth x r >= grid - 1; the oracles' local score is strict already; the scans have a
    window denoiser only; a model without a strict mode keeps window. Each case says why in its rule."""

    def model(layers, layout="blocks"):
        return SimpleNamespace(
            strict_layout=layout, transformer=SimpleNamespace(config=SimpleNamespace(num_layers=layers))
        )

    p = PrimaryArgs()
    assert primary.resolve(PrimaryArgs(radius=1), model(4), 8)["locality"] == "window"  # 4 < 7
    res = primary.resolve(p, model(4), 8)  # dit-digits: 4 layers x r 2 = 8 >= 7
    assert res["locality"] == "strict" and res["receptive_field_tokens"] == 8 and "covers" in res["rule"]
    assert primary.resolve(p, model(3), 8)["locality"] == "window"  # 6 < 7
    assert primary.resolve(p, model(4, "exact"), 8)["locality"] == "strict"
    assert primary.resolve(p, model(4, None), 8)["locality"] == "window"
    assert primary.resolve(PrimaryArgs(nonlocality="window_locality"), model(4), 8)["locality"] == "window"
    assert primary.resolve(PrimaryArgs(locality="window"), model(4), 8)["locality"] == "window"
    assert primary.window_name(res, "window") == "locality_gap_strict"  # computed beside the window one
    assert primary.needs_strict_gaps(res, "window") and not primary.needs_strict_gaps(res, "both")
    with pytest.raises(UserError, match="windowed scans"):
        PrimaryArgs(nonlocality="window_locality", locality="strict")
    with pytest.raises(UserError, match="primary.symmetry_breaking"):
        PrimaryArgs(symmetry_breaking="locality_gap")


def test_dit_digits_computes_strict_gaps_at_the_primary_radius_only():
    from critsample.detect.context import Detection

    m = critsample.load("dit-digits")
    det = Detection(detect.DetectConfig.from_preset("fast", model="dit-digits", wandb=False), m, torch.device("cpu"))
    assert det.primary["locality"] == "strict" and det.primary["depth"] == 4
    assert det.gap_strict_radii == [2] and 2 in det.gap_radii and 2 in det.win_radii
    det = Detection(
        detect.DetectConfig.from_preset("fast", model="dit-digits", wandb=False, primary={"radius": 1}),
        m,
        torch.device("cpu"),
    )
    assert det.primary["locality"] == "window" and det.gap_strict_radii == []


def _scan_errors(rng, n, p_by_position):
    return (rng.random((n, len(p_by_position))) < np.asarray(p_by_position)).astype(float)


def test_a_saturated_scan_is_invalid_and_its_log_likelihood_is_not():
    """Classifier error 0 at three middle positions (a saturated metric: the old argmin took the first of them) ->
    invalid; the classifier's negative log-likelihood, which keeps decreasing into the middle, gives the window."""
    sch = critsample.load(ORACLE).schedule
    rng = np.random.default_rng(0)
    t0 = np.arange(0, 0.9, 0.1)
    p = [0.8, 0.6, 0.3, 0.0, 0.0, 0.0, 0.3, 0.6, 0.8]
    err = _scan_errors(rng, 64, p)
    depth = np.array([3.0, 2.0, 1.0, 0.5, 0.1, 0.5, 1.0, 2.0, 3.0])  # nats, minimum at position 4
    score = depth + 0.1 * rng.standard_normal((64, len(t0)))
    w = estimators.scan_minimum("s", "symmetry_breaking", t0, err, 0.2, sch, score=score)
    assert not w.valid and "saturates" in w.reason and w.extra["tied_at_extremum"] == 3
    sw = w.extra["score_window"]
    assert sw["valid"], sw["reason"]
    mid = float(estimators.scan_positions(sch, [t0[4]], 0.2)[2][0])
    assert abs(sw["log_snr_center"] - mid) < 1.0


def test_a_flat_minimum_up_to_the_edge_is_invalid():
    """Errors within noise of the minimum from the middle to the last position: the side is not determined."""
    sch = critsample.load(ORACLE).schedule
    rng = np.random.default_rng(1)
    t0 = np.arange(0, 0.9, 0.1)
    err = _scan_errors(rng, 48, [0.9, 0.8, 0.6, 0.3, 0.2, 0.22, 0.21, 0.22, 0.23])
    w = estimators.scan_minimum("s", "symmetry_breaking", t0, err, 0.2, sch)
    assert not w.valid and ("flat within noise" in w.reason or "edge" in w.reason), w.reason


def test_a_forward_backward_grid_that_starts_above_the_floor_is_invalid():
    """A logistic error rise (floor 0.02, chance 0.5) probed from t = 0.05 (floor seen: valid) and from the middle of
    the rise (floor below the grid: invalid, the old rule reported a biased valid window)."""
    sch = critsample.load(ORACLE).schedule
    rng = np.random.default_rng(2)
    t = np.linspace(0.05, 0.95, 19)
    p = 0.02 + 0.48 / (1 + np.exp(-(t - 0.5) / 0.06))
    err = (rng.random((400, t.size)) < p).astype(float)
    full = estimators.threshold_window("fb", "symmetry_breaking", t, err, sch, chance=0.5, n_boot=50)
    assert full.valid, full.reason
    cut = t >= 0.45
    late = estimators.threshold_window("fb", "symmetry_breaking", t[cut], err[:, cut], sch, chance=0.5, n_boot=50)
    assert not late.valid and "floor lies below the probed grid" in late.reason


def test_suggested_radius_needs_contrast():
    """Radii whose best scan positions are the same distribution -> null with the reason; a clearly worse radius 1 and
    equal radii 2 and 4 -> 2 (the smallest not significantly worse than the best); one radius -> null."""
    rng = np.random.default_rng(3)
    n, p = 64, 7
    same = {r: 1.0 + 0.3 * rng.standard_normal((n, p)) for r in (1, 2, 4)}
    out = estimators.best_of_radii(same)
    assert out["radius"] is None and "no contrast" in out["reason"]
    base = 1.0 + 0.3 * rng.standard_normal((n, p))
    contrast = {1: base + 1.0, 2: base + 0.01 * rng.standard_normal((n, p)), 4: base}
    out = estimators.best_of_radii(contrast)
    assert out["radius"] == 2 and out["reason"] == "" and out["contrast_p_value"] < 0.05
    assert estimators.best_of_radii({2: base})["radius"] is None
    zeros = {r: np.zeros((n, p)) for r in (1, 2, 4)}  # a saturated metric: every radius at 0
    assert estimators.best_of_radii(zeros)["radius"] is None
    assert math.isfinite(out["best_means"][0])


def test_a_primary_radius_that_does_not_fit_the_grid_names_its_option(tmp_path, capsys):
    from critsample.cli import main

    small = "gmm-mixture:N=3"  # a 3-token grid: the largest local radius is 1, the default primary radius is 2
    assert max(critsample.load(small).token_grid) <= 3
    code = main(["detect", "--model", small, "--out", str(tmp_path / "d"), "--no-wandb", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--primary.radius 2 does not fit" in err and "0..1" in err and len(err.splitlines()) == 1
    code = main(["detect", "--model", small, "--out", str(tmp_path / "d"), "--no-wandb", "--dry-run",
                 "--primary.radius", "1"])
    assert code == 0, capsys.readouterr().err


def test_the_window_is_read_at_the_primary_radius_or_not_at_all():
    """No silent fallback to another radius: a primary radius missing from the probed radii is an internal error
    (RuntimeError, not a user error), never a window mislabelled with another radius."""
    from critsample.detect.probe_scans import WindowLocality

    det = SimpleNamespace(cfg=SimpleNamespace(primary=SimpleNamespace(radius=2)))
    assert WindowLocality().window_radius(det, [1, 2, 4]) == 2 and primary.probed(2, [2]) == 2
    with pytest.raises(RuntimeError, match="primary radius 2 is not among the probed radii") as e:
        WindowLocality().window_radius(det, [1, 4])
    assert not isinstance(e.value, UserError)
    with pytest.raises(RuntimeError, match="primary radius 3"):
        primary.probed(3, [1, 2])
