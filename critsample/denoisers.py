"""The one denoiser interface every model family implements (DiT, SD3, dit-digits, analytic oracles).

A denoiser is called as ``D(x, t, cond, radius=None)`` and returns its native prediction (``eps`` for DDPM
models, ``velocity`` for flow models) shaped like ``x``. ``t`` is critsample's time in [0, 1] (see ``noise.py``),
``cond`` the per-row conditioning (class ids with ``NULL`` rows, or prompt embeddings), ``radius`` the attention
window (None = global; an int; or one radius per row). :meth:`Denoiser.predict` adds guidance and conversions;
conditional and unconditional rows always share one batched forward.

This module also owns the conditioning rows (class ids with ``NULL`` rows, or :class:`PromptCond`): indexing
``cond[idx]`` works on both, :func:`cat_rows` / :func:`tile_rows` stack them, :meth:`Denoiser.null` gives the
unconditional rows; and the one guided-or-conditional decision (:func:`is_guided`: w = 1 is one plain conditional
forward everywhere).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import strict_locality
from .errors import UserError
from .noise import Kind, Schedule, convert

NULL = -1  # user-facing "no class" label; each model maps it to its own null row
# truncated attention (the paper's local denoiser) / strictly local (critsample.strict_locality)
LOCALITIES = ("window", "strict")


@dataclass
class PromptCond:
    """Text conditioning: per-row token embeddings, pooled embeddings (SD3; (B, 0) for models without them, PixArt)
    and the token attention mask of models that mask padded text tokens in cross-attention (PixArt's T5; None = all)."""

    embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P)
    mask: torch.Tensor | None = None  # (B, T), 1 = keep, 0 = padding

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, device) -> "PromptCond":
        return PromptCond(self.embeds.to(device), self.pooled.to(device),
                          None if self.mask is None else self.mask.to(device))

    def __getitem__(self, idx) -> "PromptCond":
        """Rows ``idx`` (an int range, a slice, or an index tensor), as tensors of class ids are indexed."""
        if torch.is_tensor(idx):
            idx = idx.to(self.embeds.device)
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return PromptCond(self.embeds[idx], self.pooled[idx], None if self.mask is None else self.mask[idx])


Cond = torch.Tensor | PromptCond


def cat_rows(conds: list[Cond]) -> Cond:
    """Conditioning batches stacked row-wise."""
    if isinstance(conds[0], PromptCond):
        mask = None
        if any(c.mask is not None for c in conds):  # a row block without a mask keeps every token (None = all)
            like = next(c.mask for c in conds if c.mask is not None)
            mask = torch.cat([like.new_ones(c.embeds.shape[:2]) if c.mask is None else c.mask for c in conds])
        return PromptCond(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]), mask)
    return torch.cat(conds)


def tile_rows(cond: Cond, n: int) -> Cond:
    """``cond`` repeated ``n`` times as whole blocks: [c_0..c_B, c_0..c_B, ...]."""
    return cat_rows([cond] * n)


def is_guided(guidance: float | None) -> bool:
    """Whether a step with guidance scale ``guidance`` needs the unconditional forward: w = 1 (and None) is the plain
    conditional prediction, one forward (``u + 1 (c - u) = c``)."""
    return guidance is not None and float(guidance) != 1.0


