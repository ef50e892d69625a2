"""impl="flex": FlexAttention with the window's block mask, exact against the masked reference and the naive
definition (tests/test_local_attention.py), on CPU through torch's eager FlexAttention (its reference math).

The eager path applies only the mask function; the block structure that the compiled kernels skip by is checked
separately against the window mask, so a block that a CUDA kernel would wrongly skip cannot pass unseen.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_local_attention import naive_attention, qkv

import critsample.local_attention as la
from critsample.local_attention import local_attention, window_mask

CPU = torch.device("cpu")


def masked(q, k, v, h, w, r, num_extra):
    return local_attention(q, k, v, (h, w), r, num_extra, impl="masked")


@settings(deadline=None, max_examples=25)
@given(
    h=st.integers(1, 12), w=st.integers(1, 12), r=st.integers(0, 13), num_extra=st.integers(0, 4),
    b=st.integers(1, 2), heads=st.integers(1, 3), d=st.integers(1, 9), dv=st.integers(1, 6), seed=st.integers(0, 2**16),
)
def test_flex_matches_masked_and_naive(h, w, r, num_extra, b, heads, d, dv, seed):
    q, k, v = qkv(b, heads, h * w + num_extra, d, dv, seed)
    out = local_attention(q, k, v, (h, w), r, num_extra, impl="flex")
    assert out.shape == (b, heads, h * w + num_extra, dv) and out.dtype == torch.float32
    torch.testing.assert_close(out, masked(q, k, v, h, w, r, num_extra), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, h, w, r, num_extra), atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w,r,num_extra",
                         [(12, 12, 1, 0), (12, 12, 2, 5), (16, 9, 0, 3), (9, 20, 2, 0), (24, 24, 2, 7)])
def test_flex_multi_block_grids(h, w, r, num_extra):
    """Grids of several 128-token blocks (square and not, blocks straddling rows and the text), radii 0, 1, 2."""
    q, k, v = qkv(2, 2, h * w + num_extra, 8, seed=h * w)
    out = local_attention(q, k, v, (h, w), r, num_extra, impl="flex")
    torch.testing.assert_close(out, masked(q, k, v, h, w, r, num_extra), atol=1e-5, rtol=0)


@pytest.mark.parametrize("radius", [None, 11, 40])
def test_flex_global_radius_is_plain_sdpa(radius):
    h, w, num_extra = 12, 9, 3
    q, k, v = qkv(2, 3, h * w + num_extra, 8, seed=5)
    out = local_attention(q, k, v, (h, w), radius, num_extra, impl="flex")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("radii", [[1, None, 0, 1], torch.tensor([3, 0, 2, 3])])
def test_flex_per_row_radii(radii):
    h, w, num_extra = 12, 11, 2
    q, k, v = qkv(4, 2, h * w + num_extra, 6, seed=7)
    out = local_attention(q, k, v, (h, w), radii, num_extra, impl="flex")
    torch.testing.assert_close(out, local_attention(q, k, v, (h, w), radii, num_extra, impl="masked"), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("h,w,r,num_extra", [(12, 12, 1, 0), (11, 13, 2, 4), (6, 5, 1, 2), (8, 8, 0, 3)])
def test_flex_gradients_equal_masked_gradients(monkeypatch, h, w, r, num_extra):
    """torch refuses a CPU FlexAttention backward at its entry; lifted, the dense math of its backward (what the
    CUDA kernel computes) runs and must give the masked reference's gradients."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(la, "_FLEX_BACKWARD_DEVICES", ("cpu",))
    q, k, v = qkv(2, 2, h * w + num_extra, 5, 3, seed=h + w)
    grad_out = torch.randn(2, 2, h * w + num_extra, 3, generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("masked", "flex"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        grads[impl] = torch.autograd.grad(local_attention(*leaves, (h, w), r, num_extra, impl=impl), leaves, grad_out)
    for name, a, b in zip("qkv", grads["flex"], grads["masked"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"d{name}")


def test_flex_backward_on_cpu_is_one_clear_error():
    q, k, v = (x.requires_grad_() for x in qkv(1, 1, 16, 4))
    with pytest.raises(ValueError, match="impl='tiled' or 'masked'"):
        local_attention(q, k, v, (4, 4), 1, impl="flex")
    with torch.no_grad():
        local_attention(q, k, v, (4, 4), 1, impl="flex")  # inference needs no backward


def block_level(mask, num_blocks, indices, nq: int) -> torch.Tensor:
    """(nq, nk) bool: the kv blocks a BlockMask lists for each query block."""
    out = torch.zeros(nq, indices.shape[-1], dtype=torch.bool)
    for i in range(nq):
        out[i, indices[0, 0, i, : num_blocks[0, 0, i]]] = True
    return out


@pytest.mark.parametrize("h,w,r,num_extra",
                         [(32, 32, 2, 0), (24, 20, 3, 5), (16, 16, 1, 0), (12, 30, 0, 130), (8, 64, 1, 3)])
def test_block_mask_skips_exactly_the_empty_blocks(h, w, r, num_extra):
    """What the compiled kernels rely on: a listed partial block holds a window pair, a listed full block holds only
    window pairs, and every block holding a window pair is listed (kv order; the backward's q order likewise)."""
    bm = la._flex_block_mask(h, w, r, num_extra, CPU)
    L, B = h * w + num_extra, la.FLEX_BLOCK
    nb = -(-L // B)
    mask = F.pad(window_mask(h, w, r, num_extra), (0, nb * B - L, 0, nb * B - L))
    blocks = mask.view(nb, B, nb, B).permute(0, 2, 1, 3)  # (q block, kv block, B, B)
    valid = F.pad(torch.ones(L, L, dtype=torch.bool), (0, nb * B - L, 0, nb * B - L)).view(nb, B, nb, B).permute(0, 2,
                                                                                                                 1, 3)
    any_pair, all_pairs = blocks.any((-1, -2)), (blocks | ~valid).all((-1, -2))
    partial = block_level(bm, bm.kv_num_blocks, bm.kv_indices, nb)
    full = block_level(bm, bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    assert torch.equal(partial | full, any_pair)
    assert not (partial & full).any() and bool(all_pairs[full].all())
    q_partial = block_level(bm, bm.q_num_blocks, bm.q_indices, nb).T  # listed per kv block
    q_full = block_level(bm, bm.full_q_num_blocks, bm.full_q_indices, nb).T
    assert torch.equal(q_partial, partial) and torch.equal(q_full, full)
    density = any_pair.float().mean().item()
    if B % w == 0:  # whole rows per block: exact
        assert la.kv_block_density(h, w, r, num_extra) == pytest.approx(density)
    else:
        assert la.kv_block_density(h, w, r, num_extra) >= density


def test_block_mask_cache_hit_and_built_outside_inference_mode():
    la._flex_block_mask.cache_clear()
    q, k, v = qkv(1, 2, 10 * 10 + 2, 4, seed=3)
    with torch.inference_mode():
        local_attention(q, k, v, (10, 10), 2, 2, impl="flex")
    local_attention(q, k, v, (10, 10), 2, 2, impl="flex")
    local_attention(q, k, v, (10, 10), 3, 2, impl="flex")
    info = la._flex_block_mask.cache_info()
    assert (info.hits, info.misses) == (1, 2)
    assert not la._flex_block_mask(10, 10, 2, 2, CPU).kv_num_blocks.is_inference()


def test_auto_choice_per_device():
    assert la._choose(64, 64, None, 0, "cuda") == "dense"
    assert la._choose(64, 64, 4, 0, "cuda") == "flex"  # visits 15 % of the kv blocks
    assert la._choose(64, 64, 4, 333, "cuda") == "flex"  # 29 %: the text blocks are dense
    assert la._choose(32, 32, 8, 0, "cuda") == "masked"  # 53 %
    assert la._choose(16, 16, 2, 0, "cuda") == "masked"  # two blocks, both visited
    assert la._choose(64, 64, 4, 0, "cpu") == "tiled"
    # a block is 2 rows: r + 1 = 5 kv blocks per query block, 2 + 1 fewer for the first two and the last two
    assert la.kv_block_density(64, 64, 4) == (5 * 32 - 2 * 3) / 32**2


@pytest.mark.slow
def test_compiled_flex_on_cpu_skips_blocks_exactly_and_compiles_once_per_grid():
    """The compiled kernel (inductor's CPU template, ~1 min to build here) really skips by the block mask: exact
    against masked, and one graph serves every radius of a grid (the radius is a captured tensor, not a constant)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    h = w = 16
    q, k, v = qkv(1, 2, h * w + 3, 16, seed=31)
    for r in (2, 3, 5):
        out = la._compiled_flex()(q, k, v, block_mask=la._flex_block_mask(h, w, r, 3, CPU))
        torch.testing.assert_close(out, masked(q, k, v, h, w, r, 3), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


def test_flex_under_autocast_takes_the_autocast_dtype_like_sdpa():
    """SD3.5's qk RMS-norm hands fp32 q, k and a bf16 v to the processor under autocast."""
    h, w, num_extra = 6, 7, 2
    q, k, v = qkv(2, 2, h * w + num_extra, 8, seed=37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_attention(q, k, v.bfloat16(), (h, w), 1, num_extra, impl="flex")
        ref = local_attention(q, k, v.bfloat16(), (h, w), 1, num_extra, impl="masked")
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
