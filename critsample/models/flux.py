"""FLUX.1 (diffusers ``FluxTransformer2DModel``) behind the denoiser interface.

Flow matching as SD3: ``x_t = (1 - sigma) x_0 + sigma eps`` with ``t = sigma``, and the network's output is the
velocity ``eps - x_0`` (FlowMatchEuler steps ``x + (sigma_next - sigma) v``), critsample's ``velocity``: no sign
change. The denoiser works on unpacked latents (B, C, H, W) like every other family and packs them into 2x2 patches
for the network exactly as ``FluxPipeline`` does (``_pack_latents``, ``_prepare_latent_image_ids``), so ``patch_size``
is 2 and the token grid is (H / 2, W / 2). The network is called with ``timestep = sigma`` (the pipeline's
``timestep / 1000``). Text: T5 token embeddings (``PromptCond.embeds``, text position ids all zero) and the CLIP
pooled embedding (``PromptCond.pooled``) from diffusers' own ``FluxPipeline.encode_prompt``; the unconditional prompt
is the empty string, the pipeline's negative prompt for true CFG.

Guidance. FLUX.1-dev is guidance-distilled (``guidance_embeds=True``): the transformer takes a guidance scalar per row
that imitates classifier-free guidance in one forward. critsample always passes the model's distilled guidance
(:attr:`FluxDenoiser.distilled_guidance`, 3.5 as ``FluxPipeline``'s default ``guidance_scale``) as that input, for
conditional and unconditional rows alike. So
- the conditioning gap compares the prompt with the empty prompt, both at the distilled guidance;
- a plan's ``guided(w)`` step is true classifier-free guidance on top, ``u + w (c - u)`` with the empty prompt as
  ``u`` (``FluxPipeline(true_cfg_scale=w, negative_prompt="")``); ``default_guidance = 1`` is one forward of the
  distilled model alone, so plain sampling equals ``FluxPipeline``.
FLUX.1-schnell has no guidance embedding (``distilled_guidance`` is None); there ``guided(w)`` is ordinary CFG.

Window attention: in both block kinds attention runs over [text; image] tokens (text FIRST, unlike SD3); only
image-to-image attention is windowed, text rows and columns stay dense, RoPE is applied as the stock processor does
(``attention.FluxWindowAttnProcessor``).
Strict locality (``Denoiser.predict(locality="strict")``): one copy per center token, the text reading only the
center's window (``strict_layout = "center"``), with the tokens' original RoPE coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from einops import rearrange
from torch import nn

from ..attention import check_radius, install_flux_window_attention
from ..denoisers import PromptCond, TextDenoiser, autocast
from ..errors import UserError
from ..noise import Schedule
from .loaders import load_parts, load_text_pipeline, read_json

DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the distilled guidance FLUX.1-dev samples with
DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size (1024 px through the 8x VAE)
MAX_T5 = 512  # FluxPipeline's default and largest max_sequence_length


# -- latent packing (FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids) ---------------------
def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4 C): row-major 2x2 patches, channels (c, p, q)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h w, 4 C) -> (B, C, 2 h, 2 w)."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h, w=w, p=2, q=2)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h w, 3) RoPE positions of the image tokens: (0, row, column)."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(ii), ii, jj], dim=-1).reshape(h * w, 3).to(device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, config: dict) -> float:
    """FluxPipeline's resolution-dependent shift ``mu``: linear in the number of image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FluxDenoiser(TextDenoiser):
    """Velocity-prediction FLUX.1 transformer with window attention, optional VAE and optional text encoders.

    ``text`` is a ``FluxPipeline`` used only for :meth:`encode_prompt`; without it the denoiser works on prompt
    embeddings, and :meth:`null` needs ``null_cond`` (the empty-prompt embeddings) set by the caller.
    """

    prediction = "velocity"
    family = "flux"
    pixel_space = False
    num_classes = None
    patch_size = 2  # the pipeline's 2x2 packing; the transformer itself has patch_size 1
    strict_layout = "center"  # joint attention: text tokens would carry one window's content to another
    default_guidance = 1.0  # the distilled model alone, as FluxPipeline samples (true CFG is off by default)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        schedule: Schedule | None = None,
        vae: AutoencoderKL | None = None,
        text=None,
        *,
        sample_size: int | tuple[int, int] = DEFAULT_LATENT,
        distilled_guidance: float | None = None,
        max_sequence_length: int = MAX_T5,
        name: str = "flux",
        scheduler_config: dict | None = None,
    ):
        super().__init__(scheduler_config)
        self.transformer = transformer
        self.vae = vae
        self.schedule = schedule or Schedule(kind="flow")
        if self.schedule.kind != "flow":
            raise ValueError(f"FLUX is a flow-matching model; got a {self.schedule.kind!r} schedule.")
        cfg = transformer.config
        if int(cfg.patch_size) != 1 or int(cfg.in_channels) % 4:
            raise ValueError("A FLUX transformer takes 2x2-packed latents (patch_size 1, in_channels 4 C); got "
                             f"{dict(cfg)}.")
        hh, ww = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        if hh % 2 or ww % 2:
            raise UserError(f"FLUX packs latents into 2x2 patches: the latent size must be even; got {hh}x{ww}.")
        self.in_channels = int(cfg.in_channels) // 4
        self.sample_shape = (self.in_channels, int(hh), int(ww))
        self.guidance_embeds = bool(cfg.guidance_embeds)
        if self.guidance_embeds:
            self.distilled_guidance: float | None = float(DEV_GUIDANCE if distilled_guidance is None
                                                          else distilled_guidance)
        elif distilled_guidance is not None:
            raise UserError(f"{name} has no guidance embedding (FLUX.1-schnell-like): drop distilled_guidance.")
        else:
            self.distilled_guidance = None
        if not 1 <= int(max_sequence_length) <= MAX_T5:
            raise UserError(f"max_sequence_length of FLUX's T5 lies in 1..{MAX_T5}; got {max_sequence_length}.")
        self.max_sequence_length = int(max_sequence_length)
        self.text_tokens = self.max_sequence_length  # T5 tokens of joint attention (FLOPs accounting)
        self.name = name
        self.text = text
        # Registered so that .to(device) / .eval() reach them; the pipeline `text` holds the same objects.
        encoders = [getattr(text, k, None) for k in ("text_encoder", "text_encoder_2")] if text is not None else []
        self.text_encoders = nn.ModuleList([m for m in encoders if m is not None])
        install_flux_window_attention(transformer)

    # -- integrator ----------------------------------------------------------------------------
    def timestep_kwargs(self, num_steps: int, grid: tuple[int, int]) -> dict:
        """What FluxPipeline passes to ``scheduler.set_timesteps`` besides the step count: its own sigmas
        ``linspace(1, 1 / N, N)`` and the shift ``mu`` of an ``h x w`` token grid (``sampling.set_timesteps``)."""
        out = {"mu": calculate_shift(grid[0] * grid[1], self.scheduler_config)}
        if not self.scheduler_config.get("use_flow_sigmas", False):
            out["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return out

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str, max_sequence_length: int | None = None) -> PromptCond:
        """T5 embeddings ``(B, max_sequence_length, D)`` and CLIP pooled ``(B, P)`` from diffusers' FluxPipeline."""
        if self.text is None:
            raise UserError(
                f"{self.name} was loaded without text encoders: load it from a FLUX pipeline folder with "
                f"text_encoder/, text_encoder_2/ and tokenizer*/, or pass PromptCond embeddings directly."
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.text_encoders[0].device
        embeds, pooled, _ = self.text.encode_prompt(
            prompt=prompts, prompt_2=None, device=device,
            max_sequence_length=max_sequence_length or self.max_sequence_length,
        )
        return PromptCond(embeds, pooled)

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptCond, radius=None, blocks=None) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise UserError("FLUX packs latents into 2x2 patches: height and width must be even; got "
                            f"{x.shape[-2]}x{x.shape[-1]}.")
        grid = self.grid(x)
        check_radius(radius, grid)
        b, dtype = x.shape[0], self.transformer.dtype
        # The pipeline calls the network with timestep / 1000 = sigma, rounded through float32 as it is there.
        timestep = (self.schedule.native(t.detach().cpu()).float() / 1000).to(x.device)
        guidance = None
        if self.guidance_embeds:  # the distilled guidance, the same for every row (module docstring)
            guidance = torch.full((b,), self.distilled_guidance, device=x.device, dtype=torch.float32)
        embeds = cond.embeds.to(x.device, dtype)  # (B, T, D)
        with autocast(x.device):
            out = self.transformer(
                hidden_states=pack(x).to(dtype),  # (B, h w, 4 C)
                encoder_hidden_states=embeds,
                pooled_projections=cond.pooled.to(x.device, dtype),
                timestep=timestep,
                guidance=guidance,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),  # FluxPipeline.encode_prompt's
                img_ids=image_ids(*grid, device=x.device, dtype=dtype),
                joint_attention_kwargs={"radius": radius, "grid": grid, "blocks": blocks},
            ).sample
        return unpack(out, *grid).to(x.dtype)

    # -- pixel space ---------------------------------------------------------------------------


