"""Adaptive plans: construction, serialization, equality with the plain sampler, compute accounting, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import critsample
from critsample import plans
from critsample.cli import main
from critsample.generate import SampleConfig, run
from critsample.sampling import Plan, Step, sample


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


@pytest.mark.parametrize("outside, mode", [(None, "cond"), ("local-cond", "cond"), ("local-uncond", "uncond")])
def test_adaptive_plan_follows_the_window(digits, outside, mode):
    # default: local-cond (measured)
    p = plans.adaptive(digits, 20, 1.5, (0.3, 0.6), 2, *([outside] if outside else []))
    assert len(p.steps) == len(p.times) == 20
    for t, s in zip(p.times, p.steps, strict=True):
        inside = 0.3 <= t <= 0.6
        assert s == (Step("guided", None, 1.5) if inside else Step(mode, 2, 1.0))
    assert p.forwards == sum(2 if 0.3 <= t <= 0.6 else 1 for t in p.times)
    q = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q.steps == p.steps and q.times == p.times and q.sampler == p.sampler


def test_interval_plan_is_conditional_outside(digits):
    p = plans.interval_guidance(digits, 10, 2.0, "0.2:0.5")
    assert {s.mode for t, s in zip(p.times, p.steps, strict=True) if not 0.2 <= t <= 0.5} == {"cond"}


def test_full_guidance_plan_equals_the_plain_sampler_loop(digits):
    """The plan-driven loop with full guidance equals a hand-written DDIM loop calling the denoiser directly."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    labels = torch.tensor([1, 7, 3])
    plan = plans.full_guidance(digits, 8, 1.5)
    got = sample(digits, plan, labels, generator=torch.Generator().manual_seed(0))
    sch = DDIMScheduler.from_config(digits.scheduler_config)
    sch.set_timesteps(8)
    x = randn_tensor((3, *digits.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for ts in sch.timesteps:
            k = torch.full((3,), int(ts))
            out = digits.transformer(torch.cat([x, x]), timestep=torch.cat([k, k]),
                                     class_labels=torch.cat([labels, torch.full((3,), 10)])).sample
            eps = out[3:] + 1.5 * (out[:3] - out[3:])
            x = sch.step(eps, ts, x).prev_sample
    assert torch.allclose(got, x, atol=1e-5)


def test_accounting_matches_counted_forwards(digits, tmp_path):
    """run.json's model evaluations equal the rows the network actually saw."""
    rows = []
    orig = digits.transformer.forward

    def counting(hidden_states, *a, **kw):
        rows.append(hidden_states.shape[0])
        return orig(hidden_states, *a, **kw)

    digits.transformer.forward = counting
    try:
        cfg = SampleConfig(classes=[2, 5], num=6, steps=6, adaptive=True, window="0.2:0.6", radius=1,
                           out=str(tmp_path), wandb=False, batch_size=4)
        record = run(cfg, model=digits)
    finally:
        del digits.transformer.forward
    assert record["cost"]["model_evaluations"] == sum(rows)
    assert record["cost"]["flops_per_sample"]["forwards"] == record["plan"]["forwards_per_sample"]


def test_adaptive_cli_end_to_end_on_dit_digits(tmp_path):
    summary = {"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": 2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "a"
    code = main(["sample", "--model", "dit-digits", "--adaptive", "--summary", str(tmp_path / "summary.json"),
                 "--class", "4", "--num", "4", "--steps", "6", "--out", str(out), "--no-wandb"])
    assert code == 0
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["plan"]["name"].startswith("adaptive[0.2,0.5]")
    assert {s["radius"] for s in run_record["plan"]["steps"] if s["mode"] == "cond"} == {2}  # local-cond: the default
    assert run_record["cost"]["flops_per_sample"]["attention"] > 0
    assert np.load(out / "samples.npz")["images"].shape == (4, 8, 8)


@pytest.mark.parametrize("summary, fragment", [
    ({"model": "dit-xl", "critical_window": {"t_start": 0.2, "t_end": 0.5}}, "measured on 'dit-xl'"),
    ({"model": "dit-digits", "critical_window": {"t_start": 0.6, "t_end": 0.5}}, "0 <= t0 < t1 <= 1"),
    ({"model": "dit-digits"}, "not a critsample summary"),
])
def test_bad_summary_exits_2(tmp_path, capsys, summary, fragment):
    (tmp_path / "s.json").write_text(json.dumps(summary))
    code = main(["sample", "--model", "dit-digits", "--adaptive", "--summary", str(tmp_path / "s.json"), "--radius",
                 "1",
                 "--num", "2", "--steps", "2", "--out", str(tmp_path / "o"), "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
