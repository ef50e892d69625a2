"""Exact 2-D local-window attention: the paper's local denoiser (Sec. 3.1, Fig. 2).

Image tokens lie row-major on an h x w grid (token n = i * w + j). Image token (i, j) attends only to image tokens
(i', j') with |i - i'| <= r and |j - j'| <= r, truncated at the borders (border tokens see fewer keys, the window is
not shifted). The ``num_extra`` tokens after the h * w image tokens (SD3 text) are dense both ways. ``r = None`` or
``r >= max(h, w) - 1`` is exactly global attention. The scale is SDPA's 1 / sqrt(d).

One computation, five kinds of implementation, all exact (equal to the masked reference to fp32 rounding):
- ``dense``: stock SDPA; valid only for a global radius.
- ``masked``: SDPA with the (L, L) boolean window mask; the reference path, costs as much as dense (1.07-1.26x of
  dense SDPA on one CPU thread: the mask is added to every score).
- ``bands1`` / ``bands2`` / ``bands4`` / ``bands8``: queries in bands of that many whole grid rows; the keys a band
  can reach (rows a - r .. b - 1 + r, truncated at the borders) are one contiguous run of row-major tokens, so each
  band is SDPA over a slice of k and v (a view, no gather) with its slice of the window mask, plus the extra keys.
  Saves the key rows a band cannot reach: the fast path at small and medium grids.
- ``tiled``: queries in th x tw tiles, each attending to its (th + 2r) x (tw + 2r) key halo plus the extra keys, so
  the cost follows the window, not the grid, and nothing of size (L, L) is built. Differentiable. The fast path at
  large grids.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block mask of the window (128 x 128 token blocks that no
  query of one block can see in the other are skipped). Compiled on CUDA (forward and backward); on CPU the eager,
  forward-only path, which is the reference math (it materializes every (L, L) score in fp32, ~masked's cost).

``impl="auto"`` (:func:`_choose`) is a deterministic function of the shape and the device type, never a run-time
autotune: dense for a global window; on CUDA flex where the window skips most kv blocks, else masked; elsewhere the
fastest path measured on one CPU thread at the nearest point of a shipped table (``_CPU_RULE``: grid sides 16, 32,
64, radii 1, 2, 4, 8, without and with 333 text tokens; ``python bench/attention.py --candidates [--text 333]``
remeasures it). Where nothing exact was measured cheaper than dense SDPA (16x16 at r = 8, or with 333 text tokens)
the table says masked, the exact path closest to dense's cost: a local step there costs up to ~1.1x a global one.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .errors import UserError
from .options import global_radius, is_global, parse_radius

IMPLS = ("auto", "dense", "masked", "bands1", "bands2", "bands4", "bands8", "tiled", "flex")

# Bytes of temporaries per tiled step and intra-op thread. On CPU a step should stay in cache: one big step costs
# 2-3x more than the same work in ~2 MB steps, and big temporaries come back as freshly page-faulted memory.
_STEP_BYTES_CPU = 2 << 20
_STEP_BYTES_ACCELERATOR = 1 << 30


def _tile_size(radius: int) -> int:
    """Tile side, tuned on a 2-core AVX-512 CPU (bench/attention.py, with and without 333 text tokens).

    A query pays for the (t + 2r)^2 keys of its tile's halo, so small tiles waste less; under ~16 queries a tile
    the batched matmuls lose their efficiency.
    """
    return 4 if radius <= 8 else 8


@dataclass(frozen=True, eq=False)
class _TilePlan:
    th: int
    tw: int
    nh: int  # tiles down the grid
    nw: int  # tiles across
    q_index: torch.Tensor  # (nt * th * tw,) token of every tile query; padding repeats a border query
    kv_index: torch.Tensor  # (nt * K,) token of every halo key, clamped into the grid; K = (th + 2r) * (tw + 2r)
    bias: torch.Tensor  # (nt, th * tw, K) 0 where the window allows, -inf elsewhere (outside the grid included)

    @property
    def tiles(self) -> int:
        return self.nh * self.nw

    @property
    def keys(self) -> int:
        return self.kv_index.numel() // self.tiles


# Cached tensors are built outside inference mode: a sampler may fill the caches before training reuses them.
@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _tile_plan(h: int, w: int, r: int, tile: int, device: torch.device, dtype: torch.dtype) -> _TilePlan:
    th, tw = min(tile, h), min(tile, w)
    nh, nw = -(-h // th), -(-w // tw)
    sh, sw = th + 2 * r, tw + 2 * r
    ar = functools.partial(torch.arange, device=device)
    # Padded query rows / columns repeat the last real one: their outputs are dropped, and a finite softmax row
    # keeps NaN out of the backward pass.
    qi, qj = ar(nh * th).clamp(max=h - 1).view(nh, th), ar(nw * tw).clamp(max=w - 1).view(nw, tw)
    ki, kj = ar(nh)[:, None] * th - r + ar(sh), ar(nw)[:, None] * tw - r + ar(sw)  # (nh, sh), (nw, sw)
    # The Chebyshev window is separable: a row test (nh, th, sh) and a column test (nw, tw, sw).
    row_ok = ((qi[:, :, None] - ki[:, None, :]).abs() <= r) & ((ki >= 0) & (ki < h))[:, None, :]
    col_ok = ((qj[:, :, None] - kj[:, None, :]).abs() <= r) & ((kj >= 0) & (kj < w))[:, None, :]
    ok = row_ok[:, None, :, None, :, None] & col_ok[None, :, None, :, None, :]  # (nh, nw, th, tw, sh, sw)
    ok = rearrange(ok, "a b t u s v -> (a b) (t u) (s v)")
    q_index = rearrange(qi[:, None, :, None] * w + qj[None, :, None, :], "a b t u -> (a b t u)")
    halo = ki.clamp(0, h - 1)[:, None, :, None] * w + kj.clamp(0, w - 1)[None, :, None, :]  # (nh, nw, sh, sw)
    kv_index = rearrange(halo, "a b s v -> (a b s v)")
    bias = torch.zeros(nh * nw, th * tw, sh * sw, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))
    return _TilePlan(th, tw, nh, nw, q_index, kv_index, bias)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)
def _cached_mask(h: int, w: int, r: int, num_extra: int, device: torch.device) -> torch.Tensor:
    return window_mask(h, w, r, num_extra, device=device)


def window_mask(height: int, width: int, radius: int | None, num_extra: int = 0, device=None) -> torch.Tensor:
    """(L, L) boolean mask, L = height * width + num_extra; True where query (row) may attend to key (column)."""
    _check_grid((height, width), num_extra)
    radius = _as_radius(radius)
    n = height * width
    mask = torch.ones(n + num_extra, n + num_extra, dtype=torch.bool, device=device)
    if radius is not None:
        t = torch.arange(n, device=device)
        i, j = t // width, t % width
        mask[:n, :n] = ((i[:, None] - i[None]).abs() <= radius) & ((j[:, None] - j[None]).abs() <= radius)
    return mask


def _schedule(plan: _TilePlan, B: int, H: int, d: int, dv: int, ne: int, dtype: torch.dtype, device) -> list:
    """Steps (batch slice, head slice, tile slice) whose temporaries fit the step budget."""
    tq, nk, nt = plan.th * plan.tw, plan.keys, plan.tiles
    budget = _STEP_BYTES_CPU * torch.get_num_threads() if device.type == "cpu" else _STEP_BYTES_ACCELERATOR
    tile_bytes = (2 * tq * (nk + ne) + nk * (d + dv) + tq * (d + dv)) * dtype.itemsize  # scores, probs, q, k, v, out
    per_step = max(1, budget // tile_bytes)
    if per_step >= nt:  # whole (batch, head) rows per step
        rows = per_step // nt
        cb, ch, ct = (max(1, rows // H), H, nt) if rows >= H else (1, rows, nt)
    else:  # one row, a run of its tiles per step
        cb, ch, ct = 1, 1, per_step

    def spans(size: int, step: int) -> list[slice]:
        return [slice(i, min(i + step, size)) for i in range(0, size, step)]

    return [(bs, hs, ts) for bs in spans(B, cb) for hs in spans(H, ch) for ts in spans(nt, ct)]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, :, index] for x (cb, ch, L, d); rows of a contiguous x go through one flat 2-D gather: on CPU ~3.5x
    faster than index_select along dim 2 of the 4-D view (its generic path), even for a single row."""
    cb, ch, L, d = x.shape
    if not x.is_contiguous():
        return x.index_select(2, index)
    if cb * ch == 1:
        return x.view(L, d).index_select(0, index).view(1, 1, -1, d)
    flat = (torch.arange(cb * ch, device=x.device)[:, None] * L + index).view(-1)
    return x.view(-1, d).index_select(0, flat).view(cb, ch, -1, d)


