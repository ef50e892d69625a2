"""Row bookkeeping shared by the probes: class rows, per-row radii, and chunked batched forwards.

A *row* is one network evaluation: (x_t, t, cond, radius). The probes stack many rows that share nothing but the
model (several times, radii, classes) and evaluate them in chunks of ``max_batch`` rows; global rows and local rows
go to separate forwards so global rows always take the stock attention path.
"""

from __future__ import annotations

import torch

from ..denoisers import Cond, Denoiser

GLOBAL = -1  # per-row radius code for global attention


def class_rows(denoiser: Denoiser, n: int, class_id: int | None, offset: int = 0) -> torch.Tensor:
    """(n,) class ids: ``class_id`` everywhere, or classes cycled 0..K-1 by global row index when None."""
    if class_id is not None:
        return torch.full((n,), int(class_id), dtype=torch.long)
    k = int(denoiser.num_classes or 1)
    return (torch.arange(offset, offset + n) % k).long()


def num_tokens(denoiser: Denoiser, x: torch.Tensor) -> int:
    h, w = denoiser.grid(x)
    return h * w


def radius_codes(radii: list[int | None]) -> torch.Tensor:
    """Radii (None = global) -> long codes (GLOBAL = -1)."""
    return torch.tensor([GLOBAL if r is None else int(r) for r in radii], dtype=torch.long)


@torch.no_grad()
def predict_rows(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    radius: torch.Tensor | None = None,
    *,
    kind: str = "eps",
    max_batch: int = 256,
    locality: str = "window",
) -> torch.Tensor:
    """Predictions of every row: x (N, ...), t (N,) float64, cond N rows, radius (N,) long codes (GLOBAL = -1) or None.
    Returned in x's dtype promoted to at least fp32.

    Global rows and local rows are evaluated in separate chunks of at most ``max_batch`` rows; a chunk of local rows
    passes its per-row radii to the model, so rows of several radii share one forward. ``locality="strict"``: local
    rows are strictly local (``Denoiser.predict``), whose copies again run in forwards of at most ``max_batch`` rows.
    """
    n = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
    t = t.expand(n) if t.numel() == 1 else t
    # Predictions come back in at least fp32 whatever the model computes in (bf16 weights or autocast): the probes
    # difference two forwards (eqs. 6, 7), and storing each in bf16 would round it before the difference.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    out = torch.empty_like(x)
    if radius is None:
        groups = [(torch.arange(n), None)]
    else:
        radius = radius.reshape(-1).cpu()
        glob = radius == GLOBAL
        groups = [(torch.nonzero(glob).reshape(-1), None), (torch.nonzero(~glob).reshape(-1), radius)]
    for idx, rad in groups:
        for start in range(0, idx.numel(), max(1, max_batch)):
            j = idx[start : start + max_batch]
            if j.numel() == 0:
                continue
            r = None
            if rad is not None:
                rj = rad[j]
                r = int(rj[0]) if bool((rj == rj[0]).all()) else rj.to(x.device)
            jd = j.to(x.device)
            loc = locality if rad is not None else "window"
            out[jd] = denoiser.predict(x[jd], t[j].to(x.device), cond[j], radius=r, kind=kind, locality=loc,
                                       max_batch=max_batch).to(x.dtype)
    return out
