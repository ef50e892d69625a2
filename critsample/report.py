"""Figures, image grids and the run report (side effects: the file system and W&B live here and in store.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> one uint8 grid (rows of ``nrow``), HWC or HW for one channel."""
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    x = torch.cat([x, torch.ones(rows * nrow - n, c, h, w)]) if rows * nrow > n else x
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=1.0)
    grid = rearrange(x, "(r q) c h w -> (r h) (q w) c", q=nrow)
    grid = (grid.numpy() * 255).round().astype(np.uint8)
    return grid[..., 0] if c == 1 else grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 HW / HWC array as PNG, upscaled by ``scale`` with nearest neighbour (tiny digits stay crisp)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path
