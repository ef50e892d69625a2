"""The plan sampler against diffusers' own pipelines, solver history at plan switches, callbacks and plans."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import critsample
from critsample import Plan, Step
from critsample.sampling import make_scheduler, step_times


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- equality with diffusers' pipelines -------------------------------------------------------
def _dit_pipeline_images(pipe, *args, **kwargs) -> torch.Tensor:
    """``DiTPipeline(..., output_type="pt").images`` as (B, C, H, W): before diffusers 0.41 it came channels-last."""
    images = torch.as_tensor(pipe(*args, output_type="pt", **kwargs).images)
    return images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)


def test_dit_dpm_solver_equals_dit_pipeline_with_dpm(dit, dit_folder):
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    pipe = DiTPipeline.from_pretrained(dit_folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # diffusers' documented swap
    ref = _dit_pipeline_images(pipe, [5], guidance_scale=3.0, generator=_gen(1), num_inference_steps=5)
    z = critsample.sample(dit, Plan.guided(5, 3.0, sampler="dpm"), torch.tensor([5]), generator=_gen(1))
    assert torch.isfinite(z).all()
    assert (dit.decode(z) - ref).abs().max() <= 1e-4


def test_sd3_embedding_level_plan_equals_sd3_pipeline(sd3_folder):
    """Without text encoders: the same prompt embeddings go to the pipeline and to critsample (null = negative)."""
    from diffusers import StableDiffusion3Pipeline

    model = critsample.load(str(sd3_folder), text_encoders=False)
    g = _gen(11)
    cond = critsample.PromptCond(torch.randn(2, 9, 32, generator=g), torch.randn(2, 16, generator=g))
    model.null_cond = critsample.PromptCond(torch.randn(1, 9, 32, generator=g), torch.randn(1, 16, generator=g))
    null = model.null(cond)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder=None, text_encoder_2=None,
                                                    text_encoder_3=None,
                                                    tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    ref = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=null.embeds,
               negative_pooled_prompt_embeds=null.pooled, guidance_scale=5.0, num_inference_steps=3,
               generator=_gen(4), output_type="latent").images
    z = critsample.sample(model, Plan.guided(3, 5.0), cond, generator=_gen(4))
    assert (z - ref).abs().max() <= 1e-4


# -- switching denoisers inside a multistep solver --------------------------------------------
def _switching_plan(sampler: str, on_switch: str) -> Plan:
    steps = [Step("guided", None, 4.0)] * 3 + [Step("uncond")] * 2 + [Step("cond")] * 2
    return Plan(steps, sampler=sampler, on_switch=on_switch)


def test_on_switch_matters_only_when_the_plan_switches(dit):
    labels = torch.tensor([1, 2])

    def run(plan: Plan) -> torch.Tensor:
        return critsample.sample(dit, plan, labels, generator=_gen(0))

    steady = Plan.guided(7, 4.0, sampler="dpm")
    steady_keep = Plan.from_dict({**steady.to_dict(), "on_switch": "keep"})
    assert torch.equal(run(steady), run(steady_keep))
    reset, keep = run(_switching_plan("dpm", "reset")), run(_switching_plan("dpm", "keep"))
    assert (reset - keep).abs().max() > 1e-4  # DPM-Solver++ history is cleared at the two switches
    # single-step DDIM has no history: the option changes nothing
    assert torch.equal(run(_switching_plan("ddim", "reset")), run(_switching_plan("ddim", "keep")))


def test_reset_makes_the_step_after_a_switch_first_order(dit):
    """With a reset, the steps after the switch equal a fresh first-order start from the switch state."""
    labels = torch.tensor([4])
    states = {}
    plan = _switching_plan("dpm", "reset")
    critsample.sample(dit, plan, labels, generator=_gen(2), callback=lambda d: states.__setitem__(d["i"], d["x"]))
    sch = make_scheduler(dit, "dpm")
    sch.set_timesteps(len(plan.steps))
    sch._step_index = 3  # continue from the switch as if the solver had just started there
    x = states[2]
    for i in (3, 4):
        ts = sch.timesteps[i]
        pred = dit.predict(x, float(ts) / 1000, dit.null(labels))
        x = sch.step(pred, ts, x).prev_sample
    assert (x - states[4]).abs().max() <= 1e-5


# -- callback, plans ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_callback_sees_every_step(dit, sd3, which):
    model = dit if which == "dit" else sd3
    cond = torch.tensor([0]) if which == "dit" else sd3.encode_prompt(["cat"])
    plan = Plan.from_rule(model, 5, lambda t: Step("guided", None, 2.0) if t > 0.5 else Step("cond"))
    seen = []
    out = critsample.sample(model, plan, cond, generator=_gen(0), callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert [d["step"] for d in seen] == plan.steps
    assert [d["t"] for d in seen] == pytest.approx(plan.times)
    assert all(a["t"] > b["t"] for a, b in itertools.pairwise(seen))
    assert torch.equal(seen[-1]["x"], out)
    assert all(d["prediction"].shape == out.shape for d in seen)


def test_step_times_follow_the_integrators(dit, sd3):
    assert step_times(dit, 4) == pytest.approx([0.75, 0.5, 0.25, 0.0])  # DDIM "leading" spacing, steps_offset 0
    sch = make_scheduler(sd3)
    sch.set_timesteps(3)
    assert step_times(sd3, 3) == pytest.approx(sch.sigmas[:3].tolist())  # t = shifted sigma


def test_plan_dict_round_trip(dit):
    plan = Plan.from_rule(dit, 6, lambda t: Step("guided", None, 4.0) if t > 0.4 else Step("uncond", 1), sampler="dpm",
                          name="window")
    plan.on_switch = "keep"
    d = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(d) == plan
    assert d["forwards_per_sample"] == plan.forwards == sum(2 if s.mode == "guided" else 1 for s in plan.steps)
    assert "uncond/local(r=1)" in plan.describe()


def test_bad_sampler_names_raise(dit, sd3):
    with pytest.raises(ValueError, match="Unknown sampler"):
        Plan.guided(3, 2.0, sampler="heun")
    with pytest.raises(ValueError, match="Unknown step mode"):
        Plan([Step("sometimes")])
    with pytest.raises(ValueError):
        make_scheduler(dit, "euler")  # flow-matching integrator for a DDPM model
    with pytest.raises(ValueError):
        critsample.sample(sd3, Plan.guided(3, 2.0, sampler="dpm"), sd3.encode_prompt(["cat"]))
