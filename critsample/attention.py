"""Local-window attention processors for diffusers' DiT and SD3 transformers.

The paper's local denoiser keeps every weight of the pretrained model and only truncates image-token attention to a
Chebyshev window of radius ``r`` on the 2-D token grid (|i - i'| <= r and |j - j'| <= r, truncated at the borders).
In SD3's joint attention only image-to-image attention is windowed; text tokens see and are seen by everything.

The processors read two per-call keyword arguments that diffusers forwards from ``cross_attention_kwargs`` (DiT) or
``joint_attention_kwargs`` (SD3): ``radius`` (None = global, an int, or one radius per batch row) and ``grid``
(the (h, w) token grid). With ``radius=None`` they run exactly the stock processor's computation.

A third keyword, ``blocks`` ((B, h w) long or None), selects the strictly local denoiser's masked path
(``local_attention.block_attention``; built by ``Denoiser.predict(locality="strict")``): in each row an image token
attends only to the image tokens of its own block (plus the text), and text queries only to block 0; ``radius`` is
then ignored (the blocks are the windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .errors import UserError
from .local_attention import block_attention, local_attention
from .options import global_radius, is_global, parse_radius

Radius = int | torch.Tensor | list | None


def _is_global(radius: Radius, grid: tuple[int, int] | None) -> bool:
    return is_global(radius, grid)


def _attend(q, k, v, grid, radius, num_extra: int = 0, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, d) attention: the strict blocks when given, else stock SDPA when global, exact window otherwise."""
    if blocks is not None:
        return block_attention(q, k, v, blocks, num_extra)
    if _is_global(radius, grid):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return local_attention(q, k, v, grid=grid, radius=radius, num_extra=num_extra)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, d)


def _qkv(attn: Attention, hidden_states: torch.Tensor, projections, norms) -> tuple[torch.Tensor, ...]:
    """Per-head (B, H, N, d) queries, keys and values with the layer's own projections and optional q/k norms."""
    q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in projections)
    nq, nk = norms
    return (q if nq is None else nq(q)), (k if nk is None else nk(k)), v


class WindowAttnProcessor:
    """Self-attention over image tokens (DiT ``attn1``, SD3.5 image-only ``attn2``), windowed per call."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        radius: Radius = None,
        grid: tuple[int, int] | None = None,
        blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError("WindowAttnProcessor only handles unmasked self-attention over image tokens.")
        residual = hidden_states
        b = hidden_states.shape[0]
        q, k, v = _qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        out = _attend(q, k, v, grid, radius, blocks=blocks)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointWindowAttnProcessor:
    """SD3 joint attention: [image tokens, text tokens]; only image-to-image attention is windowed."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        radius: Radius = None,
        grid: tuple[int, int] | None = None,
        blocks: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n_img = hidden_states.shape[:2]
        q, k, v = _qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        n_txt = 0
        if encoder_hidden_states is not None:
            eq, ek, ev = _qkv(
                attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
            q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
            n_txt = encoder_hidden_states.shape[1]
        out = _attend(q, k, v, grid, radius, num_extra=n_txt, blocks=blocks)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, txt = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                txt = attn.to_add_out(txt)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, txt
        return out


def install_window_attention(transformer: torch.nn.Module) -> int:
    """Give every attention layer of a DiT / SD3 transformer its window processor; returns how many were set.

    DiT models have no ``set_attn_processor``, so processors are set per ``Attention`` module. Layers with text
    projections (``add_q_proj``) get the joint processor, the others the self-attention one.
    """
    count = 0
    for module in transformer.modules():
        if isinstance(module, Attention):
            joint = getattr(module, "add_q_proj", None) is not None
            module.set_processor(JointWindowAttnProcessor() if joint else WindowAttnProcessor())
            count += 1
    if count == 0:
        raise ValueError(f"{type(transformer).__name__} has no diffusers Attention layers to window.")
    return count


def check_radius(radius: Radius, grid: tuple[int, int], *, bound: str = "any", model: str = "the model") -> None:
    """The one radius check: raise one :class:`UserError` sentence for a radius that does not fit ``grid`` (h, w).

    ``radius``: None (global), an int, or one radius per row. Every radius must be a non-negative integer; ``bound``
    adds an upper limit: ``"any"`` none (radii >= max(h, w) - 1 are the global model computed through the window path),
    ``"grid"`` at most max(h, w) - 1 (a plan's radius), ``"local"`` at most max(h, w) - 2, i.e. a radius that is truly
    local (probes and radius schedules, where a global radius would measure nothing).
    """
    if radius is None:
        return
    h, w = grid
    top = {"any": None, "grid": global_radius(grid), "local": global_radius(grid) - 1}[bound]
    values = radius if isinstance(radius, (list, tuple)) else torch.as_tensor(radius).reshape(-1).tolist()
    for r in values:
        r = parse_radius(r)
        if top is not None and not 0 <= r <= top:
            extra = f" ({global_radius(grid)} or more is already global)" if bound == "local" else " (omit it for global attention)"
            raise UserError(f"Radius {int(r)} is out of range: it does not fit {model}'s {h}x{w} token grid; use a radius in 0..{top}{extra}.")
