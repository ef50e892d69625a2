"""PixArt-alpha / PixArt-Sigma (diffusers ``PixArtTransformer2DModel``) behind the denoiser interface.

DDPM eps-prediction with learned variance (``out_channels = 2 in_channels``; the variance half is dropped, as DiT's),
timestep ``k = round(1000 t)`` (noise.py). Text enters only through cross-attention (``attn2``) on T5 token embeddings
with their padding mask: a :class:`~critsample.denoisers.PromptCond` with ``mask`` set and an empty ``pooled``
(B, 0), from diffusers' own ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline.encode_prompt``; the unconditional prompt
is the empty string, as the pipelines' default negative prompt.

The local denoiser windows the self-attention ``attn1`` of every block (the paper's image-token window); the
cross-attention to the text stays dense, as text tokens in SD3's joint attention do (processors in ``attention.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from torch import nn

from ..attention import check_radius, install_pixart_window_attention
from ..denoisers import PromptCond, TextDenoiser, autocast
from ..errors import UserError
from ..noise import Kind, Schedule
from .loaders import load_parts, load_text_pipeline, read_json

# The pipelines' ``max_sequence_length`` defaults: T5 tokens per prompt (PixArt-alpha paper sec. 3.1; Sigma raised it).
MAX_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
_PREDICTIONS: dict[str, Kind] = {"epsilon": "eps", "sample": "x0"}


class PixArtDenoiser(TextDenoiser):
    """eps-prediction PixArt transformer with window self-attention, optional VAE and optional T5 text encoder.

    ``text`` is a ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` used only for :meth:`encode_prompt`; without it
    the denoiser works on prompt embeddings, and :meth:`null` needs ``null_cond`` (the empty-prompt embeddings with
    their mask) to be set by the caller.
    """

    family = "pixart"
    strict_layout = "blocks"  # text enters by cross-attention only: disjoint windows share a copy
    pixel_space = False
    num_classes = None
    default_guidance = 4.5  # the PixArt pipelines' default guidance_scale

    def __init__(
        self,
        transformer: PixArtTransformer2DModel,
        schedule: Schedule | None = None,
        vae: AutoencoderKL | None = None,
        text=None,
        *,
        max_sequence_length: int = MAX_TOKENS["PixArtAlphaPipeline"],
        name: str = "pixart",
        scheduler_config: dict | None = None,
    ):
        super().__init__(scheduler_config)
        self.transformer = transformer
        self.vae = vae
        self.schedule = schedule or Schedule(kind="ddpm")
        if self.schedule.kind != "ddpm":
            raise ValueError(f"PixArt is a DDPM model; got a {self.schedule.kind!r} schedule.")
        ptype = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if ptype not in _PREDICTIONS:
            raise UserError(
                f"{name}'s scheduler declares prediction_type {ptype!r}; critsample supports PixArt models that "
                "predict epsilon or sample."
            )
        self.prediction = _PREDICTIONS[ptype]
        cfg = transformer.config
        self.patch_size = int(cfg.patch_size)
        self.in_channels = int(cfg.in_channels)
        self.learned_sigma = int(transformer.out_channels) == 2 * self.in_channels
        self.sample_shape = (self.in_channels, int(cfg.sample_size), int(cfg.sample_size))
        self.caption_channels = int(cfg.caption_channels) if cfg.caption_channels is not None else None
        # The pipelines' vae_scale_factor (8 without a VAE): latent pixels -> image pixels for the micro-conditions.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.max_sequence_length = int(max_sequence_length)
        self.text_tokens = 0  # no joint attention; the T5 tokens are cross-attention keys (FLOPs accounting below)
        self.cross_tokens = self.max_sequence_length
        self.name = name
        self.text = text
        # Registered so that .to(device) / .eval() reach it; the pipeline `text` holds the same object.
        encoder = getattr(text, "text_encoder", None) if text is not None else None
        self.text_encoders = nn.ModuleList([encoder] if encoder is not None else [])
        install_pixart_window_attention(transformer)

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str, max_sequence_length: int | None = None) -> PromptCond:
        """T5 embeddings ``(B, T, caption_channels)``, their mask ``(B, T)`` and an empty pooled ``(B, 0)``, from
        diffusers' PixArt pipeline (``T = max_sequence_length``, padded: the mask marks the prompt's tokens)."""
        if self.text is None:
            raise UserError(
                f"{self.name} was loaded without its T5 text encoder: load it from a folder with text_encoder/ and "
                f"tokenizer/ (and `pip install transformers sentencepiece`), or pass PromptCond embeddings directly."
            )
        from diffusers.utils import is_bs4_available, is_ftfy_available

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, mask, _, _ = self.text.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.text_encoders[0].device,
            max_sequence_length=max_sequence_length or self.max_sequence_length,
            # The pipelines' __call__ cleans captions by default, and falls back to lowercasing without bs4 / ftfy.
            clean_caption=is_bs4_available() and is_ftfy_available(),
        )
        return PromptCond(embeds, embeds.new_zeros(embeds.shape[0], 0), mask)


    def check_cond(self, cond, batch: int) -> None:
        super().check_cond(cond, batch)
        width = cond.embeds.shape[-1]
        if self.caption_channels is not None and width != self.caption_channels:
            raise ValueError(f"{self.name} takes T5 embeddings of width {self.caption_channels}; got {width}.")
        if cond.mask is not None and tuple(cond.mask.shape) != tuple(cond.embeds.shape[:2]):
            raise ValueError(f"The text mask is {tuple(cond.mask.shape)} but the embeddings have "
                             f"{tuple(cond.embeds.shape[:2])} tokens.")

    def _micro_conditions(self, x: torch.Tensor, dtype: torch.dtype) -> dict:
        """PixArt-alpha's resolution / aspect-ratio embedding inputs (image pixels), as PixArtAlphaPipeline builds them;
        ``None`` for models without them (Sigma, and alpha below 1024 px: ``use_additional_conditions``)."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        b = x.shape[0]
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        resolution = torch.tensor([h, w], dtype=dtype, device=x.device).repeat(b, 1)  # (B, 2)
        aspect_ratio = torch.tensor([float(h / w)], dtype=dtype, device=x.device).repeat(b, 1)  # (B, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptCond, radius=None, blocks=None) -> torch.Tensor:
        grid = self.grid(x)
        check_radius(radius, grid)
        dtype = self.transformer.dtype
        timestep = self.schedule.native(t.detach().cpu()).to(x.device)  # DDPM step k, as the pipelines' timesteps
        mask = None if cond.mask is None else cond.mask.to(x.device)  # (B, T); the transformer makes it a bias
        with autocast(x.device):
            out = self.transformer(
                x.to(dtype),
                encoder_hidden_states=cond.embeds.to(x.device, dtype),
                encoder_attention_mask=mask,
                timestep=timestep,
                added_cond_kwargs=self._micro_conditions(x, dtype),
                cross_attention_kwargs={"radius": radius, "grid": grid, "blocks": blocks},
            ).sample
        return out[:, : self.in_channels].to(x.dtype)  # learned variance channels are not used by DDIM / DPM



def _pipeline_class(folder: Path) -> str:
    """``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` from model_index.json (alpha for a bare transformer)."""
    index = folder / "model_index.json"
    cls = read_json(index).get("_class_name", "") if index.exists() else ""
    return cls if cls in MAX_TOKENS else "PixArtAlphaPipeline"


def _load_text(folder: Path, pipeline: str, transformer, vae, dtype: torch.dtype):
    """diffusers' own PixArt pipeline around the already loaded transformer / VAE, for its ``encode_prompt``."""
    return load_text_pipeline(pipeline, folder, "PixArt", transformer, vae, dtype)


