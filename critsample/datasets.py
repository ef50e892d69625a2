"""Datasets that need no download and no Lightning: scikit-learn's bundled digits with critsample's fixed split."""

from __future__ import annotations

import numpy as np
import torch

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed digits split: a permutation of the 1,797 images with seed 0; the last 20 % (359 images) are the test split.

    Returns images (N, 1, 8, 8) float32 in [-1, 1] (pixel values 0..16 scaled) and labels (N,) int64.
    The test split is never trained on.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"Digits split must be 'train', 'test' or 'all'; got {split!r}.")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    labels = torch.from_numpy(data.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels)))
    n_test = int(round(DIGITS_TEST_FRACTION * len(labels)))
    idx = {"train": perm[:-n_test], "test": perm[-n_test:], "all": perm}[split]
    return images[idx], labels[idx]