def _default_latent(folder: Path, vae: AutoencoderKL | None) -> int:
    """Latent side: ``critsample.json``'s ``sample_size``, else the VAE's native resolution (1024 px for FLUX.1),
    else FluxPipeline's default 128."""
    meta_file = folder / "critsample.json"
    meta = read_json(meta_file) if meta_file.exists() else {}
    if "sample_size" in meta:
        return int(meta["sample_size"])
    if vae is not None and getattr(vae.config, "sample_size", None):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        px = vae.config.sample_size if isinstance(vae.config.sample_size, int) else vae.config.sample_size[0]
        return 2 * (int(px) // (factor * 2))  # FluxPipeline.prepare_latents' rounding
    return DEFAULT_LATENT


def _load_text(folder: Path, transformer, vae, dtype: torch.dtype):
    """diffusers' own FluxPipeline around the already loaded transformer / VAE, for its ``encode_prompt``."""
    return load_text_pipeline("FluxPipeline", folder, "FLUX", transformer, vae, dtype)


def load_flux(
    folder: Path,
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoders: bool = True,
    max_sequence_length: int = MAX_T5,
    sample_size: int | tuple[int, int] | None = None,
    distilled_guidance: float | None = None,
) -> FluxDenoiser:
    """A FLUX pipeline folder (transformer/, vae/, scheduler/, text_encoder*/, tokenizer*/) or a bare transformer
    folder.

    ``sample_size``: latent (H, W) or side (default: module ``_default_latent``); ``distilled_guidance``: the guidance
    input of a guidance-distilled (dev) transformer, default 3.5; ``text_encoders=False`` skips CLIP and T5.
    """
    folder = Path(folder)
    transformer, vae, sched_cfg = load_parts(
        folder, FluxTransformer2DModel, dtype, "a FLUX",
        default_scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler"}
    )
    has_text = (folder / "model_index.json").exists() and all((folder / k).exists() for k in ("text_encoder",
                                                                                              "text_encoder_2"))
    text = _load_text(folder, transformer, vae, dtype) if text_encoders and has_text else None
    return FluxDenoiser(
        transformer, Schedule.from_scheduler_config(sched_cfg), vae, text,
        sample_size=sample_size if sample_size is not None else _default_latent(folder, vae),
        distilled_guidance=distilled_guidance, max_sequence_length=max_sequence_length, name=name,
        scheduler_config=sched_cfg,
    )