def load_pixart(
    folder: Path,
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoders: bool = True,
    max_sequence_length: int | None = None,
) -> PixArtDenoiser:
    """A PixArt-alpha / Sigma pipeline folder (transformer/, vae/, scheduler/, text_encoder/, tokenizer/) or a bare
    transformer folder. ``max_sequence_length`` defaults to the pipeline's (alpha 120, Sigma 300 T5 tokens);
    ``text_encoders=False`` skips T5 (prompt-embedding-level use)."""
    folder = Path(folder)
    # A bare transformer folder samples with PixArt's own integrator (DPM-Solver++, linear betas 1e-4..0.02).
    transformer, vae, sched_cfg = load_parts(
        folder, PixArtTransformer2DModel, dtype, "a PixArt",
        default_scheduler={"_class_name": "DPMSolverMultistepScheduler"}
    )
    pipeline = _pipeline_class(folder)
    has_text = (folder / "model_index.json").exists() and (folder / "text_encoder").exists()
    text = _load_text(folder, pipeline, transformer, vae, dtype) if text_encoders and has_text else None
    return PixArtDenoiser(
        transformer, Schedule.from_scheduler_config(sched_cfg), vae, text,
        max_sequence_length=max_sequence_length or MAX_TOKENS[pipeline], name=name, scheduler_config=sched_cfg,
    )
