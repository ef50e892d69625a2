"""Stable Diffusion 3 (diffusers MMDiT) behind the denoiser interface.

Flow matching: ``x_t = (1 - sigma) x_0 + sigma eps`` with ``t = sigma``; the network predicts the velocity
``eps - x_0`` and is called with ``timestep = 1000 sigma`` (noise.py). Text conditioning is a
:class:`~critsample.denoisers.PromptCond` from diffusers' own ``StableDiffusion3Pipeline.encode_prompt``
(CLIP-L + CLIP-G + T5); the unconditional prompt is the empty string, as the pipeline's default negative prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn

from ..attention import check_radius, install_window_attention
from ..denoisers import PromptCond, TextDenoiser, autocast
from ..errors import UserError
from ..noise import Schedule
from .loaders import load_parts, load_text_pipeline

_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class SD3Denoiser(TextDenoiser):
    """Velocity-prediction SD3 / SD3.5 transformer with window attention, optional VAE and optional text encoders.

    ``text`` is a ``StableDiffusion3Pipeline`` used only for :meth:`encode_prompt`; without it the denoiser works on
    prompt embeddings, and :meth:`null` needs ``null_cond`` (the empty-prompt embeddings) to be set by the caller.
    """

    prediction = "velocity"
    family = "sd3"
    pixel_space = False
    num_classes = None
    default_guidance = 7.0  # StableDiffusion3Pipeline's default guidance_scale
    strict_layout = "center"  # joint attention: text tokens would carry one window's content to another

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        schedule: Schedule | None = None,
        vae: AutoencoderKL | None = None,
        text=None,
        *,
        max_sequence_length: int = 256,
        name: str = "sd3",
        scheduler_config: dict | None = None,
    ):
        super().__init__(scheduler_config)
        self.transformer = transformer
        self.vae = vae
        self.schedule = schedule or Schedule(kind="flow")
        if self.schedule.kind != "flow":
            raise ValueError(f"SD3 is a flow-matching model; got a {self.schedule.kind!r} schedule.")
        cfg = transformer.config
        self.patch_size = int(cfg.patch_size)
        self.in_channels = int(cfg.in_channels)
        self.sample_shape = (self.in_channels, int(cfg.sample_size), int(cfg.sample_size))
        self.max_sequence_length = int(max_sequence_length)
        self.name = name
        self.text = text
        # CLIP (77 in SD3, the tokenizers' length) + T5 tokens of joint attention (FLOPs accounting)
        self.text_tokens = (self._clip_length() if text is not None else 77) + self.max_sequence_length
        # Registered so that .to(device) / .eval() reach them; the pipeline `text` holds the same objects.
        encoders = [getattr(text, k, None) for k in ("text_encoder", "text_encoder_2",
                                                     "text_encoder_3")] if text is not None else []
        self.text_encoders = nn.ModuleList([m for m in encoders if m is not None])
        install_window_attention(transformer)

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str, max_sequence_length: int | None = None) -> PromptCond:
        """Prompt embeddings ``(B, 77 + T5 length, D)`` and pooled ``(B, P)`` from diffusers' SD3 pipeline."""
        if self.text is None:
            raise UserError(
                f"{self.name} was loaded without text encoders: load it from a folder with text_encoder*/ and "
                f"tokenizer*/ (and `pip install critsample[sd3]`), or pass PromptCond embeddings directly."
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.text_encoders[0].device
        embeds, _, pooled, _ = self.text.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or self.max_sequence_length,
        )
        return PromptCond(embeds, pooled)

    def _clip_length(self) -> int:
        return int(self.text.tokenizer_max_length)

    def _empty_prompt(self, seq: int) -> PromptCond:
        # Same token layout as the prompts: the CLIP tokens (77 in SD3) followed by the T5 tokens.
        return self.encode_prompt([""], max_sequence_length=seq - self._clip_length())

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptCond, radius=None, blocks=None) -> torch.Tensor:
        grid = self.grid(x)
        check_radius(radius, grid)
        dtype = self.transformer.dtype
        timestep = self.schedule.native(t.detach().cpu()).to(x.device, torch.float32)  # 1000 sigma, as the pipeline
        with autocast(x.device):
            out = self.transformer(
                hidden_states=x.to(dtype),
                encoder_hidden_states=cond.embeds.to(x.device, dtype),
                pooled_projections=cond.pooled.to(x.device, dtype),
                timestep=timestep,
                joint_attention_kwargs={"radius": radius, "grid": grid, "blocks": blocks},
            ).sample
        return out.to(x.dtype)

    # -- pixel space ---------------------------------------------------------------------------


def _load_text(folder: Path, transformer, vae, dtype: torch.dtype, t5: bool):
    """diffusers' own SD3 pipeline around the already loaded transformer / VAE, for its ``encode_prompt``."""
    # Parts a folder lacks (or T5 when dropped) are None; the pipeline then embeds T5 as zeros, as diffusers does.
    skip = {k: None for k in _TEXT_PARTS if not (folder / k).exists() or (not t5 and k.endswith("_3"))}
    return load_text_pipeline("StableDiffusion3Pipeline", folder, "SD3", transformer, vae, dtype, **skip)


def load_sd3(
    folder: Path,
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoders: bool = True,
    t5: bool = True,
    max_sequence_length: int = 256,
) -> SD3Denoiser:
    """An SD3 pipeline folder (transformer/, vae/, scheduler/, text_encoder*/, tokenizer*/) or a bare transformer
    folder.

    ``text_encoders=False`` skips CLIP and T5 (prompt-embedding-level use); ``t5=False`` drops only T5.
    """
    folder = Path(folder)
    transformer, vae, sched_cfg = load_parts(
        folder, SD3Transformer2DModel, dtype, "an SD3",
        default_scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler"}
    )
    has_text = (folder / "model_index.json").exists() and (folder / "text_encoder").exists()
    text = _load_text(folder, transformer, vae, dtype, t5) if text_encoders and has_text else None
    model = SD3Denoiser(
        transformer, Schedule.from_scheduler_config(sched_cfg), vae, text, max_sequence_length=max_sequence_length,
        name=name,
        scheduler_config=sched_cfg,
    )
    return model
