"""Run a critsample plan inside diffusers' own ``StableDiffusion3Pipeline`` (no copy of its loop).

The pipeline reads its guidance scale, its prompt embeddings and its ``joint_attention_kwargs`` afresh at every step,
and ``callback_on_step_end`` may replace the embeddings and change the pipeline's state after each step. So a callback
can give every step the denoiser the plan names: guided (CFG batch [null; prompt]), conditional or unconditional (one
row per image: the prompt or the null embeddings), with any attention radius. Example::

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
from .sampling import Plan, Step


class SD3PlanCallback:
    """``callback_on_step_end`` that makes step i + 1 of the pipeline follow ``plan.steps[i + 1]``.

    ``grid`` is the image-token grid (latent size / patch size); ``cond`` and ``null`` hold one row per image.
    The pipeline's transformer must carry critsample's window processors (``critsample.load`` installs them).
    """

    def __init__(self, plan: Plan, cond: PromptCond, null: PromptCond, grid: tuple[int, int]):
        self.plan, self.cond, self.null, self.grid = plan, cond, null, tuple(grid)

    def _attention(self, step: Step) -> dict:
        return {"radius": step.radius, "grid": self.grid}

    def pipeline_kwargs(self) -> dict:
        """Arguments of the pipeline call that configure step 0 and install the callback."""
        first = self.plan.steps[0]
        kw = {
            "joint_attention_kwargs": self._attention(first),
            "callback_on_step_end": self,
            "callback_on_step_end_tensor_inputs": ["prompt_embeds", "pooled_prompt_embeds"],
        }
        if first.mode == "guided" and first.guidance > 1:
            return {**kw, "guidance_scale": first.guidance, "prompt_embeds": self.cond.embeds,
                    "pooled_prompt_embeds": self.cond.pooled, "negative_prompt_embeds": self.null.embeds,
                    "negative_pooled_prompt_embeds": self.null.pooled}
        rows = self.null if first.mode == "uncond" else self.cond
        return {**kw, "guidance_scale": 1.0, "prompt_embeds": rows.embeds, "pooled_prompt_embeds": rows.pooled}

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        if i + 1 >= len(self.plan.steps):
            return {}
        step = self.plan.steps[i + 1]
        pipe._joint_attention_kwargs = self._attention(step)
        if step.mode == "guided" and step.guidance > 1:
            pipe._guidance_scale = step.guidance  # the pipeline batches [negative; positive]
            embeds = torch.cat([self.null.embeds, self.cond.embeds])
            pooled = torch.cat([self.null.pooled, self.cond.pooled])
        else:
            pipe._guidance_scale = 1.0
            rows = self.null if step.mode == "uncond" else self.cond
            embeds, pooled = rows.embeds, rows.pooled
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