def _step_probs(plan: _TilePlan, q, k, n: int, bs: slice, hs: slice, ts: slice):
    """Attention weights of one step's tiles over their halo keys, then the extra keys.

    Returns p (m, tq, nk + E) with m = rows * tiles, and the gathered qt (rows, ct * tq, d), kt (rows, ct * nk, d).
    The extra keys are shared by every tile: one matmul per row against them, not a copy of them in every tile.
    """
    tq, nk, d, ne = plan.th * plan.tw, plan.keys, q.shape[-1], k.shape[2] - n
    # SDPA's scale goes on the gathered queries, before the products (fp16 range), not on a copy of all of q
    qt = _gather(q[bs, hs], plan.q_index[ts.start * tq : ts.stop * tq]).mul_(d**-0.5)  # (cb, ch, ct * tq, d)
    kt = _gather(k[bs, hs], plan.kv_index[ts.start * nk : ts.stop * nk])  # (cb, ch, ct * nk, d)
    rows, t_ = qt.shape[0] * qt.shape[1], qt.shape[2] // tq
    m = rows * t_
    qk = qt.view(m, tq, d), kt.view(m, nk, d).transpose(1, 2)
    if rows == 1:
        s = torch.baddbmm(plan.bias[ts], *qk)  # (m, tq, nk)
    elif q.device.type == "cpu":  # baddbmm cannot broadcast the bias over rows; a step-sized copy is cached
        s = torch.baddbmm(_repeated_bias(plan, rows), *qk)
    else:
        s = torch.bmm(*qk).view(rows, t_, tq, nk).add_(plan.bias[ts]).view(m, tq, nk)
    if ne:
        sx = torch.matmul(qt, k[bs, hs, n:].transpose(-1, -2))  # (cb, ch, ct * tq, E)
        s = torch.cat([s, sx.view(m, tq, ne)], dim=-1)
    return s.softmax(-1), qt.view(rows, t_ * tq, d), kt.view(rows, t_ * nk, d)


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)
def _repeated_bias(plan: _TilePlan, rows: int) -> torch.Tensor:
    return plan.bias.repeat(rows, 1, 1)  # (rows * nt, tq, nk)


