"""Datasets that need no download and no Lightning: scikit-learn's bundled digits with critsample's fixed split, and
Fashion-MNIST from Debian's `dataset-fashion-mnist` (or a folder), with 2,000 test images bundled in the package."""

from __future__ import annotations

import numpy as np
import torch

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed digits split: a permutation of the 1,797 images with seed 0; the last 20 % (359 images) are the test
    split.

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


# -- Fashion-MNIST ------------------------------------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and std of the 60,000 train images on [0, 1] (Zalando's published values; a check that the files are right).
FASHION_MNIST_TRAIN_MEAN, FASHION_MNIST_TRAIN_STD = 0.2860, 0.3530
# The bundled part of the test split: the first FASHION_BUNDLED_N images of a seed-0 permutation of the 10,000.
FASHION_BUNDLED_SEED, FASHION_BUNDLED_N = 0, 2000


def _fashion_bundled_path():
    from importlib.resources import files

    return files("critsample") / "assets" / "fashion-mnist" / "test-2000.npz"


def _read_idx(path, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """An idx file (gzip-compressed or not): big-endian magic, dimension sizes, then uint8 data."""
    import gzip

    from .errors import UserError

    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"Cannot read the Fashion-MNIST file {path} ({e}); reinstall it with "
                        f"`apt-get install --reinstall dataset-fashion-mnist`.") from None
    ndim = len(shape_tail) + 1
    head = np.frombuffer(raw[: 4 * (ndim + 1)].ljust(4 * (ndim + 1), b"\0"), dtype=">u4")
    if len(raw) < 4 * (ndim + 1) or int(head[0]) != magic or tuple(int(s) for s in head[2:]) != shape_tail:
        raise UserError(f"{path} is not a Fashion-MNIST idx file (header {head.tolist()}); "
                        f"reinstall it with `apt-get install --reinstall dataset-fashion-mnist`.")
    n = int(head[1])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (ndim + 1))
    if data.size != n * int(np.prod(shape_tail, dtype=np.int64)):
        raise UserError(f"{path} is truncated ({data.size} bytes of data for {n} items); "
                        f"reinstall it with `apt-get install --reinstall dataset-fashion-mnist`.")
    return data.reshape(n, *shape_tail)


def fashion_mnist_uint8(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as stored: images (N, 28, 28) uint8 (0 = background) and labels (N,) uint8, verified.

    ``root``: a folder with the four idx files (default: Debian's ``/usr/share/datasets/fashion-mnist``). Without
    the files the test split falls back to the 2,000 test images bundled in the package; the train split needs them.
    """
    from pathlib import Path

    from .errors import UserError

    if split not in FASHION_MNIST_FILES:
        raise UserError(f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}.")
    folder = Path(root) if root is not None else Path(FASHION_MNIST_DIR)
    img_name, lab_name, n_expected = FASHION_MNIST_FILES[split]
    img_path, lab_path = folder / img_name, folder / lab_name
    if not img_path.exists() and (folder / img_name[:-3]).exists():  # uncompressed copies
        img_path, lab_path = folder / img_name[:-3], folder / lab_name[:-3]
    if not (img_path.exists() and lab_path.exists()):
        if split == "test" and root is None:
            return fashion_mnist_bundled()
        raise UserError(
            f"Fashion-MNIST {split} files are missing from {folder} ({img_name}, {lab_name}); install them with "
            f"`apt-get install dataset-fashion-mnist` or give a folder that holds them with --data (in critsample fit, "
            f"--data.data FOLDER)."
        )
    images = _read_idx(img_path, 2051, (28, 28))
    labels = _read_idx(lab_path, 2049, ())
    if len(images) != n_expected or len(labels) != n_expected or labels.max() > 9:
        raise UserError(f"{folder} does not hold the Fashion-MNIST {split} split ({len(images)} images, "
                        f"{len(labels)} labels; expected {n_expected} of each, labels 0-9).")
    if split == "train":
        n_px = images.size  # exact integer sums: no float copy of the 47 million pixels
        s1 = int(images.sum(dtype=np.int64))
        s2 = int((images.astype(np.uint16) ** 2).sum(dtype=np.int64))
        mean = s1 / n_px / 255.0
        std = float(np.sqrt(max(s2 / n_px / 255.0**2 - mean**2, 0.0)))
        if abs(mean - FASHION_MNIST_TRAIN_MEAN) > 2e-3 or abs(std - FASHION_MNIST_TRAIN_STD) > 2e-3:
            raise UserError(f"The train images in {folder} have mean {mean:.4f} and std {std:.4f} on [0, 1], not "
                            f"Fashion-MNIST's {FASHION_MNIST_TRAIN_MEAN} and {FASHION_MNIST_TRAIN_STD}.")
    return images, labels


def fashion_mnist_bundled() -> tuple[np.ndarray, np.ndarray]:
    """The 2,000 test images bundled in the package (uint8 (2000, 28, 28), labels (2000,) uint8, with their
    indices into the 10,000-image test split in the file's ``index``)."""
    from .errors import UserError

    path = _fashion_bundled_path()
    try:
        with path.open("rb") as f, np.load(f) as blob:
            return blob["images"].copy(), blob["labels"].copy()
    except FileNotFoundError:
        raise UserError(
            f"The bundled Fashion-MNIST test part {path} is missing (a broken install); install the full set with "
            f"`apt-get install dataset-fashion-mnist` or give a folder that holds it with --data."
        ) from None


def fashion_mnist(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (N, 1, 32, 32) float32 in [-1, 1] (28 x 28 padded by 2 background pixels on every side,
    -1 = background) and labels (N,) int64. ``split``: 'train' (60,000), 'test' (10,000, or the bundled 2,000 when
    the Debian files are absent) or 'test-2000' (the bundled part, always). ``root``: see :func:`fashion_mnist_uint8`.
    """
    if split == "test-2000":
        images, labels = fashion_mnist_bundled()
    else:
        images, labels = fashion_mnist_uint8(split, root)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))
