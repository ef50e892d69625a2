"""Exact local-window attention against a naive reference written from the definition (paper Sec. 3.1, Fig. 2).

The reference loops over query tokens and builds each query's key set from |i - i'| <= r and |j - j'| <= r
(truncated at the borders) plus the dense extra tokens; it shares no code with critsample.local_attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import critsample.local_attention as la
from critsample.local_attention import local_attention, window_mask

IMPLS = ("masked", "bands1", "bands2", "bands4", "bands8", "tiled", "auto")


def allowed_keys(t: int, h: int, w: int, r: int | None, num_extra: int) -> list[int]:
    """Keys of query token t by the definition: image window truncated at the borders, extra tokens always."""
    n, total = h * w, h * w + num_extra
    if t >= n or r is None:
        return list(range(total))
    i, j = divmod(t, w)
    window = [a * w + b for a in range(h) for b in range(w) if abs(a - i) <= r and abs(b - j) <= r]
    return window + list(range(n, total))


def naive_attention(q, k, v, h, w, r, num_extra):
    """(B, H, L, d) float64 attention, one query token at a time over its own key set."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for t in range(q.shape[2]):
        keys = allowed_keys(t, h, w, r, num_extra)
        scores = torch.einsum("bhd,bhkd->bhk", q[:, :, t], k[:, :, keys]) / q.shape[-1] ** 0.5
        out[:, :, t] = torch.einsum("bhk,bhke->bhe", scores.softmax(-1), v[:, :, keys])
    return out


def qkv(b, heads, length, d, dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, heads, length, d)] * 2 + [(b, heads, length, dv or d)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@contextmanager
def step_budget(n: int):
    """The tiled path's bytes per step: small grids then also run in several steps (runs of tiles, groups of rows)."""
    old, la._STEP_BYTES_CPU = la._STEP_BYTES_CPU, n
    try:
        yield
    finally:
        la._STEP_BYTES_CPU = old


@settings(deadline=None, max_examples=40)
@given(
    h=st.integers(1, 11), w=st.integers(1, 11), r=st.integers(0, 13), num_extra=st.integers(0, 4),
    b=st.integers(1, 2), heads=st.integers(1, 3), d=st.integers(1, 9), dv=st.integers(1, 6),
    budget=st.sampled_from([1, 4000, 2 << 20]), seed=st.integers(0, 2**16),
)
def test_every_impl_matches_naive_reference(h, w, r, num_extra, b, heads, d, dv, budget, seed):
    q, k, v = qkv(b, heads, h * w + num_extra, d, dv, seed)
    ref = naive_attention(q, k, v, h, w, r, num_extra)
    with step_budget(budget):
        for impl in IMPLS:
            out = local_attention(q, k, v, (h, w), r, num_extra=num_extra, impl=impl)
            assert out.shape == ref.shape and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0, msg=f"impl={impl}")


@pytest.mark.parametrize("h,w,r,num_extra", [(13, 9, 3, 2), (20, 6, 9, 0), (17, 17, 1, 5)])
def test_tiled_with_tiles_not_dividing_the_grid(h, w, r, num_extra):
    """Grids bigger than a tile and not a multiple of it (tile 4 for r <= 8, 8 beyond)."""
    q, k, v = qkv(2, 2, h * w + num_extra, 8, seed=h)
    ref = naive_attention(q, k, v, h, w, r, num_extra)
    out = local_attention(q, k, v, (h, w), r, num_extra, impl="tiled")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@settings(deadline=None, max_examples=25)
@given(h=st.integers(1, 9), w=st.integers(1, 9), r=st.integers(0, 10), num_extra=st.integers(0, 3))
def test_window_mask_is_the_definition(h, w, r, num_extra):
    mask = window_mask(h, w, r, num_extra)
    total = h * w + num_extra
    assert mask.shape == (total, total) and mask.dtype == torch.bool
    for t in range(total):
        expected = torch.zeros(total, dtype=torch.bool)
        expected[allowed_keys(t, h, w, r, num_extra)] = True
        assert torch.equal(mask[t], expected), f"query {t}"


def test_window_mask_global_radius_is_all_true():
    assert window_mask(3, 4, None, 2).all()
    assert window_mask(3, 4, 3, 2).all()  # r = max(h, w) - 1 covers the grid
    assert not window_mask(3, 4, 2, 2).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_extra", [0, 3])
def test_radius_zero_sees_only_itself(impl, num_extra):
    """v = one-hot identity: with r = 0 an image token's output is supported on itself and the extra tokens."""
    h, w = 7, 5
    total = h * w + num_extra
    q, k, _ = qkv(2, 2, total, 4, seed=3)
    v = torch.eye(total).expand(2, 2, total, total)  # (B, H, L, L): output row = attention weights
    out = local_attention(q, k, v, (h, w), 0, num_extra=num_extra, impl=impl)
    n = h * w
    if num_extra == 0:
        assert torch.equal(out, v)  # softmax over a single key is exactly 1
    else:
        support = torch.eye(n, total, dtype=torch.bool)
        support[:, n:] = True
        assert (out[:, :, :n][..., ~support] == 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, total))
        assert (out[:, :, :n][..., support] > 0).all()