class _TiledAttention(torch.autograd.Function):
    """Tile-ordered outputs (B, H, nt * tq, dv) of the image queries; the backward recomputes each step's weights.

    Saving only q, k, v keeps training memory at the inputs' size (like flash attention) instead of every step's
    gathered halos and weights, and accumulating each step's gradients in place avoids a full-size gradient per step.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _TilePlan, steps: list, n: int):
        B, H = q.shape[:2]
        tq, nk, dv = plan.th * plan.tw, plan.keys, v.shape[-1]
        tiles = q.new_empty(B, H, plan.tiles * tq, dv)
        for bs, hs, ts in steps:
            p, _, _ = _step_probs(plan, q, k, n, bs, hs, ts)  # (m, tq, nk + E)
            vt = _gather(v[bs, hs], plan.kv_index[ts.start * nk : ts.stop * nk])  # (cb, ch, ct * nk, dv)
            out = tiles[bs, hs, ts.start * tq : ts.stop * tq]  # (cb, ch, ct * tq, dv)
            rows = out.shape[0] * out.shape[1]
            torch.bmm(p[..., :nk], vt.view(-1, nk, dv), out=out.view(-1, tq, dv))
            if p.shape[-1] > nk:
                px = p[..., nk:].reshape(rows, -1, p.shape[-1] - nk)  # (rows, ct * tq, E)
                out.view(rows, -1, dv).baddbmm_(px, v[bs, hs, n:].reshape(rows, -1, dv))
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.steps, ctx.n = plan, steps, n
        return tiles

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dtiles):
        q, k, v = ctx.saved_tensors
        plan, n = ctx.plan, ctx.n
        tq, nk, d, dv = plan.th * plan.tw, plan.keys, q.shape[-1], v.shape[-1]
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for bs, hs, ts in ctx.steps:
            p, qt, kt = _step_probs(plan, q, k, n, bs, hs, ts)  # (m, tq, nk + E), (rows, ct*tq, d), (rows, ct*nk, d)
            kv_index = plan.kv_index[ts.start * nk : ts.stop * nk]
            vt = _gather(v[bs, hs], kv_index)  # (cb, ch, ct * nk, dv)
            do = dtiles[bs, hs, ts.start * tq : ts.stop * tq]  # (cb, ch, ct * tq, dv); dropped padding has 0
            rows, m, ne = qt.shape[0], p.shape[0], p.shape[-1] - nk
            do_t = do.reshape(m, tq, dv)
            dp = torch.bmm(do_t, vt.view(m, nk, dv).transpose(1, 2))  # (m, tq, nk)
            if ne:
                dpx = torch.matmul(do, v[bs, hs, n:].transpose(-1, -2))  # (cb, ch, ct * tq, E)
                dp = torch.cat([dp, dpx.view(m, tq, ne)], dim=-1)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # dS = P (dP - rowsum(P dP)), (m, tq, nk + E)
            dqt = torch.bmm(ds[..., :nk], kt.view(m, nk, d))  # (m, tq, d), by the scaled q
            dkt = torch.bmm(ds[..., :nk].transpose(1, 2), qt.view(m, tq, d))  # (m, nk, d)
            dvt = torch.bmm(p[..., :nk].transpose(1, 2), do_t)  # (m, nk, dv)
            if ne:
                dsx, px = ds[..., nk:].reshape(rows, -1, ne), p[..., nk:].reshape(rows, -1, ne)  # (rows, ct * tq, E)
                dqt.view(rows, -1, d).baddbmm_(dsx, k[bs, hs, n:].reshape(rows, ne, d))
                cb, ch = do.shape[:2]
                grad_k[bs, hs, n:] += torch.bmm(dsx.transpose(1, 2), qt).view(cb, ch, ne, d)
                grad_v[bs, hs, n:] += torch.bmm(px.transpose(1, 2), do.reshape(rows, -1, dv)).view(cb, ch, ne, dv)
            dqt.mul_(d**-0.5)  # back through the scale on q
            shape = grad_q[bs, hs].shape[:2]
            grad_q[bs, hs].index_add_(2, plan.q_index[ts.start * tq : ts.stop * tq], dqt.view(*shape, -1, d))
            grad_k[bs, hs].index_add_(2, kv_index, dkt.view(*shape, -1, d))
            grad_v[bs, hs].index_add_(2, kv_index, dvt.view(*shape, -1, dv))
        return grad_q, grad_k, grad_v, None, None, None


def _tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, r: int, num_extra: int) -> torch.Tensor:
    """Window attention tile by tile; q, k, v (B, H, L, d) -> (B, H, L, dv)."""
    B, H, _, d = q.shape
    dv, n = v.shape[-1], h * w
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # diffusers hands over transposed views: gather rows
    plan = _tile_plan(h, w, r, _tile_size(r), q.device, q.dtype)
    steps = _schedule(plan, B, H, d, dv, num_extra, q.dtype, q.device)
    tiles = _TiledAttention.apply(q, k, v, plan, steps, n)  # (B, H, nt * tq, dv)
    img = rearrange(tiles, "b c (y x t u) e -> b c (y t) (x u) e", y=plan.nh, x=plan.nw, t=plan.th)[:, :, :h, :w]
    img = img.reshape(B, H, n, dv)
    if not num_extra:
        return img
    return torch.cat([img, F.scaled_dot_product_attention(q[:, :, n:], k, v)], dim=2)  # extra rows see every key


# -- bands: whole grid rows against the contiguous key rows they can reach ------------------------------------


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _band_plan(h: int, w: int, r: int, num_extra: int, rows: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """Per band of ``rows`` grid rows: (first query, end query, first key, end key, bias (queries, keys)).

    The band's keys are its reachable rows [lo, hi) and the extra tokens. With extra tokens a band whose reach is
    near the end of the grid takes the run [lo, L) instead (the image rows past hi masked out): a view of k and v
    rather than a copy of [lo, hi) and the extra keys, chosen when it adds no more keys than the copy would move.
    """
    n, L, mask = h * w, h * w + num_extra, window_mask(h, w, r, num_extra, device=device)
    plan = []
    for a in range(0, h, rows):
        b = min(h, a + rows)
        lo, hi = max(0, a - r) * w, min(h, b + r) * w  # rows a - r .. b - 1 + r, truncated at the borders
        if num_extra and n - hi <= hi - lo + num_extra:
            hi = L  # one contiguous run to the end: a view
        keys = mask[a * w : b * w, lo:hi]
        if num_extra and hi < L:
            keys = torch.cat([keys, mask[a * w : b * w, n:]], dim=1)
        bias = torch.zeros(keys.shape, dtype=dtype, device=device).masked_fill_(~keys, float("-inf"))
        plan.append((a * w, b * w, lo, hi, bias))
    return tuple(plan)


def _bands(q, k, v, h: int, w: int, r: int, num_extra: int, rows: int) -> torch.Tensor:
    """Window attention as SDPA per band of ``rows`` grid rows; q, k, v (B, H, L, d) -> (B, H, L, dv).

    In row-major order the keys a band can reach, rows a - r .. b - 1 + r, are one contiguous run of tokens, so each
    band is dense SDPA with its slice of the window mask over that run (a view, no gather) plus the extra keys: exact,
    and cheaper than the full masked call by the key rows the band cannot reach (most at small grids and borders).
    """
    n, L, outs = h * w, h * w + num_extra, []
    for qa, qb, lo, hi, bias in _band_plan(h, w, r, num_extra, rows, q.device, q.dtype):
        ks, vs = k[:, :, lo:hi], v[:, :, lo:hi]
        if num_extra and hi < L:
            ks, vs = torch.cat([ks, k[:, :, n:]], dim=2), torch.cat([vs, v[:, :, n:]], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, qa:qb], ks, vs, attn_mask=bias))
    if num_extra:
        outs.append(F.scaled_dot_product_attention(q[:, :, n:], k, v))  # extra rows see every key
    return torch.cat(outs, dim=2)


# -- flex: the window as a block-sparse FlexAttention mask --------------------------------------------------------

FLEX_BLOCK = 128  # flex_attention's default sparse block (tokens per side); its CUDA kernels tile in it
# Devices whose FlexAttention has a backward; torch refuses CPU inputs that require grad.
_FLEX_BACKWARD_DEVICES = ("cuda", "xpu")
# impl="auto" on CUDA takes flex when at most this fraction of kv blocks is visited (a prior: flex's kernel runs
# near FlashAttention's speed per visited block, partial blocks also pay the mask; bench/gpu.py measures it).
_FLEX_MAX_DENSITY = 0.5


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _flex_block_mask(h: int, w: int, r: int, num_extra: int, device: torch.device) -> BlockMask:
    """The window of radius r on the row-major h x w grid plus ``num_extra`` dense tokens, for ``flex_attention``.

    Token order stays row-major: a 128-token block is 128 / w whole rows (w <= 128), already a compact 2-D tile,
    and at 32 x 32 and 64 x 64 it skips more blocks than a permutation into 8 x 16 tiles for r <= 4 (bench/gpu.py
    prints both; README "GPU path"). The grid sizes and radius are captured as tensors, so one compiled kernel serves
    every radius of a grid instead of recompiling per value.
    """
    n, L = h * w, h * w + num_extra
    n_t, w_t, r_t = (torch.tensor(x, device=device) for x in (n, w, r))

    def window(b, head, q_idx, kv_idx):  # Chebyshev window, borders truncated; extra tokens dense both ways
        near = ((q_idx // w_t - kv_idx // w_t).abs() <= r_t) & ((q_idx % w_t - kv_idx % w_t).abs() <= r_t)
        return near | (q_idx >= n_t) | (kv_idx >= n_t)

    return create_block_mask(window, None, None, L, L, device=device, BLOCK_SIZE=FLEX_BLOCK)


@functools.lru_cache(maxsize=256)  # asked at every attention call on CUDA (impl="auto")
def kv_block_density(h: int, w: int, r: int | None, num_extra: int = 0, block: int = FLEX_BLOCK) -> float:
    """Fraction of (query block, kv block) pairs the window visits in row-major order: 1 - flex's block sparsity.

    A query block spanning grid rows [a, b] can reach the key rows [a - r, b + r] and every extra token; a block that
    holds an extra query reaches everything. Exact when a block is whole rows (w divides ``block``), else an upper
    bound (a block's first and last rows are partial, so it may miss some columns of the reachable rows).
    """
    if r is None:
        return 1.0
    n, L = h * w, h * w + num_extra
    nb = -(-L // block)
    extra = set(range(n // block, nb)) if num_extra else set()  # kv blocks holding an extra token
    visited = 0
    for qb in range(nb):
        lo, hi = qb * block, min(L, (qb + 1) * block) - 1
        if hi >= n:
            visited += nb
            continue
        a, b = lo // w, hi // w
        first, last = max(0, a - r) * w, min(h - 1, b + r) * w + w - 1  # reachable image tokens
        visited += len(set(range(first // block, last // block + 1)) | extra)
    return visited / (nb * nb)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def _flex(q, k, v, h: int, w: int, r: int, num_extra: int) -> torch.Tensor:
    """Window attention through FlexAttention; q, k, v (B, H, L, d) -> (B, H, L, dv)."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        q, k, v = q.detach(), k.detach(), v.detach()  # torch's CPU check looks at requires_grad, not at grad mode
    elif q.device.type not in _FLEX_BACKWARD_DEVICES:
        raise UserError(
            f"impl='flex' has no backward on {q.device.type} (torch's FlexAttention refuses it); "
            "use impl='tiled' or 'masked' to train there."
        )
    if torch.is_autocast_enabled(q.device.type):  # as SDPA under autocast: qk-normed fp32 q, k meet a bf16 v (SD3.5)
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = _flex_block_mask(h, w, r, num_extra, q.device)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # eager on purpose: it is the reference math, see the module docstring
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask)


