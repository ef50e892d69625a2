"""An adaptive plan run by diffusers' own StableDiffusion3Pipeline equals critsample's sampler."""

from __future__ import annotations

import torch

import critsample
from critsample import plans
from critsample.pipelines import SD3PlanCallback


def test_sd3_pipeline_runs_an_adaptive_plan_like_critsample(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    model = critsample.load(str(sd3_folder), text_encoders=False)
    g = torch.Generator().manual_seed(5)
    cond = critsample.PromptCond(torch.randn(2, 9, 32, generator=g), torch.randn(2, 16, generator=g))
    model.null_cond = critsample.PromptCond(torch.randn(1, 9, 32, generator=g), torch.randn(1, 16, generator=g))
    null = model.null(cond)
    plan = plans.adaptive(model, 6, 4.0, (0.3, 0.7), 1)
    assert {s.mode for s in plan.steps} == {"guided", "uncond"} and plan.steps[0].mode == "uncond"
    z = critsample.sample(model, plan, cond, generator=torch.Generator().manual_seed(3))

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, transformer=model.transformer, text_encoder=None,
                                                    text_encoder_2=None, text_encoder_3=None, tokenizer=None,
                                                    tokenizer_2=None, tokenizer_3=None)
    x = torch.empty(1, *model.sample_shape)
    cb = SD3PlanCallback(plan, cond, null, grid=model.grid(x))
    h, w = (s * pipe.vae_scale_factor for s in model.sample_shape[-2:])
    ref = pipe(num_inference_steps=6, height=h, width=w, generator=torch.Generator().manual_seed(3), output_type="latent",
               **cb.pipeline_kwargs()).images
    assert (z - ref).abs().max() <= 1e-4
    # and the plan mattered: full guidance gives something else
    full = critsample.sample(model, plans.full_guidance(model, 6, 4.0), cond, generator=torch.Generator().manual_seed(3))
    assert (full - z).abs().max() > 1e-3