@pytest.mark.parametrize("impl", ["dense", "masked", "tiled", "auto"])
@pytest.mark.parametrize("radius", [None, 8, 100])
def test_global_radius_is_plain_sdpa(impl, radius):
    h, w, num_extra = 9, 6, 3  # r >= max(h, w) - 1 = 8 covers the grid
    q, k, v = qkv(2, 3, h * w + num_extra, 8, seed=5)
    expected = F.scaled_dot_product_attention(q, k, v)
    out = local_attention(q, k, v, (h, w), radius, num_extra, impl=impl)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("radii", [[1, None, 0, 1], torch.tensor([3, 0, 2, 3]), (2, 2, 2, 2)])
def test_per_row_radius_equals_rows_run_separately(impl, radii):
    h, w, num_extra = 8, 7, 2
    q, k, v = qkv(4, 2, h * w + num_extra, 6, seed=7)
    out = local_attention(q, k, v, (h, w), radii, num_extra, impl=impl)
    values = radii.tolist() if isinstance(radii, torch.Tensor) else list(radii)
    for row, r in enumerate(values):
        one = local_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], (h, w), r, num_extra, impl=impl)
        torch.testing.assert_close(out[row : row + 1], one, atol=1e-6, rtol=0)


@settings(deadline=None, max_examples=12)
@given(
    h=st.integers(2, 10), w=st.integers(2, 10), r=st.integers(0, 5), num_extra=st.integers(0, 3),
    budget=st.sampled_from([1, 4000, 2 << 20]), seed=st.integers(0, 2**16),
)
def test_tiled_gradients_equal_masked_gradients(h, w, r, num_extra, budget, seed):
    q, k, v = qkv(2, 2, h * w + num_extra, 5, 3, seed)
    grad_out = torch.randn(2, 2, h * w + num_extra, 3, generator=torch.Generator().manual_seed(seed))
    grads = {}
    with step_budget(budget):
        for impl in ("masked", "tiled", "bands2"):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = local_attention(*leaves, (h, w), r, num_extra, impl=impl)
            grads[impl] = torch.autograd.grad(out, leaves, grad_out)
    for impl in ("tiled", "bands2"):
        for name, a, b in zip("qkv", grads[impl], grads["masked"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{impl} d{name}")


def test_tiled_passes_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 6 * 5 + 2, 3, seed=11, dtype=torch.float64))
    with step_budget(500):  # several steps: each adds its gradients into rows that other steps share
        assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, (6, 5), 1, 2, impl="tiled"), (q, k, v))


def test_per_row_radii_are_differentiable():
    q, k, v = (x.requires_grad_() for x in qkv(3, 2, 6 * 6, 4, seed=13))
    local_attention(q, k, v, (6, 6), [0, None, 2], impl="tiled").square().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_tiled_never_builds_the_full_mask(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the tiled path built an (L, L) mask")

    monkeypatch.setattr(la, "window_mask", forbidden)
    monkeypatch.setattr(la, "_cached_mask", forbidden)
    q, k, v = qkv(1, 2, 24 * 24 + 3, 8, seed=17)
    out = local_attention(q, k, v, (24, 24), 2, num_extra=3, impl="tiled")
    ref_rows = [0, 25, 300, 575, 576, 578]  # corners, interior, the last image token, extra tokens
    ref = naive_attention(q, k, v, 24, 24, 2, 3)
    torch.testing.assert_close(out[:, :, ref_rows].double(), ref[:, :, ref_rows], atol=1e-5, rtol=0)


def test_non_contiguous_inputs_match_contiguous():
    """diffusers hands over (B, L, H, d).transpose(1, 2) views."""
    h, w, num_extra = 10, 9, 2
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(2, 3, h * w + num_extra, 8, seed=19))
    assert not q.is_contiguous()
    for impl in IMPLS:
        torch.testing.assert_close(
            local_attention(q, k, v, (h, w), 2, num_extra, impl=impl),
            local_attention(q.contiguous(), k.contiguous(), v.contiguous(), (h, w), 2, num_extra, impl=impl),
        )
    grads = []
    for impl in ("masked", "tiled"):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        local_attention(*leaves, (h, w), 2, num_extra, impl=impl).square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["masked", "tiled"])
def test_half_precision_keeps_dtype_and_is_close(dtype, impl):
    h, w, num_extra = 11, 9, 3
    q, k, v = qkv(2, 2, h * w + num_extra, 16, seed=23)
    ref = naive_attention(q, k, v, h, w, 2, num_extra)
    out = local_attention(q.to(dtype), k.to(dtype), v.to(dtype), (h, w), 2, num_extra, impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)