# impl="auto" on CPU: the fastest exact path measured at each (grid side, radius), without and with 333 text tokens,
# by `python bench/attention.py --candidates [--text 333]` (one thread, B=1, H=24, d=64, median thread-CPU time of
# 5 (3 with text) interleaved repeats on the loaded shared 2-core machine, 2026-12-04). Paths within ~2 % of each
# other are ties at this noise (README "GPU path" lists the runners-up). "masked" where every other path measured
# slower than the masked reference.
_CPU_SIDES, _CPU_RADII, _CPU_TEXT = (16, 32, 64), (1, 2, 4, 8), 333
_CPU_RULE = {  # (side, radius): (impl without text, impl with 333 text tokens); ratios to dense in README "GPU path"
    (16, 1): ("bands2", "masked"), (16, 2): ("bands2", "masked"), (16, 4): ("bands2", "masked"),
    (16, 8): ("masked", "masked"),
    (32, 1): ("bands1", "tiled"), (32, 2): ("bands1", "tiled"), (32, 4): ("bands1", "bands8"),
    (32, 8): ("bands8", "bands8"),
    (64, 1): ("tiled", "tiled"), (64, 2): ("tiled", "tiled"), (64, 4): ("tiled", "tiled"),
    (64, 8): ("bands4", "bands4"),
}