def autocast(device: torch.device | str, enabled: bool = True):
    """The one autocast context of the package: bf16 on CUDA, nothing on CPU (models run in their own dtype)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Denoiser(nn.Module):
    """Base class. Subclasses implement :meth:`forward`, :meth:`null` and set the attributes below.

    ``scheduler_config`` is the diffusers scheduler config the model samples with (``{}``: the defaults of the
    integrator, ``sampling.make_scheduler``); subclasses pass it to ``Denoiser.__init__``.
    """

    schedule: Schedule
    family: str = "denoiser"  # the model kind: "dit", "sd3" or "oracle" (decides loaders, data and classifier defaults)
    dataset: str | None = None  # the data critsample knows the model was trained on ("digits"), else None
    prediction: Kind = "eps"
    num_classes: int | None = None  # class-conditional models; None for text or unconditional models
    patch_size: int = 1
    sample_shape: tuple[int, ...] = ()  # (C, H, W) of the model's input (latent) space
    name: str = "denoiser"
    default_guidance: float = 4.0  # classifier-free guidance scale used when none is given
    pixel_space: bool = True  # without a VAE the model works on pixels in [-1, 1]; latent-only families set False
    # How locality="strict" is run (critsample.strict_locality): "blocks" (disjoint windows share a copy), "center" (one
    # copy per center token: joint text attention), "exact" (the radius already gives the strictly local score); None:
    # no strict mode.
    strict_layout: str | None = None

    def __init__(self, scheduler_config: dict | None = None):
        super().__init__()
        self.scheduler_config: dict = dict(scheduler_config or {})
        self.vae = None  # the diffusers AutoencoderKL of a latent-space model, set by the family (None: no VAE)

    @property
    def is_text(self) -> bool:
        """Text-conditional (prompts) rather than class-conditional."""
        return self.num_classes is None

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) image-token grid of the model's own sample shape."""
        _, hh, ww = self.sample_shape[-3:]
        return hh // self.patch_size, ww // self.patch_size

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(h, w) image-token grid for an input batch ``x`` (B, C, H, W)."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def null(self, cond: Cond) -> Cond:
        """Unconditional conditioning with the batch size of ``cond``."""
        if isinstance(cond, PromptCond):
            raise NotImplementedError
        return torch.full_like(cond, NULL)

    def check_cond(self, cond: Cond, batch: int) -> None:
        if isinstance(cond, PromptCond):
            if self.num_classes is not None:
                raise ValueError(f"{self.name} is class-conditional: give class ids, not a text prompt.")
            n = len(cond)
        else:
            if self.num_classes is None:
                raise ValueError(f"{self.name} is text-conditional: give a prompt, not class ids.")
            bad = cond[(cond != NULL) & ((cond < 0) | (cond >= self.num_classes))]
            if bad.numel():
                raise ValueError(f"Class ids of {self.name} lie in [0, {self.num_classes - 1}] (or {NULL} for none); "
                                 f"got {bad[0].item()}.")
            n = cond.shape[0]
        if n != batch:
            raise ValueError(f"Conditioning has {n} rows but x has {batch}.")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, radius=None) -> torch.Tensor:
        raise NotImplementedError

    # -- strict locality (critsample.strict_locality) -------------------------------------------
    def strict_copies(self, grid: tuple[int, int], radius: int | None) -> int:
        """Network forwards per row of the strictly local denoiser of ``radius`` (None = global: 1) on ``grid``."""
        return strict_locality.copies(self.strict_layout, grid, radius)

    def _strict_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, radius=None,
                        max_batch: int = 256) -> torch.Tensor:
        """The strictly local prediction of every row (:func:`critsample.strict_locality.strict_forward`)."""
        return strict_locality.strict_forward(self, x, t, cond, radius=radius, max_batch=max_batch)

    def _guide(self, pc: torch.Tensor, pu: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance ``u + w (c - u)`` (Ho & Salimans 2022, eq. 6); subclasses may restrict channels."""
        return pu + guidance * (pc - pu)

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        t,
        cond: Cond,
        *,
        radius=None,
        guidance: float | None = None,
        kind: Kind | None = None,
        locality: str = "window",
        max_batch: int = 256,
    ) -> torch.Tensor:
        """Prediction of ``kind`` (default: native). ``guidance`` None or 1 = plain conditional on ``cond`` (which may
        hold NULL rows), one forward; another w = classifier-free guidance with [cond; null] in one batched forward.
        ``locality``: ``"window"`` (truncated attention, the paper's) or ``"strict"``
        (:mod:`critsample.strict_locality`; its copies run in forwards of at most ``max_batch`` rows)."""
        if locality not in LOCALITIES:
            raise UserError(f"locality must be one of {', '.join(LOCALITIES)}; got {locality!r}.")
        if locality == "strict" and radius is not None:
            def run(x, t, cond, radius=None):
                return self._strict_forward(x, t, cond, radius=radius, max_batch=max_batch)
        else:
            run = self
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64,
                            device=x.device).expand(b) if torch.as_tensor(t).ndim == 0 else torch.as_tensor(
                                t, device=x.device)
        self.check_cond(cond, b)
        if not is_guided(guidance):
            out = run(x, t, cond, radius=radius)
        else:
            r2 = radius if radius is None or isinstance(radius, int) else torch.cat([torch.as_tensor(radius)] * 2)
            both = run(torch.cat([x, x]), torch.cat([t, t]), cat_rows([cond, self.null(cond)]), radius=r2)
            out = self._guide(both[:b], both[b:], float(guidance))
        if kind is None or kind == self.prediction:
            return out
        a, s = self.schedule.alpha_sigma(t.double().cpu())
        return convert(out, self.prediction, kind, x, a.to(x.device), s.to(x.device))

    def score(self, x, t, cond, *, radius=None, guidance=None) -> torch.Tensor:
        return self.predict(x, t, cond, radius=radius, guidance=guidance, kind="score")

    # -- pixel space ---------------------------------------------------------------------------
    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in model space -> images (B, C, H, W), float32 in [0, 1] on ``x``'s device, without autograd graph.

        The one path from samples to pictures (commands, probes, benches, fine-tune logging): :meth:`decode` under
        ``torch.no_grad()`` and the package's :func:`autocast`. ``decode`` stays the families' hook.
        """
        with torch.no_grad(), autocast(x.device):
            img = self.decode(x).float().to(x.device)
        if not bool(torch.isfinite(img).all()):
            bad = int((~torch.isfinite(img)).sum())
            where = ("the VAE decoder (try float32 weights)" if bool(torch.isfinite(x).all())
                     else "the sampler (the samples themselves are not finite)")
            raise RuntimeError(f"{self.name}: {bad} of {img.numel()} decoded image values are not finite; they come "
                               f"from {where}.")
        return img.clamp(0, 1)

    def _vae_factors(self) -> tuple[float, float]:
        """(shift, scale) of the VAE's latents, z = (latent - shift) * scale (SD3 / FLUX VAEs shift; SD's does not)."""
        cfg = self.vae.config
        return float(getattr(cfg, "shift_factor", None) or 0.0), float(cfg.scaling_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1], (B, C, H, W): through the VAE of a latent model, else [-1, 1] -> [0, 1].
        Callers that want pictures use :meth:`images` (no graph, finite, float32)."""
        if self.vae is None:
            if not self.pixel_space:
                raise UserError(f"{self.name} has no VAE to decode with; load it from a folder with vae/.")
            return (z.float() / 2 + 0.5).clamp(0, 1)
        shift, scale = self._vae_factors()
        with autocast(z.device):
            img = self.vae.decode((z / scale + shift).to(self.vae.dtype)).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> model space (a sample of the VAE's latent distribution for latent models)."""
        if self.vae is None:
            if not self.pixel_space:
                raise UserError(f"{self.name} has no VAE to encode with; load it from a folder with vae/.")
            return images * 2 - 1
        shift, scale = self._vae_factors()
        with autocast(images.device):
            dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((dist.sample(generator).float() - shift) * scale).float()


class TextDenoiser(Denoiser):
    """Base of the text-conditional families (SD3, PixArt, FLUX): the unconditional rows are the empty prompt's
    embeddings, encoded once per token length with the family's own ``encode_prompt``, or ``null_cond`` when set (a
    model loaded without its text encoders). ``text`` is the family's diffusers pipeline (None without text
    encoders)."""

    def __init__(self, scheduler_config: dict | None = None):
        super().__init__(scheduler_config)
        self.text = None
        self.null_cond: PromptCond | None = None  # set to override the empty-prompt embeddings (1 row)
        self._null_cache: dict[int, PromptCond] = {}

    def _empty_prompt(self, seq: int) -> PromptCond:
        """The empty prompt encoded with ``seq`` tokens, the layout of the prompts it stands beside."""
        return self.encode_prompt([""], max_sequence_length=seq)

    def null(self, cond: Cond) -> PromptCond:
        """The empty-prompt embeddings (the pipelines' default negative prompt ``""``; with its mask where the model
        masks text), repeated to the batch of ``cond``."""
        if not isinstance(cond, PromptCond):
            raise ValueError(f"{self.name} is text-conditional: give a PromptCond, not class ids.")
        seq = cond.embeds.shape[1]
        if self.null_cond is not None:
            one = self.null_cond
            if one.embeds.shape[1:] != cond.embeds.shape[1:]:
                raise ValueError(f"null_cond embeds are {tuple(one.embeds.shape[1:])} per row but the prompt's are "
                                 f"{tuple(cond.embeds.shape[1:])}.")
        elif seq in self._null_cache:
            one = self._null_cache[seq]
        elif self.text is not None:
            one = self._null_cache[seq] = self._empty_prompt(seq)
        else:
            raise UserError(
                f"{self.name} has no text encoders to embed the empty prompt: set `denoiser.null_cond` to its "
                "PromptCond embeddings (with the mask where the model masks text), or load the model from a folder "
                "with its text encoders."
            )
        n, dev = len(cond), cond.embeds.device
        mask = None if one.mask is None else one.mask[:1].to(dev).expand(n, -1)
        return PromptCond(one.embeds[:1].to(dev).expand(n, -1, -1), one.pooled[:1].to(dev).expand(n, -1), mask)

