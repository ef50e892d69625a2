"""Lightning DataModules: the bundled digits, Fashion-MNIST, image folders (encoded by the VAE in the step), precomputed
latents."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ..datasets import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_split  # noqa: F401  (re-exported)
from ..errors import UserError
from ..tensorfiles import check_labels, check_samples, load_tensors


class DigitsDataModule(L.LightningDataModule):
    """Digits in [-1, 1], shape (1, 8, 8); ``resolution`` > 8 upsamples bilinearly (e.g. 16 with patch 2)."""

    def __init__(self, batch_size: int = 128, resolution: int = 8, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()

    @property
    def dataset_name(self) -> str | None:
        """"digits" at the native 8 x 8 (a model trained here can be probed on the digits test split and classifier)."""
        return "digits" if self.hparams.resolution == 8 else None

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_classes(root: str, class_index: str | None = None) -> dict[str, int]:
    """Class id of every sub-folder: sorted folder names (the ImageNet convention DiT was trained with, when the
    folders are the 1,000 synset ids), or an explicit JSON ``{"folder": id}`` for subsets."""


    root_p = Path(root)
    if not root_p.is_dir():
        raise UserError(f"Image folder {root} does not exist; give a folder with one sub-folder of images per class.")
    if class_index:
        return {k: int(v) for k, v in json.loads(Path(class_index).read_text()).items()}
    names = sorted(p.name for p in root_p.iterdir() if p.is_dir())
    if not names:
        raise UserError(f"{root} has no class sub-folders; put the images of class c in {root}/<c>/.")
    return {n: i for i, n in enumerate(names)}


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image in [0, 1], (3, R, R) center-cropped and resized; class id) from ``root/<class>/<image>``."""

    def __init__(self, root: str, resolution: int, class_index: str | None = None):
        self.resolution = resolution
        classes = folder_classes(root, class_index)
        self.items = [
            (p, c) for name, c in sorted(classes.items()) for p in sorted((Path(root) / name).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((self.resolution, self.resolution), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return x, label


class ImageFolderDataModule(L.LightningDataModule):
    """Images from class folders, encoded by the model's VAE inside the training step (see LatentsDataModule to
    encode once and train on latents, as fast-DiT does)."""

    def __init__(self, root: str, resolution: int = 256, batch_size: int = 32, num_workers: int = 4,
                 class_index: str | None = None, val_fraction: float = 0.01):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        full = ImageFolderDataset(h.root, h.resolution, h.class_index)
        n_val = max(1, int(len(full) * h.val_fraction))
        g = torch.Generator().manual_seed(0)
        self.train_set, self.val_set = torch.utils.data.random_split(full, [len(full) - n_val, n_val], generator=g)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(self.train_set, batch_size=h.batch_size, shuffle=True, drop_last=True,
                          num_workers=h.num_workers, persistent_workers=h.num_workers > 0, pin_memory=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


class _FloatLatents(torch.utils.data.Dataset):
    """(latent as float32, label) rows of stored (N, C, h, w) latents, converted one row at a time."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor):
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.latents[i].float(), self.labels[i]


class LatentsDataModule(L.LightningDataModule):
    """Precomputed latents: a ``.pt`` file with ``latents`` (N, C, h, w, already scaled by the VAE factor) and
    ``labels`` (N,), written by ``python -m critsample.finetune.encode``."""

    def __init__(self, path: str, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.01):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:


        if not Path(self.hparams.path).exists():
            raise UserError(f"No latents at {self.hparams.path}; write them with `python -m "
                            "critsample.finetune.encode`.")
        # Memory-mapped and kept in the stored dtype (fp16): the ranks of a node share the pages of one file instead
        # of each holding a float32 copy (ImageNet-256: ~10 GB on disk, ~20 GB per rank as float32).
        path, option = self.hparams.path, "LatentsDataModule path"
        blob = load_tensors(path, option, mmap=True)
        missing = [k for k in ("latents", "labels") if not isinstance(blob, dict) or k not in blob]
        if missing:
            has = ", ".join(map(repr, blob)) if isinstance(blob, dict) else f"a {type(blob).__name__}"
            raise UserError(f"{option} {path} has no {' and no '.join(map(repr, missing))} (it holds "
                            f"{has or 'nothing'}); write it with `python -m critsample.finetune.encode`.")
        # validated once, in chunks (stays memory-mapped)
        latents = check_samples(blob["latents"], path, option, kind="latents")
        full = _FloatLatents(latents, check_labels(blob["labels"], len(latents), path, option))
        n_val = max(1, int(len(full) * self.hparams.val_fraction))
        g = torch.Generator().manual_seed(0)
        self.train_set, self.val_set = torch.utils.data.random_split(full, [len(full) - n_val, n_val], generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST in [-1, 1], shape (1, 32, 32) (28 x 28 padded by 2 background pixels); ``data``: a folder with
    the four idx files (default: Debian's ``dataset-fashion-mnist``). Validation uses the first ``val_size`` test
    images (the test split is never trained on)."""

    def __init__(self, batch_size: int = 64, data: str | None = None, num_workers: int = 0, val_size: int = 512):
        super().__init__()
        self.save_hyperparameters()

    @property
    def dataset_name(self) -> str:
        """"fashion-mnist" (a model trained here is probed on its test split and classifier)."""
        return "fashion-mnist"

    def setup(self, stage: str | None = None) -> None:
        from ..datasets import fashion_mnist

        if stage in (None, "fit"):
            self.train_set = TensorDataset(*fashion_mnist("train", self.hparams.data))
        x, y = fashion_mnist("test", self.hparams.data)
        n = self.hparams.val_size
        self.test_set = TensorDataset(x[:n], y[:n])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, shuffle=False, num_workers=0)
