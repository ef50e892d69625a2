"""The probes' gaps of a model run in bf16: predictions come back in fp32 and are differenced there (eqs. 6, 7),
so a locality gap is the model's, not the rounding of its two forwards."""

from __future__ import annotations

import torch

from critsample.probes.gaps import score_gaps
from critsample.probes.rows import num_tokens, predict_rows, radius_codes


def test_predictions_of_bf16_states_come_back_in_fp32(dit):
    x = torch.randn(3, *dit.sample_shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    t, cond = torch.full((3,), 0.4, dtype=torch.float64), torch.tensor([1, 2, 3])
    out = predict_rows(dit, x, t, cond, radius_codes([1, None, 1]))
    assert out.dtype == torch.float32
    assert torch.equal(out, predict_rows(dit, x.float(), t, cond, radius_codes([1, None, 1])))


def test_locality_gap_of_bf16_forwards_is_signal_not_rounding(dit):
    """Under bf16 autocast (CPU) the r = 1 locality gap is far above the bf16 rounding level of the output
    (unit roundoff 2^-8 times the prediction's norm per token), within 5 % of the fp32 model's gap, and within the
    two bf16 forwards' own errors of it (triangle inequality)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *dit.sample_shape, generator=g)
    cond, t = torch.tensor([0, 3, 5, 7]), torch.full((4,), 0.5, dtype=torch.float64)
    fp32 = score_gaps(dit, x[None], [0.5], cond, [1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = score_gaps(dit, x[None], [0.5], cond, [1])
        pred_bf16 = {r: predict_rows(dit, x, t, cond, radius_codes([r] * 4)).double() for r in (None, 1)}
    pred_fp32 = {r: predict_rows(dit, x, t, cond, radius_codes([r] * 4)).double() for r in (None, 1)}
    assert not torch.equal(pred_bf16[None], pred_fp32[None])  # the autocast forward did run in bf16
    n = num_tokens(dit, x)
    output_rounding = 2.0**-8 * pred_fp32[None].flatten(1).norm(dim=1) / n  # (B,)
    forward_error = sum((pred_bf16[r] - pred_fp32[r]).flatten(1).norm(dim=1) / n for r in (None, 1))
    gap_bf16, gap_fp32 = bf16["loc_gap_cond_eps"][:, 0, 0], fp32["loc_gap_cond_eps"][:, 0, 0]
    assert bool((gap_bf16 > 10 * output_rounding).all()), (gap_bf16, output_rounding)
    assert bool(((gap_bf16 - gap_fp32).abs() <= forward_error * (1 + 1e-6)).all())
    torch.testing.assert_close(gap_bf16, gap_fp32, rtol=0.05, atol=0)
