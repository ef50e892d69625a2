"""Run a critsample plan inside diffusers' own pipelines through ``callback_on_step_end`` (no copy of their loops).

A pipeline that reads its attention kwargs afresh at every step lets a callback give every step of the plan its
attention radius; what else a callback can change per step depends on the pipeline (diffusers 0.42):

- ``StableDiffusion3Pipeline`` (:class:`SD3PlanCallback`): everything. It reads ``guidance_scale`` and
  ``joint_attention_kwargs`` at every step, and the callback may replace ``prompt_embeds`` / ``pooled_prompt_embeds``,
  so each step can be guided(w > 1) (the batch [null; prompt]), conditional or unconditional (one row per image: the
  prompt or the null embeddings), with any radius: full, interval and adaptive plans all run.
- ``FluxPipeline`` (:class:`FluxPlanCallback`): the radius only. True CFG (``true_cfg_scale``), the negative
  embeddings and the pooled embeddings are fixed when the call starts, so every step must name the same denoiser:
  guided with one w > 1 (true CFG against the null rows), conditional (FLUX's default, the distilled model alone) or
  unconditional, each with any radius per step. That covers full guidance and the adaptive plan of the distilled
  model (``guidance = 1``, ``outside="local-cond"``: global inside the window, local outside); a plan that switches
  between guided, conditional and unconditional steps raises a :class:`~critsample.errors.UserError`.
- ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: nothing. They have no ``callback_on_step_end`` (only the legacy
  ``callback(step, t, latents)``), keep ``guidance_scale`` in a local variable and call the transformer without
  ``cross_attention_kwargs``; :func:`plan_callback` refuses them. Sample PixArt plans with ``critsample.sample``.
- Plans with outside step kinds (gaussian, local-linear, student: :mod:`critsample.outside`): refused by every
  callback (one sentence), which cannot replace the pipeline's own transformer call; sample them with
  ``critsample.sample``.

Both supported pipelines integrate with their own scheduler (FlowMatchEuler, single-step), so a run equals
``critsample.sample`` with the same plan and latents. The pipeline's transformer must carry critsample's window
processors (``critsample.load`` installs them on ``model.transformer``). Example::

    import critsample
    from critsample import plans
    from critsample.pipelines import SD3PlanCallback

    model = critsample.load("sd3-medium")                      # window processors are installed on model.transformer
    pipe = model.text                                          # the diffusers StableDiffusion3Pipeline sharing it
    plan = plans.adaptive(model, 28, 7.0, window=(0.55, 0.85), radius=8)
    cond = model.encode_prompt(["a golden retriever playing in a park"])
    cb = SD3PlanCallback(plan, cond, model.null(cond), grid=(64, 64))
    image = pipe(num_inference_steps=28, height=1024, width=1024, **cb.pipeline_kwargs()).images[0]
"""

from __future__ import annotations

import torch

from .denoisers import PromptCond
from .errors import UserError
from .models.flux import DEV_GUIDANCE
from .sampling import Plan, Step


def _guided(step: Step) -> bool:
    return step.mode == "guided"


class PlanCallback:
    """``callback_on_step_end`` that makes step i + 1 of the pipeline follow ``plan.steps[i + 1]``.

    ``grid`` is the image-token grid (latent size / patch size); ``cond`` and ``null`` hold one row per image.
    Subclasses say how a step's rows and guidance reach their pipeline (:meth:`_rows`, :meth:`_switch`).
    """

    pipeline: str = "a diffusers pipeline"
    tensor_inputs: tuple[str, ...] = ()  # the tensors the callback returns (``callback_on_step_end_tensor_inputs``)

    def __init__(self, plan: Plan, cond: PromptCond, null: PromptCond, grid: tuple[int, int]):
        self.plan, self.cond, self.null, self.grid = plan, cond, null, tuple(grid)
        kinds = sorted({s.kind for s in plan.steps} - {"network"})
        if kinds:  # the pipeline calls its transformer itself: a callback cannot put another denoiser in its place
            raise UserError(f"{self.pipeline} runs its own transformer at every step, but the plan has {kinds[0]} "
                            "steps; sample plans with outside kinds with critsample.sample.")
        low = sorted({s.guidance for s in plan.steps if _guided(s) and s.guidance < 1})
        if low:
            raise UserError(
                f"{self.pipeline} guides only with a scale above 1, but the plan has guided steps with w = {low[0]:g}; "
                f"sample this plan with critsample.sample."
            )

    def _attention(self, step: Step) -> dict:
        return {"radius": step.radius, "grid": self.grid}

    def _rows(self, step: Step) -> dict:
        """Pipeline arguments that make the first step ``step`` (guidance scale and prompt rows)."""
        raise NotImplementedError

    def _switch(self, pipe, step: Step) -> dict:
        """Change the pipeline's state so that its next step is ``step``; return the tensors to replace."""
        return {}

    def pipeline_kwargs(self) -> dict:
        """Arguments of the pipeline call that configure step 0 and install the callback."""
        first = self.plan.steps[0]
        return {
            "joint_attention_kwargs": self._attention(first),
            "callback_on_step_end": self,
            "callback_on_step_end_tensor_inputs": list(self.tensor_inputs),
            **self._rows(first),
        }

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        if i + 1 >= len(self.plan.steps):
            return {}
        step = self.plan.steps[i + 1]
        pipe._joint_attention_kwargs = self._attention(step)  # the pipelines read it afresh at every step
        return self._switch(pipe, step)


