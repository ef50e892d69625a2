"""Every local-window attention processor (DiT, SD3, PixArt, FLUX) and the one radius check.

The paper's local denoiser keeps every weight of the pretrained model and only truncates image-token attention to a
Chebyshev window of radius ``r`` on the 2-D token grid (|i - i'| <= r and |j - j'| <= r, truncated at the borders).
In SD3's joint attention and FLUX's [text; image] attention only image-to-image attention is windowed; text tokens
see and are seen by everything. PixArt's cross-attention to the text stays dense.

The processors read two per-call keyword arguments that diffusers forwards from ``cross_attention_kwargs`` (DiT,
PixArt) or ``joint_attention_kwargs`` (SD3, FLUX): ``radius`` (None = global, an int, or one radius per batch row) and
``grid`` (the (h, w) token grid). With ``radius=None`` they run exactly the stock processor's computation.

A third keyword, ``blocks`` ((B, h w) long or None), selects the strictly local denoiser's masked path
(``local_attention.block_attention``; built by :mod:`critsample.strict_locality`): in each row an image token
attends only to the image tokens of its own block (plus the text), and text queries only to block 0; ``radius`` is
then ignored (the blocks are the windows).

Installing them: :func:`install_window_attention` (DiT, SD3), :func:`install_pixart_window_attention`,
:func:`install_flux_window_attention`; the families in ``models/`` call these when they load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

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


# -- PixArt: windowed self-attention, dense cross-attention to T5 ------------------------------------------------------


class DenseCrossAttnProcessor(AttnProcessor2_0):
    """PixArt's cross-attention (image queries, T5 keys with the padding mask): diffusers' stock computation at every
    radius. It names ``radius``, ``grid`` and ``blocks`` only so that diffusers' ``Attention`` does not warn on every
    call that it drops them (it filters keyword arguments by the processor's signature)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        radius=None,
        grid: tuple[int, int] | None = None,
        blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_pixart_window_attention(transformer: torch.nn.Module) -> int:
    """Window processor on every block's self-attention ``attn1``, the dense one on its cross-attention ``attn2``.

    PixArt's ``attn1`` is plain unmasked self-attention over image tokens (no group norm, no residual inside), which is
    what :class:`WindowAttnProcessor` computes; the pipelines never pass a self-attention mask. Returns the number of
    windowed layers."""
    count = 0
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(WindowAttnProcessor())
        count += 1
        if block.attn2 is not None:
            block.attn2.set_processor(DenseCrossAttnProcessor())
    if count == 0:
        raise ValueError(f"{type(transformer).__name__} has no transformer blocks to window.")
    return count


# -- FLUX.1: [text; image] tokens in double- and single-stream blocks, RoPE --------------------------------------------


def _attend_text_first(q, k, v, grid, radius: Radius, num_text: int,
                       blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, d) attention over [text; image] tokens: the strict blocks when given (``attention`` module
    docstring), else stock SDPA when global, else the window on image pairs.

    ``local_attention`` takes the dense tokens after the image tokens; attention is equivariant under a permutation
    of its tokens, so the text block is rolled to the end and the output rolled back.
    """
    if blocks is not None:
        return block_attention(q, k, v, blocks, num_text, extra_first=True)
    if _is_global(radius, grid):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    q, k, v = (torch.roll(a, -num_text, dims=2) for a in (q, k, v))  # [image; text]
    out = local_attention(q, k, v, grid=grid, radius=radius, num_extra=num_text)
    return torch.roll(out, num_text, dims=2)  # back to [text; image]


class FluxWindowAttnProcessor:
    """``FluxAttnProcessor`` with image-to-image attention windowed per call (``radius``, ``grid`` from
    ``joint_attention_kwargs``, which ``FluxTransformer2DModel`` hands to both block kinds).

    Double-stream blocks pass image tokens as ``hidden_states`` and text as ``encoder_hidden_states`` (own
    projections); single-stream blocks pass the concatenation [text; image] as ``hidden_states``, so the number of
    text tokens there is L - h w. With a global radius this is the stock computation.
    """

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        radius: Radius = None,
        grid: tuple[int, int] | None = None,
        blocks: torch.Tensor | None = None,
    ):
        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise NotImplementedError("FluxWindowAttnProcessor handles unmasked attention with unfused projections "
                                      "only.")
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))  # (B, N, H * d) -> (B, N, H, d), as the stock processor

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            # (B, T + N, H, d)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
            num_text = encoder_hidden_states.shape[1]
        else:  # single-stream: hidden_states is already [text; image]; without a grid the call is global
            num_text = q.shape[1] - grid[0] * grid[1] if grid is not None else 0
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = _attend_text_first(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid, radius, num_text,
                                 blocks)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, T + N, H * d)
        if not joint:
            return out
        txt, img = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())


def install_flux_window_attention(transformer: torch.nn.Module) -> int:
    """Give every ``FluxAttention`` layer (double- and single-stream blocks) the window processor."""
    layers = [m for m in transformer.modules() if isinstance(m, FluxAttention)]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no FluxAttention layers to window.")
    for m in layers:
        m.set_processor(FluxWindowAttnProcessor())
    return len(layers)


# -- the one radius check ----------------------------------------------------------------------------------------------


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
            extra = (f" ({global_radius(grid)} or more is already global)" if bound == "local"
                     else " (omit it for global attention)")
            raise UserError(f"Radius {int(r)} is out of range: it does not fit {model}'s {h}x{w} token grid; use a "
                            f"radius in 0..{top}{extra}.")
