"""Class-conditional diffusers DiTs (DiT-XL/2 and the bundled dit-digits) behind the denoiser interface."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ..attention import check_radius, install_window_attention
from ..denoisers import NULL, Denoiser, autocast
from ..noise import Schedule


class DiTDenoiser(Denoiser):
    """eps-prediction DiT. ``guide_channels``: None guides every eps channel (diffusers' DiTPipeline); 3 reproduces
    the original DiT code, which guided only the first three of the four latent channels."""

    prediction = "eps"
    family = "dit"
    strict_layout = "blocks"  # text-free: disjoint windows share a copy (critsample.strict_locality)

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        schedule: Schedule,
        vae: AutoencoderKL | None = None,
        *,
        num_classes: int | None = None,
        guide_channels: int | None = None,
        name: str = "dit",
        scheduler_config: dict | None = None,
        dataset: str | None = None,
    ):
        super().__init__(scheduler_config)
        self.dataset = dataset
        self.transformer = transformer
        self.vae = vae
        self.schedule = schedule
        cfg = transformer.config
        self.num_classes = int(num_classes if num_classes is not None else cfg.num_embeds_ada_norm)
        self.null_id = int(cfg.num_embeds_ada_norm)  # diffusers' LabelEmbedding keeps the null row last
        self.patch_size = int(cfg.patch_size)
        self.in_channels = int(cfg.in_channels)
        self.learned_sigma = int(transformer.out_channels) == 2 * self.in_channels
        self.sample_shape = (self.in_channels, int(cfg.sample_size), int(cfg.sample_size))
        self.guide_channels = guide_channels
        self.name = name
        install_window_attention(transformer)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, radius=None, blocks=None) -> torch.Tensor:
        grid = self.grid(x)
        check_radius(radius, grid)
        labels = torch.where(cond == NULL, torch.full_like(cond, self.null_id), cond)
        timestep = self.schedule.native(t.detach().cpu()).to(x.device)
        with autocast(x.device):
            out = self.transformer(
                x.to(self.transformer.dtype),
                timestep=timestep,
                class_labels=labels,
                cross_attention_kwargs={"radius": radius, "grid": grid, "blocks": blocks},
            ).sample
        return out[:, : self.in_channels].to(x.dtype)  # learned variance channels are not used by DDIM / DPM

    def _guide(self, pc, pu, guidance):
        if self.guide_channels is None:
            return pu + guidance * (pc - pu)
        g = self.guide_channels
        guided = pu[:, :g] + guidance * (pc[:, :g] - pu[:, :g])
        return torch.cat([guided, pc[:, g:]], dim=1)
