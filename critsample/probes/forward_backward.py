"""Integrated probe: forward-backward error correction (paper sec. 3.3, App. C.3; Biroli et al. 2024).

A clean x_0 of class c is noised forward to time t and denoised back to t = 0 by the UNCONDITIONAL denoiser, globally
and with each local radius r; the result is classified. The classifier error P[label(x_hat) != c] versus t has a
sharp threshold (the symmetry-breaking time); its one-sigma bar is Bernoulli, sqrt(p (1 - p) / n) (App. C.3).
The per-pixel MSE between decoded x_hat and x_0 stays smooth (paper Fig. 4(c, e)).

Conventions: t is snapped to the nearest step of the denoising integrator with ``steps`` steps over [0, 1] (as
SDEdit / diffusers img2img start mid-schedule), and the reverse pass runs that integrator's remaining steps. One
noise draw per sample is shared by every radius (common random numbers: local and global errors differ by the
denoiser only). All radii of one (x_0, t) batch share each step's forward (per-row radius).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoisers import Cond, Denoiser, tile_rows
from ..sampling import Plan, Step, sample, step_times
from .rows import predict_rows, radius_codes


def start_index(denoiser: Denoiser, t: float, steps: int, sampler: str = "auto") -> tuple[int, float]:
    """Index of the integrator step nearest to ``t`` and that step's time."""
    grid = torch.tensor(step_times(denoiser, steps, sampler), dtype=torch.float64)
    i = int((grid - float(t)).abs().argmin())
    return i, float(grid[i])


def denoise_from(
    denoiser: Denoiser,
    x0: torch.Tensor,
    t: float,
    cond: Cond,
    radii: list[int | None],
    *,
    steps: int,
    generator: torch.Generator | list[torch.Generator],
    sampler: str = "auto",
    max_batch: int = 256,
    locality: str = "window",
) -> tuple[torch.Tensor, float]:
    """Noise ``x0`` (B, ...) to ``t`` and integrate back to 0 with the denoiser on ``cond`` (NULL rows = unconditional),
    once per radius (None = global), on the one sampling loop started at the step nearest ``t``.
    Returns x_hat (R, B, ...) in model space and the snapped t."""
    i0, t_used = start_index(denoiser, t, steps, sampler)
    eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    R, B = len(radii), x0.shape[0]
    x = denoiser.schedule.add_noise(x0, torch.tensor(t_used), eps).repeat(R, *([1] * (x0.ndim - 1)))
    rows_r = radius_codes(radii).repeat_interleave(B)

    def predict(x: torch.Tensor, t: float, step: Step, c: Cond) -> torch.Tensor:  # every radius in one stream of rows
        return predict_rows(denoiser, x, torch.tensor(t), c, rows_r, kind=denoiser.prediction, max_batch=max_batch,
                            locality=locality)

    plan = Plan.from_rule(denoiser, steps, lambda t: Step("cond"), sampler, name="forward-backward")
    x = sample(denoiser, plan, tile_rows(cond, R), x=x, start=i0, predict=predict)
    return x.reshape(R, B, *x0.shape[1:]), t_used


def labels_of(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """(N,) labels from a classifier returning logits (N, K) or labels (N,)."""
    out = classify(images)
    return out.argmax(-1) if out.ndim == 2 else out.long()


@torch.no_grad()
def forward_backward(
    denoiser: Denoiser,
    x0: torch.Tensor,
    labels: torch.Tensor,
    t: float,
    radii: list[int | None],
    classify: Callable[[torch.Tensor], torch.Tensor],
    uncond: Cond,
    *,
    steps: int,
    generator: torch.Generator | list[torch.Generator],
    sampler: str = "auto",
    max_batch: int = 256,
    locality: str = "window",
) -> dict[str, torch.Tensor]:
    """One (t, batch) point of the forward-backward curves; the reverse pass is conditioned on ``uncond`` (the null
    rows: NULL class ids, or the empty prompt of a text model). ``labels`` are the classifier's reference labels;
    ``locality``: the local denoiser (window = truncated attention, strict = strictly local; ``Denoiser.predict``).

    Returns float64 ``error`` (R, B) in {0, 1} (label of x_hat != ``labels``), ``flip`` (R, B) (label of x_hat != label
    of the clean x_0), ``mse`` (R, B) per-pixel MSE of the decoded images in [0, 1], ``pred`` (R, B) labels, and ``t``.
    """
    x_hat, t_used = denoise_from(denoiser, x0, t, uncond, radii, steps=steps, generator=generator, sampler=sampler,
                                 max_batch=max_batch,
                                 locality=locality)
    R, B = x_hat.shape[:2]
    clean = denoiser.images(x0).double()
    images = denoiser.images(x_hat.reshape(R * B, *x0.shape[1:])).double()
    pred = labels_of(classify, images.float()).reshape(R, B).cpu()
    clean_pred = labels_of(classify, clean.float()).cpu()
    mse = ((images.reshape(R, B, -1) - clean.reshape(1, B, -1)) ** 2).mean(-1).cpu()
    return {
        "error": (pred != labels.cpu()[None]).double(),
        "flip": (pred != clean_pred[None]).double(),
        "mse": mse,
        "pred": pred.double(),
        "t": torch.tensor(t_used, dtype=torch.float64),
    }
