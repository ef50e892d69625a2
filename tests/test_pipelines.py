"""Plans run inside diffusers' own pipelines (SD3, FLUX) through step callbacks equal critsample's sampler; what a
pipeline cannot express (FLUX mixing step kinds, PixArt at all) is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import T5_LENGTH

import critsample
from critsample import Plan, plans
from critsample.errors import UserError
from critsample.models.flux import unpack
from critsample.pipelines import FluxPlanCallback, SD3PlanCallback, plan_callback


def test_sd3_pipeline_runs_an_adaptive_plan_like_critsample(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    model = critsample.load(str(sd3_folder), text_encoders=False)
    g = torch.Generator().manual_seed(5)
    cond = critsample.PromptCond(torch.randn(2, 9, 32, generator=g), torch.randn(2, 16, generator=g))
    model.null_cond = critsample.PromptCond(torch.randn(1, 9, 32, generator=g), torch.randn(1, 16, generator=g))
    null = model.null(cond)
    # the paper's mode: the prompt switches per step
    plan = plans.adaptive(model, 6, 4.0, (0.3, 0.7), 1, "local-uncond")
    assert {s.mode for s in plan.steps} == {"guided", "uncond"} and plan.steps[0].mode == "uncond"
    z = critsample.sample(model, plan, cond, generator=torch.Generator().manual_seed(3))

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, transformer=model.transformer, text_encoder=None,
                                                    text_encoder_2=None, text_encoder_3=None, tokenizer=None,
                                                    tokenizer_2=None, tokenizer_3=None)
    x = torch.empty(1, *model.sample_shape)
    cb = SD3PlanCallback(plan, cond, null, grid=model.grid(x))
    h, w = (s * pipe.vae_scale_factor for s in model.sample_shape[-2:])
    ref = pipe(num_inference_steps=6, height=h, width=w, generator=torch.Generator().manual_seed(3),
               output_type="latent",
               **cb.pipeline_kwargs()).images
    assert (z - ref).abs().max() <= 1e-4
    # and the plan mattered: full guidance gives something else
    full = critsample.sample(model, plans.full_guidance(model, 6, 4.0), cond,
                             generator=torch.Generator().manual_seed(3))
    assert (full - z).abs().max() > 1e-3


# -- one plan callback per pipeline family (critsample.pipelines' module docstring says what each supports) ---------
def _flux(flux_folders, kind: str):
    from diffusers import FluxPipeline

    model = critsample.load(str(flux_folders[kind]), text_encoders=False, max_sequence_length=T5_LENGTH)
    g = torch.Generator().manual_seed(11)
    cond = critsample.PromptCond(torch.randn(2, T5_LENGTH, 32, generator=g), torch.randn(2, 16, generator=g))
    model.null_cond = critsample.PromptCond(torch.randn(1, T5_LENGTH, 32, generator=g), torch.randn(1, 16, generator=g))
    pipe = FluxPipeline.from_pretrained(flux_folders[kind], transformer=model.transformer, text_encoder=None,
                                        text_encoder_2=None,
                                        tokenizer=None, tokenizer_2=None)
    return model, cond, pipe


def _flux_run(model, pipe, plan, cond, seed: int) -> torch.Tensor:
    cb = plan_callback(pipe, plan, cond, model.null(cond), grid=model.token_grid,
                       distilled_guidance=model.distilled_guidance)
    assert isinstance(cb, FluxPlanCallback)
    h, w = (s * pipe.vae_scale_factor for s in model.sample_shape[-2:])
    packed = pipe(num_inference_steps=len(plan.steps), height=h, width=w, generator=torch.Generator().manual_seed(seed),
                  output_type="latent", max_sequence_length=T5_LENGTH, **cb.pipeline_kwargs()).images
    return unpack(packed, *model.token_grid)


def test_flux_pipeline_runs_an_adaptive_plan_like_critsample(flux_folders):
    model, cond, pipe = _flux(flux_folders, "dev")
    # the distilled model's adaptive plan: global inside the window, local(r=1) conditional outside
    plan = plans.adaptive(model, 6, 1.0, (0.4, 0.8), 1, outside="local-cond")
    assert {s.radius for s in plan.steps} == {None, 1} and {s.mode for s in plan.steps} == {"cond"}
    z = critsample.sample(model, plan, cond, generator=torch.Generator().manual_seed(4))
    assert (z - _flux_run(model, pipe, plan, cond, 4)).abs().max() <= 1e-4
    # and the radius mattered: the global plan gives something else
    plain = critsample.sample(model, plans.full_guidance(model, 6, 1.0), cond,
                              generator=torch.Generator().manual_seed(4))
    assert (plain - z).abs().max() > 1e-3


def test_what_pipelines_cannot_express_is_refused(flux_folders, pixart_sigma_folder):
    from diffusers import PixArtSigmaPipeline

    model, cond, pipe = _flux(flux_folders, "dev")
    mixed = plans.adaptive(model, 6, 3.0, (0.4, 0.8), 1, "local-uncond")  # guided inside, unconditional outside
    with pytest.raises(UserError, match="mixes uncond, guided\\(w=3\\)"):
        plan_callback(pipe, mixed, cond, model.null(cond), grid=model.token_grid)
    with pytest.raises(UserError, match="above 1"):
        plan_callback(pipe, Plan.guided(3, 0.5), cond, model.null(cond), grid=model.token_grid)
    pixart = PixArtSigmaPipeline.from_pretrained(pixart_sigma_folder)
    with pytest.raises(UserError, match="PixArtSigmaPipeline cannot run a critsample plan"):
        plan_callback(pixart, plans.full_guidance(model, 3, 3.0), cond, model.null(cond), grid=model.token_grid)