@pytest.mark.parametrize("point", sorted(la._CPU_RULE))
def test_auto_picks_the_measured_table_at_its_points(point):
    side, r = point
    without, with_text = la._CPU_RULE[point]
    assert la._choose(side, side, r, 0) == without
    assert la._choose(side, side, r, la._CPU_TEXT) == with_text
    assert la._choose(side, side, None, la._CPU_TEXT) == "dense"
    assert {without, with_text} <= set(la.IMPLS) - {"auto", "dense", "flex"}  # exact local paths only


@pytest.mark.parametrize(
    "h, w, r, num_extra, point, column",
    [
        (14, 14, 2, 0, (16, 2), 0),  # nearest side 16 (log scale)
        (128, 128, 8, 0, (64, 4), 0),  # side beyond the table: radius scaled 64 / 128
        (24, 24, 0, 0, (32, 1), 0),  # 24 is nearer 32 than 16 on a log scale; r = 0 counts as 1, 1 * 32 / 24 -> 1
        (32, 32, 3, 20, (32, 4), 0),  # 20 text tokens: under half of 333's fraction at 32x32
        (32, 32, 3, 200, (32, 4), 1),
        (40, 40, 8, 0, (32, 8), 0),  # 40 is nearer 32; radius 8 * 32 / 40 = 6.4 -> 8
    ],
)
def test_auto_generalizes_to_the_nearest_measured_point(h, w, r, num_extra, point, column):
    assert la._choose(h, w, r, num_extra) == la._CPU_RULE[point][column]


def test_auto_on_cuda_keeps_the_flex_rule():
    assert la._choose(64, 64, 4, 0, "cuda") == "flex"  # 15 % of kv blocks
    assert la._choose(16, 16, 2, 0, "cuda") == "masked"  # every kv block


@pytest.mark.parametrize("h, w, r, num_extra", [(16, 16, 2, 0), (32, 32, 1, 5), (16, 16, 8, 3), (20, 20, 1, 0)])
def test_auto_runs_exactly_the_chosen_path(h, w, r, num_extra):
    """Bitwise equal to the implementation the rule names, and within fp32 rounding of the masked reference."""
    q, k, v = qkv(1, 2, h * w + num_extra, 8, seed=r)
    out = local_attention(q, k, v, (h, w), r, num_extra)
    chosen = local_attention(q, k, v, (h, w), r, num_extra, impl=la._choose(h, w, r, num_extra))
    assert torch.equal(out, chosen)
    ref = local_attention(q, k, v, (h, w), r, num_extra, impl="masked")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(radius=-1), "non-negative"),
        (dict(radius=1.5), "non-negative integer"),
        (dict(radius="2"), "non-negative integer"),
        (dict(radius=True), "non-negative integer"),
        (dict(radius=[1, 2, 3]), "per-row radii"),
        (dict(radius=[1, -2]), "non-negative"),
        (dict(grid=(4, 4)), "makes 16 tokens"),
        (dict(grid=(0, 5)), "positive integers"),
        (dict(grid=5), "pair of positive integers"),
        (dict(num_extra=-1), "num_extra"),
        (dict(num_extra=3), "makes 23 tokens"),
        (dict(impl="flash"), "impl must be one of"),
        (dict(impl="dense", radius=1), "global radius"),
    ],
)
def test_bad_inputs_raise_one_clear_value_error(kwargs, match):
    q, k, v = qkv(2, 2, 4 * 5, 4)
    args = dict(grid=(4, 5), radius=1, num_extra=0, impl="auto") | kwargs
    with pytest.raises(ValueError, match=match):
        local_attention(q, k, v, **args)


def test_bad_shapes_raise_value_error():
    q, k, v = qkv(2, 2, 20, 4)
    with pytest.raises(ValueError, match=r"\(B, H, L, d\)"):
        local_attention(q[0], k[0], v[0], (4, 5), 1)
    with pytest.raises(ValueError, match="share"):
        local_attention(q, k[:, :, :19], v, (4, 5), 1)
    with pytest.raises(ValueError, match="non-negative"):
        window_mask(4, 5, -1)


@pytest.mark.parametrize("impl", ["masked", "tiled"])
def test_caches_filled_in_inference_mode_serve_training(impl):
    """A sampler under torch.inference_mode may build the cached masks and tile plans before a fine-tune reuses them."""
    la._cached_mask.cache_clear()
    la._tile_plan.cache_clear()
    q, k, v = qkv(2, 2, 9 * 7 + 2, 4, seed=29)
    with torch.inference_mode():
        local_attention(q, k, v, (9, 7), 2, 2, impl=impl)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    local_attention(*leaves, (9, 7), 2, 2, impl=impl).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
