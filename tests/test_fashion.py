"""Fashion-MNIST: the reader of Debian's idx files and its checks, the 2,000 bundled test images, the datamodule,
and the shipped classifier (the probes' classifier and FD features of models trained on Fashion-MNIST)."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from critsample import datasets
from critsample.cli import main
from critsample.datasets import FASHION_MNIST_DIR, fashion_mnist, fashion_mnist_bundled, fashion_mnist_uint8
from critsample.errors import UserError
from critsample.finetune.data import FashionMNISTDataModule
from critsample.models import bundled_path
from critsample.models.classifiers import FashionCNN, load_classifier

REPO = Path(__file__).resolve().parents[1]
HAVE_DEBIAN = (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists()
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason="apt-get install dataset-fashion-mnist")
# sha256 of the bundled images' bytes then labels' bytes (the npz's own bytes depend on the zlib version).
BUNDLED_SHA256 = "fa5a2fe7b38cac2287608a0fec92aa00598306db527fca2090114bdd5e294760"


def _write_idx(folder: Path, name: str, magic: int, array: np.ndarray) -> None:
    head = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(folder / name, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def _fake_split(folder: Path, split: str, n: int) -> None:
    images = np.zeros((n, 28, 28), np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    img, lab = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}[split]
    _write_idx(folder, img, 2051, images)
    _write_idx(folder, lab, 2049, labels)


def test_bundled_part_shape_and_checksum():
    images, labels = fashion_mnist_bundled()
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (2000,) and labels.dtype == np.uint8
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == BUNDLED_SHA256
    assert np.bincount(labels, minlength=10).min() >= 180  # a random 20 %: every class present, roughly balanced
    path = Path(str(bundled_path("fashion-mnist")))
    assert (path / "test-2000.npz").stat().st_size < 2_000_000
    notice = (path / "LICENSE").read_text()
    assert "Zalando" in notice and "MIT License" in notice


@needs_debian
def test_reader_with_the_debian_files():
    x, y = fashion_mnist("test")
    assert x.shape == (10000, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1).all()  # 2 pixels of background on every side
    assert torch.bincount(y).tolist() == [1000] * 10
    images, labels = fashion_mnist_uint8("test")
    with np.load(Path(str(bundled_path("fashion-mnist"))) / "test-2000.npz") as blob:  # the part is the test split's
        index = blob["index"].astype(np.int64)
        np.testing.assert_array_equal(blob["images"], images[index])
        np.testing.assert_array_equal(blob["labels"], labels[index])
    train, train_labels = fashion_mnist_uint8("train")  # mean/std verified inside
    assert train.shape == (60000, 28, 28) and np.bincount(train_labels).tolist() == [6000] * 10


def test_test_split_falls_back_to_the_bundled_part(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path))
    x, y = fashion_mnist("test")
    assert x.shape == (2000, 1, 32, 32) and y.shape == (2000,)
    x2, y2 = fashion_mnist("test-2000")
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    assert torch.equal(y, y2)
    torch.testing.assert_close(x[:, :, 2:30, 2:30],
                               torch.from_numpy(fashion_mnist_bundled()[0]).float()[:, None] / 127.5 - 1)


def test_missing_train_split_is_one_sentence_naming_apt_and_data(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(UserError) as err:
        fashion_mnist("train")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data" in msg
    assert msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):  # an explicit folder: no fallback
        fashion_mnist("test", root=str(tmp_path))


def test_bad_files_are_user_errors(tmp_path):
    _fake_split(tmp_path, "train", 60000)  # right shapes, blank images: the mean/std check catches it
    with pytest.raises(UserError, match="mean 0.0000"):
        fashion_mnist("train", root=str(tmp_path))
    _fake_split(tmp_path, "test", 10)
    with pytest.raises(UserError, match="expected 10000"):
        fashion_mnist("test", root=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03garbage")
    with pytest.raises(UserError, match="not a Fashion-MNIST idx file"):
        fashion_mnist("test", root=str(tmp_path))


def test_fit_without_the_data_exits_2_in_one_sentence(tmp_path, capsys):
    code = main(["fit", "--config", str(REPO / "configs/fit/dit-fashion.yaml"), "--data.data", str(tmp_path),
                 "--trainer.logger", "false", "--ckpt_path", "null", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "apt-get install dataset-fashion-mnist" in line and "--data" in line


def test_datamodule(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path))  # the bundled part serves validation
    dm = FashionMNISTDataModule(batch_size=8, val_size=100)
    assert dm.dataset_name == "fashion-mnist"
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (100, 1, 32, 32) and y.shape == (100,) and x.dtype == torch.float32
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")  # training needs the full set


@needs_debian
def test_datamodule_trains_on_the_full_train_split():
    dm = FashionMNISTDataModule(batch_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 60000 and len(dm.test_set) == 512
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64


def test_shipped_fashion_classifier_accuracy_on_the_bundled_part():
    folder = Path(str(bundled_path("fashion-classifier")))
    cfg = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").stat().st_size < 2_000_000
    clf = load_classifier("fashion-mnist")
    assert isinstance(clf, FashionCNN) and not any(p.requires_grad for p in clf.parameters())
    x, y = fashion_mnist("test-2000")
    with torch.no_grad():
        logits = clf.predict_logits((x + 1) / 2)
        f = clf.features((x[:8] + 1) / 2)
        torch.testing.assert_close(clf.head(f), logits[:8])
    acc = (logits.argmax(-1) == y).double().mean().item()
    assert acc >= 0.90
    assert acc == pytest.approx(cfg["bundled_test_2000_accuracy"], abs=1e-12)  # the record is the shipped model's
    assert cfg["test_accuracy"] >= 0.90 and cfg["seed"] == 0
    assert cfg["train_command"].startswith("python -m critsample.finetune.fashion_classifier")
    assert cfg["num_parameters"] == sum(p.numel() for p in clf.parameters())


def test_fashion_models_default_to_the_fashion_classifier_and_bundled_data():
    from types import SimpleNamespace

    from critsample.detect.data import classifier_name, load_data

    model = SimpleNamespace(family="dit", dataset="fashion-mnist", num_classes=10, name="dit-fashion",
                            encode=lambda images: images * 2 - 1)
    cfg = SimpleNamespace(classifier=None, data=None, seed=0)
    assert classifier_name(cfg, model) == "fashion-mnist"
    x, y = load_data(cfg, model, 10, "cpu", class_id=3)  # the bundled part, with or without the Debian files
    assert x.shape[1:] == (1, 32, 32) and (y == 3).all() and len(y) == (fashion_mnist_bundled()[1] == 3).sum()


def test_fashion_fd_features_and_real_images():
    from critsample.metrics import fashion_features, fashion_fid, fashion_real

    real = fashion_real()
    assert real.shape == (2000, 1, 32, 32) and real.min() >= 0 and real.max() <= 1
    assert fashion_features().num_features == 128
    same = fashion_fid(real[:1000])  # half of the same 2,000 images: near the floor
    blank = fashion_fid(torch.zeros(1000, 1, 32, 32) + torch.rand(1000, 1, 1, 1) * 0.1)
    assert 0 <= same < blank / 10