def _nearest(x: float, grid: tuple) -> int:
    """The value of ``grid`` nearest to x on a log scale (ties to the smaller)."""
    return min(grid, key=lambda g: (abs(math.log(max(x, 0.5) / g)), g))


def _choose(h: int, w: int, r: int | None, num_extra: int, device_type: str = "cpu") -> str:
    """The implementation ``impl="auto"`` runs: a deterministic function of the shape and device type.

    Global window: dense. CUDA: flex where the window visits at most ``_FLEX_MAX_DENSITY`` of the kv blocks (a prior
    until bench/gpu.py has run on a GPU), else masked. Other devices: ``_CPU_RULE`` at the measured point nearest to
    the call: grid side sqrt(h w) to the nearest measured side (log scale), the radius scaled by the same factor to
    the nearest measured radius (log scale; r = 0 counts as 1), the text column where the text tokens are at least
    half the measured point's text fraction. flex is not offered on CPU: its compiled kernel takes 15 s (idle) to over
    a minute (loaded) to build per shape, and its eager path computes every score (README "GPU path").
    """
    if r is None:
        return "dense"
    if device_type == "cuda":
        return "flex" if kv_block_density(h, w, r, num_extra) <= _FLEX_MAX_DENSITY else "masked"
    side = _nearest(math.sqrt(h * w), _CPU_SIDES)
    radius = _nearest(max(r, 1) * side / math.sqrt(h * w), _CPU_RADII)
    text = num_extra / (h * w + num_extra) >= 0.5 * _CPU_TEXT / (side * side + _CPU_TEXT)
    return _CPU_RULE[side, radius][int(text)]


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    radius: int | None | list | torch.Tensor,
    num_extra: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """Window attention of (B, H, L, d) q, k, v over an h x w image-token grid followed by ``num_extra`` dense tokens.

    ``radius``: an int >= 0, None (global), or one radius per batch row (a list, which may hold None, or a 1-D integer
    tensor); rows with equal radius run together. ``impl``: one of ``IMPLS``. Returns (B, H, L, dv) in q's dtype.
    """
    _check_qkv(q, k, v)
    h, w = _check_grid(grid, num_extra)
    if h * w + num_extra != q.shape[2]:
        raise UserError(
            f"grid {h}x{w} plus num_extra={num_extra} makes {h * w + num_extra} tokens but q has L={q.shape[2]}; "
            "pass the image-token grid and the number of trailing text tokens."
        )
    if impl not in IMPLS:
        raise UserError(f"impl must be one of {IMPLS}; got {impl!r}.")
    radii = _per_row_radii(radius, q.shape[0])
    # A window at least max(h, w) - 1 wide covers the grid: clip it so every row with a global window runs alike.
    radii = [None if is_global(r, (h, w)) else r for r in radii]
    groups: dict = {}
    for row, r in enumerate(radii):
        groups.setdefault(r, []).append(row)
    if len(groups) == 1:
        return _attend(q, k, v, h, w, radii[0], num_extra, impl)
    outs, order = [], []
    for r, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        outs.append(_attend(q[idx], k[idx], v[idx], h, w, r, num_extra, impl))
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(outs, dim=0)[inverse]


