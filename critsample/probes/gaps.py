"""Instantaneous probes: the conditioning gap (paper eq. 6) and the locality gap (paper eq. 7).

Both are read off the score at states x_t of a trajectory, in the model's own (latent) space, as a norm divided by
the number of image tokens (paper sec. 3.2 and App. C.2):

* conditioning gap (eq. 6):  G_c(t) = || s(x_t, t | c) - s(x_t, t | null) || / n_tokens
* locality gap (eq. 7):      G_r(t) = || s_r(x_t, t | .) - s(x_t, t | .) || / n_tokens, conditional (| c) and
  unconditional (| null), for every radius r of the truncated-attention denoiser.

The score is ``-eps / sigma`` (``noise.py``), so a score gap equals the eps gap divided by sigma(t); both are returned
(``*_score`` and ``*_eps``), computed from the same forwards. Trajectories (App. C.2):

* ``train``: data noised forward, x_t = alpha_t x_0 + sigma_t eps with one eps per sample shared by all t (every x_t
  has the exact forward marginal; conditional and unconditional training trajectories coincide).
* ``sample_cond`` / ``sample_uncond``: the states a sampler visits from pure noise with the guided (or plain
  conditional) / the unconditional global denoiser; the state entering step i is probed at that step's t.

Every (x_t, t) needs 2 (1 + R) rows: cond and null, global and each radius. All rows of all times of a batch of
samples share batched forwards (:func:`~critsample.probes.rows.predict_rows`).
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoisers import Cond, Denoiser, cat_rows, tile_rows
from ..sampling import Plan, Step, sample, step_times
from .rows import GLOBAL, num_tokens, predict_rows


def train_states(denoiser: Denoiser, x0: torch.Tensor, times: list[float],
                 generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """(T, B, ...) states of the forward (training) trajectory of clean ``x0`` (B, ...) at ``times``; ``generator``
    may be one per row."""
    eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    return torch.stack([denoiser.schedule.add_noise(x0, torch.tensor(float(t)), eps) for t in times])


def trajectory_plan(denoiser: Denoiser, kind: str, steps: int, guidance: float, sampler: str = "auto") -> Plan:
    """The sampler plan of a sampling trajectory: guided(w) (cond if w = 1) or uncond, global attention."""
    step = Step("uncond") if kind == "sample_uncond" else Step.conditional(guidance)
    times = step_times(denoiser, steps, sampler)
    return Plan([step] * len(times), sampler=sampler, name=kind, times=times)


def sampling_states(
    denoiser: Denoiser, plan: Plan, cond: Cond, generator: torch.Generator
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Run ``plan`` from noise; return the (T, B, ...) states entering each step, their times, and the final sample."""
    states = []
    final = sample(denoiser, plan, cond, generator=generator, callback=lambda d: states.append(d["x_in"]))
    times = plan.times or step_times(denoiser, len(plan.steps), plan.sampler)
    return torch.stack(states), list(times), final


def rows_per_state(radii: list[int], conditional: bool = True, copies: list[int] | None = None) -> int:
    """Network evaluations per (x_t, t): cond and null, global and each radius (``copies``: forwards per local row of
    each radius, ``Denoiser.strict_copies``; None = 1, the window denoiser)."""
    return (2 if conditional else 1) * (1 + (sum(copies) if copies is not None else len(radii)))


@torch.no_grad()
def score_gaps(
    denoiser: Denoiser,
    states: torch.Tensor,
    times: list[float],
    cond: Cond,
    radii: list[int],
    *,
    max_batch: int = 256,
    locality: str = "window",
) -> dict[str, torch.Tensor]:
    """Conditioning and locality gaps of every state; ``locality`` picks the local denoiser (``Denoiser.predict``:
    window = truncated attention, the paper's; strict = strictly local).

    states (T, B, C, H, W), times (T,), cond B rows, radii R local radii. Returns float64 tensors:
    ``cond_gap_score`` / ``cond_gap_eps`` (B, T) — eq. 6; ``loc_gap_{cond,uncond}_{score,eps}`` (B, T, R) — eq. 7;
    ``t`` (T,). Norms are over all latent dimensions of one sample, divided by the number of image tokens.
    """
    T, B = states.shape[:2]
    x = states.reshape(T * B, *states.shape[2:])  # rows ordered (t, b)
    t = torch.tensor([float(v) for v in times], dtype=torch.float64).repeat_interleave(B)
    c = tile_rows(cond, T)
    null = denoiser.null(c)
    n = T * B
    # Global cond and null rows in one forward (stock attention). Predictions arrive in fp32 or wider (predict_rows)
    # and every difference below is taken in float64, also where the model ran in bf16.
    both = predict_rows(denoiser, torch.cat([x, x]), torch.cat([t, t]), cat_rows([c, null]), kind="eps",
                        max_batch=max_batch)
    g_cond, g_null = both[:n].double(), both[n:].double()
    _, sigma = denoiser.schedule.alpha_sigma(torch.as_tensor([float(v) for v in times], dtype=torch.float64))
    sigma = sigma.to(x.device)  # (T,)
    norm = num_tokens(denoiser, x)

    def per_sample(d: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (B, T) eps-gap per token
        return (d.reshape(n, -1).norm(dim=1) / norm).reshape(T, B).T

    out = {"t": torch.tensor([float(v) for v in times], dtype=torch.float64)}
    cg = per_sample(g_cond - g_null)
    out["cond_gap_eps"], out["cond_gap_score"] = cg, cg / sigma[None, :]
    R = len(radii)
    if R:
        # Local rows of every radius, cond and null: (R, 2, n) rows in one stream of forwards.
        xr = x.repeat(2 * R, *([1] * (x.ndim - 1)))
        tr = t.repeat(2 * R)
        cr = tile_rows(cat_rows([c, null]), R)
        rr = torch.tensor(radii, dtype=torch.long).repeat_interleave(2 * n)
        assert not bool((rr == GLOBAL).any())
        loc = predict_rows(denoiser, xr, tr, cr, rr, kind="eps", max_batch=max_batch,
                           locality=locality).double().reshape(R, 2, n, *x.shape[1:])
        for name, ref, k in (("cond", g_cond, 0), ("uncond", g_null, 1)):
            gap = torch.stack([per_sample(loc[i, k] - ref) for i in range(R)], dim=-1)  # (B, T, R)
            out[f"loc_gap_{name}_eps"], out[f"loc_gap_{name}_score"] = gap, gap / sigma[None, :, None]
    return out
