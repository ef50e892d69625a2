"""bench/gpu.py --device cpu --tiny runs every part and ends with one JSON object (~35 s here with one core free)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import critsample.local_attention as la

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["device"] == "cpu" and res["tiny"] is True and res["targets_met"] is None
    assert res == json.loads((tmp_path / "bench-gpu.json").read_text())
    # the row-major sparsity is the BlockMask's, which tests/test_flex_attention.py ties to kv_block_density
    for g in (32, 64):
        for r in (2, 4, 8):
            row = res["block_sparsity"][f"{g}x{g}_r{r}"]
            assert row["row_major"] == pytest.approx(1 - la.kv_block_density(g, g, r), abs=1e-4)
            assert 0 < row["tiles_8x16"] < 1
    # 8 x 16 tiles on 64 x 64 (8 x 4 tiles): for r <= 8 a tile reaches its neighbours, no further, along each axis:
    # 3 * 8 - 2 = 22 (tile row, tile row) pairs times 3 * 4 - 2 = 10 column pairs of 32^2 block pairs
    assert res["block_sparsity"]["64x64_r4"]["tiles_8x16"] == pytest.approx(1 - 22 * 10 / 32**2, abs=1e-4)
    assert set(res["window_over_dense"]) == {f"{g}x{g}_r{r}" for g in (16, 32) for r in (2, 4, 8)}
    assert all(v > 0 for v in res["window_over_dense"].values())
    assert set(res["local_over_global_step"]) == {"dit-xl", "sd3-medium"}
    assert res["detect_fast_s"] > 0 and (tmp_path / next(tmp_path.glob("detect-fast-*")).name / "summary.json").exists()
    assert "step_sd3-medium" in res["peak_memory_mb"] and "detect_fast" in res["peak_memory_mb"]