def _attend(q, k, v, h: int, w: int, r: int | None, num_extra: int, impl: str) -> torch.Tensor:
    if impl == "auto":
        impl = _choose(h, w, r, num_extra, q.device.type)
    if impl == "dense":
        if r is not None:
            raise UserError(
                f"impl='dense' needs a global radius (None or >= {global_radius((h, w))} on a {h}x{w} grid); got {r}, "
                "use impl='masked' or 'tiled'."
            )
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "masked":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(h, w, r, num_extra, q.device))
    if impl.startswith("bands"):
        return _bands(q, k, v, h, w, global_radius((h, w)) if r is None else r, num_extra, int(impl[5:]))
    if impl == "flex":
        return _flex(q, k, v, h, w, global_radius((h, w)) if r is None else r, num_extra)
    return _tiled(q, k, v, h, w, global_radius((h, w)) if r is None else r, num_extra)


# -- input checks: one clear sentence each -----------------------------------------------------------------------


_as_radius = parse_radius


def _per_row_radii(radius, batch: int) -> list[int | None]:
    if isinstance(radius, torch.Tensor) and radius.dim() == 1 or isinstance(radius, (list, tuple)):
        values = radius.tolist() if isinstance(radius, torch.Tensor) else list(radius)
        if len(values) != batch:
            raise UserError(f"Got {len(values)} per-row radii for a batch of {batch}; pass one radius per batch row.")
        return [_as_radius(r) for r in values]
    return [_as_radius(radius)] * batch


