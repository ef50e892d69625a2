"""Certified plans on the bundled dit-digits at tiny size: the rule on the measured numbers, the cheapest certified
plan, the baseline's fallback, paired noise, and ``critsample tune`` end to end (detect -> tune -> sample)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMALL

import critsample
from critsample import certify, judges, plans, tune
from critsample import summary as summary_io
from critsample.cli import main
from critsample.errors import UserError
from critsample.sampling import Plan
from critsample.store import Store, model_fingerprint

STEPS, NUM, BOOT = 10, 64, 30
# 64 samples bound a drop no tighter than ~7 points (no discordant pair at all): a loose tolerance lets candidates pass
LOOSE = certify.Tolerance(accuracy_points=20.0, fd_relative=0.5)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return critsample.load("dit-digits")


@pytest.fixture(scope="module")
def measured(model, tmp_path_factory):
    w = model.default_guidance
    baseline = plans.full_guidance(model, STEPS, w)
    candidates = [
        plans.interval_guidance(model, STEPS, w, (0.3, 0.7)),
        plans.adaptive(model, STEPS, w, (0.3, 0.7), 1, "local-uncond"),
        plans.adaptive(model, STEPS, w, (0.3, 0.7), 1, "local-cond"),
        plans.adaptive(model, STEPS, w, (0.3, 0.7), None, "global-uncond"),
    ]
    store = Store(tmp_path_factory.mktemp("certify") / ".units", model_fingerprint(model, model.name), 0)
    result = certify.certify(model, baseline, candidates, num=NUM, seed=0, n_boot=BOOT, store=store, tolerance=LOOSE)
    return model, baseline, candidates, store, result


def _price(e):
    return e["cost"]["flops"]


def test_chosen_plan_satisfies_the_rule_and_is_the_cheapest(measured):
    _, _, candidates, _, result = measured
    d = result.to_dict()
    base = d["baseline"]["quality"]
    entries = [d["baseline"], *d["candidates"]]
    assert len(d["candidates"]) == len(candidates)
    for e in entries:
        q = e["quality"]
        assert q["accuracy_drop"] == pytest.approx(base["accuracy"] - q["accuracy"], abs=1e-12)
        assert q["fd_ratio"] == pytest.approx(q["fd"] / base["fd"], rel=1e-9)
        assert q["accuracy_drop_upper"] >= q["accuracy_drop"] and q["fd_ratio_upper"] >= q["fd_ratio"]
        if e is not d["baseline"]:  # certified on the upper bounds, not on the point estimates
            assert e["certified"] == (q["accuracy_drop_upper"] <= 0.20 and q["fd_ratio_upper"] <= 1.5)
        assert e["cost"]["forwards"] == Plan.from_dict(e["plan"]).forwards
    chosen = [e for e in entries if e["chosen"]]
    assert len(chosen) == 1 and chosen[0]["certified"]
    assert chosen[0]["name"] == d["name"] and d["plan"] == chosen[0]["plan"]
    assert all(_price(chosen[0]) <= _price(e) for e in entries if e["certified"])
    assert any(e["certified"] for e in d["candidates"]), [e["quality"] for e in d["candidates"]]
    assert d["quality"]["accuracy_drop_upper"] <= d["tolerance"]["accuracy_points"] / 100
    assert d["quality"]["fd_ratio_upper"] <= 1 + d["tolerance"]["fd_relative"]
    assert json.loads(json.dumps(summary_io.jsonable(d))) == summary_io.jsonable(d)  # serializes to JSON


def test_baseline_certifies_itself(measured):
    b = measured[4].baseline
    q = b["quality"]
    assert b["certified"] and q["accuracy_drop"] == 0 and q["fd_ratio"] == pytest.approx(1.0)
    assert q["accuracy_drop_sigma"] == 0 and q["fd_ratio_sigma"] == pytest.approx(0.0, abs=1e-12)
    assert q["fd_ratio_upper"] == pytest.approx(1.0) and 0 < q["accuracy_drop_upper"] < 0.1  # the reference
    assert b["cost"]["forwards"] == 2 * STEPS and b["cost"]["flops_ratio"] == 1.0


def test_impossible_tolerance_falls_back_to_the_baseline_and_nothing_is_sampled_again(measured):
    model, baseline, candidates, store, result = measured
    losing = [e for e in result.candidates if e["quality"]["accuracy_drop"] > 0]
    assert losing, "the local-uncond plan at this window is known to lose accuracy on dit-digits"
    before = store.computed
    again = certify.certify(model, baseline, [Plan.from_dict(e["plan"]) for e in losing], num=NUM, seed=0, n_boot=BOOT,
                            store=store,
                            tolerance=certify.Tolerance(0.0, 0.10))
    assert store.computed == before  # every plan's samples were stored
    assert again.chosen is again.baseline and again.plan.steps == baseline.steps
    assert not any(e["certified"] for e in again.candidates)


def test_cheapest_first_search_makes_the_same_choice_and_stops_there(measured):
    """measure='cheapest' samples in ascending cost and stops at the first certified plan: the choice of 'all'."""
    model, baseline, candidates, store, full = measured
    fast = certify.certify(model, baseline, candidates, num=NUM, seed=0, n_boot=BOOT, store=store, measure="cheapest",
                           tolerance=LOOSE)
    assert fast.chosen["plan"] == full.chosen["plan"] and fast.chosen["quality"] == full.chosen["quality"]
    key = {e["name"]: (_price(e), e["cost"]["forwards"]) for e in full.candidates}
    measured_names = {e["name"] for e in fast.candidates}
    # every candidate strictly cheaper than the choice was measured and failed; none dearer was measured
    if full.chosen is not full.baseline:
        cheaper = [e for e in full.candidates if key[e["name"]] < key[full.chosen["name"]]]
        assert all(e["name"] in measured_names and not e["certified"] for e in cheaper)
    else:
        assert len(measured_names) == len(candidates)
    assert fast.chosen is fast.baseline or all(key[n] <= key[fast.chosen["name"]] for n in measured_names)
    assert fast.to_dict()["setup"]["candidates_measured"] == len(measured_names) <= len(candidates)
    with pytest.raises(UserError, match="measure is"):
        certify.certify(model, baseline, candidates, num=NUM, measure="some")


def test_a_plan_passing_on_point_estimates_but_not_on_bounds_is_not_certified():
    """Two discordant pairs of 64 (one each way): drop 0 and FD ratio 1 pass any tolerance as point estimates; the
    exact bound of the drop (~9 points) does not pass 1 point."""

    class Flat(judges.Judge):
        binary_rows = True

        def fd(self, features):
            return float(features.var(0).sum()) + 1.0

    rows = np.ones(64)
    plan_rows = rows.copy()
    rows[0], plan_rows[1] = 0, 0
    feats = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = judges.paired(Flat(), judges.Scores(rows, feats), judges.Scores(plan_rows, feats), n_boot=20, seed=0)
    tol = certify.Tolerance()
    assert q["accuracy_drop"] == 0 and q["fd_ratio"] == 1 and tol.passes(q["accuracy_drop"], q["fd_ratio"])
    assert q["accuracy_drop_upper"] > 0.05 and not tol.certifies(q)


def test_a_plan_failing_its_fresh_confirmation_is_not_certified_and_full_guidance_is_kept(measured):
    result = measured[4]
    assert result.chosen is not result.baseline
    fresh = {**result.chosen["quality"], "accuracy_drop_upper": 0.5}
    conf = {"seed": 1, "num_samples": NUM, "quality": fresh, "cost": result.chosen["cost"],
            "baseline_quality": result.baseline["quality"], "passed": False}
    record = tune.confirmed(result, conf)
    assert record["certified"] is False and record["plan"] == result.baseline["plan"]
    assert record["confirmation"]["candidate"] == result.chosen["name"] and "full guidance" in record["confirmation"][
        "decision"]
    passed = tune.confirmed(result, {**conf, "passed": True})
    assert passed["certified"] and passed["plan"] == result.chosen["plan"] and passed["quality"] is fresh
    assert passed["in_sample"] == result.chosen["quality"]
    with pytest.raises(UserError, match="confirmation seed must differ"):
        certify.confirm(measured[0], result, 0)


@pytest.mark.parametrize("bad, said", [(["--measure", "some"], "--measure is all or cheapest"),
                                        (["--accuracy_tolerance", "-1"], "accuracy tolerance"),
                                        (["--num", "1"], "--num must"),
                                        (["--fresh_seed", "0"], "--fresh_seed must")])
def test_bad_tune_input_is_one_sentence_before_any_work(tmp_path, capsys, bad, said):
    (tmp_path / "summary.json").write_text(json.dumps({"model": "dit-digits"}))
    assert main(["tune", "--summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "t"), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and not (tmp_path / "t").exists()


def test_plan_kinds_are_read_from_the_steps(model):
    w = model.default_guidance
    assert certify.kind(plans.full_guidance(model, 6, w)) == "full"
    assert certify.kind(plans.interval_guidance(model, 6, w, (0.3, 0.7))) == "interval"
    for outside, r in (("local-cond", 1), ("local-uncond", 1), ("global-uncond", None)):
        assert certify.kind(plans.adaptive(model, 6, w, (0.3, 0.7), r, outside)) == "adaptive"


def test_paired_noise_plans_equal_to_the_baseline_give_identical_samples(model):
    full = plans.full_guidance(model, 4, model.default_guidance)
    copy = Plan.from_dict({**full.to_dict(), "name": "a copy"})
    a, b = certify.paired_samples(model, full, 12, seed=3), certify.paired_samples(model, copy, 12, seed=3,
                                                                                   batch_size=5)
    assert torch.allclose(a["images"], b["images"], atol=1e-5) and torch.equal(a["labels"], torch.arange(12) % 10)
    other = certify.paired_samples(model, full, 12, seed=4)
    assert not torch.allclose(a["images"], other["images"], atol=1e-3)


def test_search_starts_from_the_summary_windows(model):
    s = {"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.6, "valid": True},
         "windows": {"window_cond": {"t_start": 0.3, "t_end": 0.5, "valid": True},
                     "window_locality": {"t_start": 0.1, "t_end": 0.4, "valid": False},
                     "forward_backward_local": {"t_start": 0.4, "t_end": 0.7, "valid": True}}, "suggested_radius": 2}
    wins = certify.summary_windows(s)
    assert wins == {"guidance": ((0.3, 0.5), "window_cond"), "attention": ((0.4, 0.7), "forward_backward_local")}
    assert certify.grid_windows((0.3, 0.5), certify.Grid(shifts=(-0.5, 0.0), scales=(1.0, 4.0))) == [
        (0.2, 0.4), (0.3, 0.5), (0.0, 0.7), (0.0, 0.8)]
    found = certify.search(model, s, 20, 1.5, certify.Grid(shifts=(0.0,), scales=(1.0,)))
    names = [p.name for p in found]
    # interval, local-uncond / local-cond with and without the attention window, global-uncond: distinct steps
    assert len(names) == 6 and names[0].startswith("interval[0.3,0.5]")
    assert any("r=2, attention[0.4,0.7]" in n for n in names)
    with pytest.raises(UserError, match="no valid guidance window"):
        certify.summary_windows({"windows": {"window_cond": {"t_start": 0.3, "t_end": 0.5, "valid": False}}})


def test_certified_plan_is_read_and_checked():
    assert summary_io.certified_plan({"model": "x"}) is None
    with pytest.raises(UserError, match="not a certified plan"):
        summary_io.certified_plan({"plan": {"name": "x"}})


def test_tune_end_to_end_then_resume_then_sample_uses_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    det = tmp_path / "det"
    assert main(["detect", "--model", "dit-digits", "--preset", "fast", *SMALL, "--out", str(det), "--no-wandb"]) == 0
    tune = ["tune", "--summary", str(det / "summary.json"), "--num", str(NUM), "--steps", str(STEPS), "--shifts", "[0]",
            "--scales", "[1]", "--outside", "[local-uncond, local-cond]", "--n_boot", "20", "--out",
            str(tmp_path / "tune"), "--device", "cpu"]
    assert main(tune) == 0
    assert "certified:" in capsys.readouterr().out
    frontier = json.loads((tmp_path / "tune" / "frontier.json").read_text())
    assert (tmp_path / "tune" / "frontier.png").stat().st_size > 0
    assert frontier["setup"]["units_computed_this_run"] == 1 + len(frontier["candidates"]) >= 3
    summary = json.loads((det / "summary.json").read_text())
    assert summary["plan"]["plan"] == frontier["plan"] and "candidates" not in summary["plan"]
    assert summary["critical_window"] is not None
    assert summary_io.read(det / "summary.json", "dit-digits")["plan"]["tolerance"]["accuracy_points"] == 1.0
    # started again: nothing sampled, the same choice and numbers
    assert main(tune) == 0
    again = json.loads((tmp_path / "tune" / "frontier.json").read_text())
    assert again["setup"]["units_computed_this_run"] == 0
    assert again["setup"]["units_loaded"] == frontier["setup"]["units_computed_this_run"]
    assert again["plan"] == frontier["plan"] and again["candidates"] == frontier["candidates"]
    assert again["baseline"] == frontier["baseline"]
    # sample --adaptive --summary runs the certified plan; explicit --window / --radius take precedence
    out = tmp_path / "sample"
    assert main(["sample", "--adaptive", "--summary", str(det / "summary.json"), "--steps", str(STEPS), "--num", "4",
                 "--out", str(out),
                 "--no-wandb", "--device", "cpu"]) == 0
    assert json.loads((out / "run.json").read_text())["plan"] == summary["plan"]["plan"]
    assert main(["sample", "--adaptive", "--summary", str(det / "summary.json"), "--steps", str(STEPS), "--num", "2",
                 "--out", str(out),
                 "--window", "0.2:0.5", "--radius", "1", "--no-wandb", "--device", "cpu"]) == 0
    assert json.loads((out / "run.json").read_text())["plan"]["name"].startswith("adaptive[0.2,0.5]")
    assert math.isfinite(frontier["quality"]["fd"])
    # the plan's quality is the fresh-seed measurement with its bounds, the search's numbers beside it
    conf = frontier["confirmation"]
    assert conf["seed"] == 1 and frontier["quality"] == conf["quality"] != frontier["in_sample"]
    assert {"accuracy_drop_upper", "fd_ratio_upper"} <= set(frontier["quality"]) <= set(summary["plan"]["quality"])
    chosen = next(e for e in [frontier["baseline"], *frontier["candidates"]] if e["chosen"])
    assert frontier["in_sample"] == chosen["quality"] or not frontier["certified"]
    assert frontier["certified"] == conf["passed"] and summary["plan"]["certified"] == frontier["certified"]
    assert frontier["setup"]["confirmation_units_computed"] >= 1 and again["setup"]["confirmation_units_computed"] == 0
