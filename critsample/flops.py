"""Analytic FLOPs of one transformer forward, attention and MLP separately, so the local-attention saving shows.

Counts multiply-adds as 2 FLOPs, per sample. Attention scores and the weighted sum cost ``4 d`` FLOPs per
(query, key) pair summed over heads (``QK^T`` and ``AV``); a local window of radius r reduces the number of pairs to the
mean window size (border truncation included), text tokens of joint attention stay dense. Cross-attention to text
(PixArt: image queries, T5 keys and values) stays dense too: ``n t`` pairs per layer, q / out projections on the image
rows, k / v projections on the text rows; there the MLP runs on image rows only and adaLN-single is computed once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def mean_window_keys(h: int, w: int, radius: int | None) -> float:
    """Mean number of image keys per image query for a Chebyshev window truncated at the borders (None = h w)."""
    if radius is None:
        return float(h * w)

    def mean_1d(n: int) -> float:
        return sum(min(i + radius, n - 1) - max(i - radius, 0) + 1 for i in range(n)) / n

    return mean_1d(h) * mean_1d(w)


@dataclass
class ForwardFlops:
    attention_pairs: float  # (query, key) pairs summed over layers, one sample
    attention: float  # QK^T and AV
    projections: float  # q, k, v, out (and text-side projections for joint attention)
    mlp: float
    other: float  # patch embedding, adaLN modulation, final layer

    @property
    def total(self) -> float:
        return self.attention + self.projections + self.mlp + self.other

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def transformer_shape(denoiser) -> dict:
    """Width, depth, heads, MLP ratio, text length of a denoiser's transformer (DiT / SD3 / PixArt)."""
    tr = getattr(denoiser, "transformer", None)
    if tr is None:
        return {}
    cfg = tr.config
    heads, head_dim = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    ff = None
    for m in tr.modules():
        if m.__class__.__name__ == "FeedForward":
            lin = [p for p in m.modules() if isinstance(p, torch.nn.Linear)]
            ff = lin[0].out_features / lin[0].in_features
            if getattr(m.net[0], "proj", None) is not None and m.net[0].proj.out_features == 2 * lin[-1].in_features:
                ff /= 2  # gated (GEGLU) first layer holds two halves
            break
    return {
        "width": heads * head_dim,
        "heads": heads,
        # FLUX's single-stream blocks cost what a double-stream block does per token (q, k, v + d x d of proj_out;
        # 4 d -> d MLP + its half of proj_out) and attend over the same [text; image] pairs.
        "layers": int(cfg.num_layers) + int(getattr(cfg, "num_single_layers", 0) or 0),
        # SD3.5's dual-attention blocks add a second, image-only self-attention (attn2) to the joint one
        "image_only_layers": len(getattr(cfg, "dual_attention_layers", None) or ()),
        "mlp_ratio": ff or 4.0,
        "text_tokens": int(getattr(denoiser, "text_tokens", 0) or 0),  # joint attention (SD3)
        "cross_tokens": int(getattr(denoiser, "cross_tokens", 0) or 0),  # cross-attention keys (PixArt)
        "caption_channels": int(getattr(cfg, "caption_channels", None) or 0),
        "patch_size": int(cfg.patch_size),
        "in_channels": int(cfg.in_channels),
    }


def forward_flops(shape: dict, grid: tuple[int, int], radius: int | None) -> ForwardFlops:
    """FLOPs of one forward of one sample on an (h, w) token grid with window ``radius`` (None = global)."""
    h, w = grid
    n, t, d, L = h * w, shape.get("text_tokens", 0), shape["width"], shape["layers"]
    k_img = mean_window_keys(h, w, radius)
    if shape.get("cross_tokens", 0):
        return _cross_attention_flops(shape, n, k_img)
    joint = t > 0
    pairs = n * (k_img + t) + (t * (n + t) if joint else 0)  # image rows (+ text keys) and dense text rows
    dual = shape.get("image_only_layers", 0)
    total_pairs = pairs * L + n * k_img * dual  # + SD3.5's image-only attn2 (windowed like the image rows)
    attention = 4.0 * d * total_pairs
    rows = n + t
    projections = 2.0 * 4 * d * d * (rows * L + n * dual)
    mlp = 2.0 * 2 * shape["mlp_ratio"] * d * d * rows * L
    p, c = shape["patch_size"], shape["in_channels"]
    # adaLN: 6 d x d per stream and layer; SD3.5's dual blocks modulate 9 d on the image stream
    other = 2.0 * n * (p * p * c * d) * 2 + 2.0 * 6 * d * d * L * (2 if joint else 1) + 2.0 * 3 * d * d * dual
    return ForwardFlops(total_pairs, attention, projections, mlp, other)


def _cross_attention_flops(shape: dict, n: int, k_img: float) -> ForwardFlops:
    """PixArt-style blocks: windowed self-attention over the n image tokens, dense cross-attention to m text tokens."""
    m, d, L = shape["cross_tokens"], shape["width"], shape["layers"]
    pairs = n * k_img + n * m  # self (windowed) + cross (dense) (query, key) pairs per layer
    attention = 4.0 * d * pairs * L
    projections = 2.0 * d * d * (4 * n + 2 * n + 2 * m) * L  # self q, k, v, out; cross q, out (image) and k, v (text)
    mlp = 2.0 * 2 * shape["mlp_ratio"] * d * d * n * L
    p, c, ct = shape["patch_size"], shape["in_channels"], shape.get("caption_channels", 0) or d
    # patch embedding + final layer, adaLN-single (one shared 6 d x d modulation), caption projection (2 layers)
    other = 2.0 * n * (p * p * c * d) * 2 + 2.0 * 6 * d * d + 2.0 * m * (ct * d + d * d)
    return ForwardFlops(pairs * L, attention, projections, mlp, other)


def plan_flops(denoiser, plan, grid: tuple[int, int]) -> dict:
    """Sum over a plan's steps (guided steps count twice), per sample; attention and MLP kept apart, the steps of
    outside kinds (critsample.outside) under ``outside`` with their own count."""
    shape = transformer_shape(denoiser)
    if not shape:
        return {"total": float("nan"), "note": "analytic model: no transformer FLOPs"}
    acc = {"attention": 0.0, "projections": 0.0, "mlp": 0.0, "other": 0.0, "outside": 0.0, "total": 0.0}
    for s in plan.steps:
        if s.kind != "network":  # an outside denoiser's own analytic count (critsample.outside.step_flops)
            from .outside import step_flops

            f = step_flops(denoiser, s, grid)
            acc["outside"] += f
            acc["total"] += f
            continue
        f = forward_flops(shape, grid, s.radius).to_dict()
        for k in acc:
            if k != "outside":
                acc[k] += s.forwards * f[k]
    acc["forwards"] = plan.forwards
    acc["network_forwards"] = sum(s.forwards for s in plan.steps if s.kind == "network")
    return acc