def _check_grid(grid, num_extra) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(isinstance(x, numbers.Integral) for x in grid):
        raise UserError(f"grid must be a pair of positive integers (h, w); got {grid!r}.")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise UserError(f"grid must be a pair of positive integers (h, w); got {grid!r}.")
    if isinstance(num_extra, bool) or not isinstance(num_extra, numbers.Integral) or num_extra < 0:
        raise UserError(f"num_extra must be a non-negative integer (trailing dense tokens); got {num_extra!r}.")
    return h, w


def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise UserError(f"q, k, v must be (B, H, L, d); got shapes {shapes}.")
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise UserError(
            f"q, k, v must share (B, H, L) and q, k their d; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )


# -- strict locality: block-diagonal attention over disjoint windows ---------------------------------------------


def window_blocks(height: int, width: int, radius: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The copies of the strictly local denoiser of radius ``radius`` on an h x w grid.

    Windows of radius r whose centers lie 2r + 1 apart on both axes are disjoint and, truncated at the borders, tile
    the grid. So (2r + 1)^2 copies (fewer when the grid is narrower) hold every window once: copy (a, b) has centers
    (a + s m, b + s n), s = 2r + 1, and every token belongs to the window of exactly one of its centers.

    Returns ``blocks`` (K, h w) long, the block (window) id of each token in each copy, and ``copy`` (h w,) long,
    the copy in which token n is a center; K = min(h, s) min(w, s).
    """
    s = 2 * int(radius) + 1
    ar = functools.partial(torch.arange, device=device)
    a, b = ar(min(height, s)), ar(min(width, s))
    # token row i is in the window of center a + s m with m = floor((i - a + r) / s)
    bi = torch.div(ar(height)[None, :] - a[:, None] + radius, s, rounding_mode="floor")  # (A, h)
    bj = torch.div(ar(width)[None, :] - b[:, None] + radius, s, rounding_mode="floor")  # (Bc, w)
    nj = int(bj.max()) + 2
    blocks = (bi[:, None, :, None] * nj + bj[None, :, None, :]).reshape(a.numel() * b.numel(), height * width)
    t = ar(height * width)
    copy = (t // width % s) * b.numel() + (t % width % s)
    return blocks, copy


def center_blocks(height: int, width: int, radius: int, device=None) -> torch.Tensor:
    """(h w, h w) long: one copy per center token n, block 0 = the window of n, block 1 = every other token. Joint
    text models read their window this way: the text tokens attend to block 0 only (see :func:`block_attention`)."""
    t = torch.arange(height * width, device=device)
    i, j = t // width, t % width
    inside = ((i[:, None] - i[None]).abs() <= radius) & ((j[:, None] - j[None]).abs() <= radius)
    return (~inside).long()


def block_mask(blocks: torch.Tensor, num_extra: int = 0, extra_first: bool = False) -> torch.Tensor:
    """(B, 1, L, L) boolean attention mask of per-row token blocks ``blocks`` (B, n): an image token attends to the
    image tokens of its own block and to every extra (text) token; an extra token attends to the extra tokens and to
    the image tokens of block 0. ``extra_first``: the extra tokens come before the image tokens (FLUX)."""
    img = blocks[:, :, None] == blocks[:, None, :]  # (B, n, n)
    if not num_extra:
        return img[:, None]
    B, n = blocks.shape
    to_text = img.new_ones(B, n, num_extra)
    text_row = torch.cat([blocks[:, None, :] == 0, img.new_ones(B, 1, num_extra)], dim=2).expand(B, num_extra,
                                                                                                 n + num_extra)
    mask = torch.cat([torch.cat([img, to_text], dim=2), text_row], dim=1)  # [image; text] order
    if extra_first:
        mask = torch.roll(mask, (num_extra, num_extra), dims=(1, 2))
    return mask[:, None]


def block_attention(q, k, v, blocks: torch.Tensor, num_extra: int = 0, extra_first: bool = False) -> torch.Tensor:
    """Attention of (B, H, L, d) q, k, v restricted by per-row token blocks (:func:`block_mask`); masked keys get
    weight exactly 0, so a block's outputs do not depend on the values of the tokens outside it (nor of its text
    tokens on image tokens outside block 0)."""
    _check_qkv(q, k, v)
    if blocks.dim() != 2 or blocks.shape[0] != q.shape[0] or blocks.shape[1] + num_extra != q.shape[2]:
        raise UserError(f"blocks must be (B, n image tokens) = ({q.shape[0]}, {q.shape[2] - num_extra}); got "
                        f"{tuple(blocks.shape)}.")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(blocks.to(q.device), num_extra, extra_first))