class SD3PlanCallback(PlanCallback):
    """Any plan inside ``StableDiffusion3Pipeline``: guided, conditional and unconditional steps, any radius."""

    pipeline = "StableDiffusion3Pipeline"
    tensor_inputs = ("prompt_embeds", "pooled_prompt_embeds")

    def _rows(self, step: Step) -> dict:
        if _guided(step):
            return {"guidance_scale": step.guidance, "prompt_embeds": self.cond.embeds,
                    "pooled_prompt_embeds": self.cond.pooled,
                    "negative_prompt_embeds": self.null.embeds, "negative_pooled_prompt_embeds": self.null.pooled}
        rows = self.null if step.mode == "uncond" else self.cond
        return {"guidance_scale": 1.0, "prompt_embeds": rows.embeds, "pooled_prompt_embeds": rows.pooled}

    def _switch(self, pipe, step: Step) -> dict:
        if _guided(step):
            pipe._guidance_scale = step.guidance  # the pipeline batches [negative; positive]
            return {"prompt_embeds": torch.cat([self.null.embeds, self.cond.embeds]),
                    "pooled_prompt_embeds": torch.cat([self.null.pooled, self.cond.pooled])}
        pipe._guidance_scale = 1.0
        rows = self.null if step.mode == "uncond" else self.cond
        return {"prompt_embeds": rows.embeds, "pooled_prompt_embeds": rows.pooled}


class FluxPlanCallback(PlanCallback):
    """A plan of one denoiser kind with any radius per step inside ``FluxPipeline`` (module docstring).

    ``distilled_guidance`` is the guidance input of a guidance-distilled transformer (FLUX.1-dev:
    ``model.distilled_guidance``, the pipeline's ``guidance_scale``); the pipeline ignores it for schnell.
    """

    pipeline = "FluxPipeline"

    def __init__(self, plan: Plan, cond: PromptCond, null: PromptCond, grid: tuple[int, int],
                 distilled_guidance: float | None = DEV_GUIDANCE):
        super().__init__(plan, cond, null, grid)
        kinds = list(dict.fromkeys((s.mode, s.guidance if _guided(s) else None) for s in plan.steps))
        if len(kinds) > 1:
            named = ", ".join(f"guided(w={g:g})" if m == "guided" else m for m, g in kinds)
            raise UserError(
                "FluxPipeline fixes true CFG, the negative prompt and the pooled embeddings for the whole call, so a "
                "plan run inside it must use one denoiser at every step (only the radius may change); this plan mixes "
                f"{named}. Sample it with critsample.sample, or use one kind (e.g. plans.adaptive(..., guidance=1, "
                "outside='local-cond'))."
            )
        self.distilled_guidance = distilled_guidance

    def _rows(self, step: Step) -> dict:
        kw = {} if self.distilled_guidance is None else {"guidance_scale": float(self.distilled_guidance)}
        if _guided(step):  # true CFG: the pipeline runs the prompt and the negative rows as two forwards
            return {**kw, "true_cfg_scale": step.guidance, "prompt_embeds": self.cond.embeds,
                    "pooled_prompt_embeds": self.cond.pooled,
                    "negative_prompt_embeds": self.null.embeds, "negative_pooled_prompt_embeds": self.null.pooled}
        rows = self.null if step.mode == "uncond" else self.cond
        return {**kw, "true_cfg_scale": 1.0, "prompt_embeds": rows.embeds, "pooled_prompt_embeds": rows.pooled}


CALLBACKS: dict[str, type[PlanCallback]] = {"StableDiffusion3Pipeline": SD3PlanCallback,
                                            "FluxPipeline": FluxPlanCallback}


def plan_callback(pipe, plan: Plan, cond: PromptCond, null: PromptCond, grid: tuple[int, int],
                  **kwargs) -> PlanCallback:
    """The plan callback of ``pipe``'s class (``kwargs`` go to it, e.g. FLUX's ``distilled_guidance``); a
    :class:`UserError` for a pipeline that cannot run plans (PixArt's: no ``callback_on_step_end``)."""
    name = type(pipe).__name__
    if name not in CALLBACKS:
        raise UserError(
            f"{name} cannot run a critsample plan: plans run inside {' and '.join(CALLBACKS)} only (PixArt's pipelines "
            "have no callback_on_step_end and fix guidance and attention for the whole call); sample with "
            "critsample.sample."
        )
    return CALLBACKS[name](plan, cond, null, grid, **kwargs)
