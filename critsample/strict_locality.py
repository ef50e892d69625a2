"""The strictly local denoiser: every token's prediction computed from its radius-r window alone.

The paper's local denoiser truncates attention in every layer, so an L-layer network sees L x r tokens. The strictly
local one runs the network on *copies* of each input in which attention is block-diagonal over windows (the masked
path of the window processors, ``blocks`` in ``attention.py``; kernels in ``local_attention.py``), and takes each
token's output from the copy in which that token is a window center. Families say how through
``Denoiser.strict_layout``:

* ``"blocks"`` (text-free or cross-attention text: DiT, PixArt): windows whose centers lie 2r + 1 apart are disjoint,
  so (2r + 1)^2 copies (fewer on a narrow grid) hold every window once (``local_attention.window_blocks``);
* ``"center"`` (joint text attention: SD3, FLUX): one copy per center token, the text reading only that window, since
  shared text tokens would carry one window's content to another (``local_attention.center_blocks``);
* ``"exact"`` (the oracles): the window prediction of radius r already reads the window alone; strict = window;
* ``None``: no strict mode.

A radius that covers the grid (r >= max(h, w) - 1) is one copy with one block: the global model.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .local_attention import center_blocks, window_blocks
from .options import is_global


def copies(layout: str | None, grid: tuple[int, int], radius: int | None) -> int:
    """Network forwards per row of the strictly local denoiser of ``radius`` (None = global: 1) on ``grid``."""
    h, w = grid
    if layout == "exact" or is_global(radius, grid):
        return 1
    if layout == "center":
        return h * w
    return min(h, 2 * radius + 1) * min(w, 2 * radius + 1)


def layout_blocks(layout: str | None, grid: tuple[int, int], radius: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (K, h w), copy (h w,)): the K copies' token blocks and the copy whose output each token takes."""
    h, w = grid
    if layout == "center" and not is_global(radius, grid):
        return center_blocks(h, w, radius, device), torch.arange(h * w, device=device)
    return window_blocks(h, w, radius, device)  # a covering radius is one copy with one block: the global model


def strict_forward(model, x: torch.Tensor, t: torch.Tensor, cond, radius=None, max_batch: int = 256) -> torch.Tensor:
    """The strictly local prediction of ``model`` (a ``Denoiser``) for every row (per-row ``radius``; None rows are
    global), copies in forwards of at most ``max_batch`` rows: each token's output is scattered from its copy."""
    layout = model.strict_layout
    if layout is None:
        raise UserError(f"{model.name} has no strictly local mode; use locality='window'.")
    if layout == "exact":
        return model(x, t, cond, radius=radius)
    b, grid = x.shape[0], model.grid(x)
    if radius is None or isinstance(radius, int):
        radii = [radius] * b
    else:
        radii = [int(r) for r in torch.as_tensor(radius).reshape(-1).tolist()]
        if len(radii) != b:
            raise UserError(f"Got {len(radii)} per-row radii for a batch of {b}; pass one radius per batch row.")
    p, (h, w) = model.patch_size, grid
    out = torch.empty_like(x)
    out_tok = out.view(b, x.shape[1], h, p, w, p)  # token (i, j) = out_tok[:, :, i, :, j, :]
    groups: dict = {}
    for row, r in enumerate(radii):
        groups.setdefault(r, []).append(row)
    for r, rows in groups.items():
        idx = torch.tensor(rows, device=x.device)
        if r is None:
            out[idx] = model(x[idx], t[idx], cond[idx], radius=None).to(x.dtype)
            continue
        blocks, copy = layout_blocks(layout, grid, r, x.device)
        k = blocks.shape[0]
        per = max(1, max_batch // k)  # rows per forward; a row's copies are split when they alone exceed max_batch
        kstep = min(k, max(1, max_batch))
        for lo in range(0, len(rows), per):
            ri = idx[lo : lo + per]
            m = ri.numel()
            for k0 in range(0, k, kstep):
                k1 = min(k, k0 + kstep)
                rep = ri.repeat_interleave(k1 - k0)
                y = model(x[rep], t[rep], cond[rep], blocks=blocks[k0:k1].repeat(m, 1)).to(x.dtype)
                y = y.view(m, k1 - k0, x.shape[1], h, p, w, p)
                take = torch.nonzero((copy >= k0) & (copy < k1)).reshape(-1)  # tokens centered in these copies
                ti, tj, c = take // w, take % w, copy[take] - k0
                # (m, n_take, C, p, p): token (ti, tj) of copy c
                sel = y.permute(0, 1, 3, 5, 2, 4, 6)[:, c, ti, tj]
                dest = out_tok[ri]  # (m, C, h, p, w, p) copy
                dest.permute(0, 2, 4, 1, 3, 5)[:, ti, tj] = sel
                out_tok[ri] = dest
    return out
