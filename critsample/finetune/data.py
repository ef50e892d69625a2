"""DataModules: scikit-learn's bundled digits (no download) for the embedded dit-digits model."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed digits split: a permutation of the 1,797 images with seed 0; the last 20 % (360) are the test split.

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


class DigitsDataModule(L.LightningDataModule):
    """Digits in [-1, 1], shape (1, 8, 8); ``resolution`` > 8 upsamples bilinearly (e.g. 16 with patch 2)."""

    def __init__(self, batch_size: int = 128, resolution: int = 8, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def _dataset(self, split: str) -> TensorDataset:
        x, y = digits_split(split)
        r = self.hparams.resolution
        if r != 8:
            x = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset("train")
        self.test_set = self._dataset("test")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512, shuffle=False, num_workers=0)
