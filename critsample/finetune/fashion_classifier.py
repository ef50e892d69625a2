"""Train the shipped Fashion-MNIST classifier (:class:`~critsample.models.classifiers.FashionCNN`), the probes'
classifier and the FD feature extractor of models trained on Fashion-MNIST (dit-fashion).

    python -m critsample.finetune.fashion_classifier --out critsample/assets/fashion-classifier

Needs the full train split (``apt-get install dataset-fashion-mnist`` or ``--data FOLDER``). All randomness
(initialisation, batch order, augmentation) comes from one ``torch.Generator`` seeded with ``seed``; the test split
is only evaluated, once, after the last epoch (no model selection on it).
"""

from __future__ import annotations

import time

import torch

from ..datasets import FASHION_BUNDLED_N, FASHION_BUNDLED_SEED, fashion_mnist
from ..metrics import frechet_distance
from ..models.classifiers import FashionCNN
from .classifier import fit, random_shift, save

TRAIN_DEFAULTS = dict(epochs=10, batch_size=128, lr=3e-3, weight_decay=5e-4, label_smoothing=0.05, max_shift=1)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (every Fashion-MNIST class is mirror-symmetric as a class)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def train_fashion_classifier(
    seed: int = 0,
    epochs: int = TRAIN_DEFAULTS["epochs"],
    out: str | None = None,
    data: str | None = None,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
    label_smoothing: float = TRAIN_DEFAULTS["label_smoothing"],
    max_shift: int = TRAIN_DEFAULTS["max_shift"],
    width: int = 16,
    feature_dim: int = 128,
) -> tuple[FashionCNN, dict]:
    """Train a FashionCNN with AdamW and a one-cycle learning rate; write it to ``out`` when given.

    Args:
        seed: seed of the one generator behind initialisation, batch order and augmentation.
        epochs: passes over the 60,000 training images.
        out: folder for ``model.safetensors`` and ``config.json`` (arch, seed, command, test accuracy).
        data: folder with the four Fashion-MNIST idx files (default: Debian's /usr/share/datasets/fashion-mnist).
        batch_size: images per step (the last incomplete batch of an epoch is dropped).
        lr: peak AdamW learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        max_shift: augmentation, random integer shifts of up to this many pixels (and random left-right mirroring).
        width: channels of the first conv pair (then 2 width and 4 width).
        feature_dim: size of the penultimate (feature) layer.
    """
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = fashion_mnist("train", data)
    x_train = (x_train + 1) / 2  # the classifier takes [0, 1]
    model = FashionCNN(width=width, feature_dim=feature_dim).reset_parameters(g)
    fit(model, x_train, y_train, g, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        label_smoothing=label_smoothing, augment=lambda xb, g: random_flip(random_shift(xb, max_shift, g), g),
        on_epoch=lambda e, loss: print(f"epoch {e + 1}/{epochs}: loss {loss:.4f}, "
                                       f"{time.perf_counter() - start:.0f} s", flush=True))
    train_seconds = time.perf_counter() - start

    x_test, y_test = fashion_mnist("test", data)
    x_test = (x_test + 1) / 2
    x_part, y_part = fashion_mnist("test-2000")
    x_part = (x_part + 1) / 2
    test_acc = _batched_accuracy(model, x_test, y_test)
    with torch.no_grad():  # the FD floor of this feature space: train split vs test split
        fd_floor = frechet_distance(_batched(model.features, x_train).double(),
                                    _batched(model.features, x_test).double())
    info = dict(
        arch=model.arch,
        architecture="FashionCNN: [conv3x3 w, GELU] x2, maxpool2, [conv3x3 2w, GELU] x2, maxpool2, conv3x3 4w, GELU, "
        "maxpool2, linear(64w -> feature_dim), GELU (features), linear(feature_dim -> 10)",
        input="(B, 1, 32, 32) images in [0, 1], 0 = background (critsample.datasets.fashion_mnist images x, 28 x 28 "
        "padded by 2, mapped by (x + 1) / 2)",
        num_parameters=sum(p.numel() for p in model.parameters()),
        seed=seed,
        train=dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                   label_smoothing=label_smoothing, max_shift=max_shift, mirror=True, optimizer="AdamW + OneCycleLR"),
        data=dict(dataset="fashion-mnist", n_train=len(y_train), n_test=len(y_test),
                  bundled_part=dict(n=FASHION_BUNDLED_N, seed=FASHION_BUNDLED_SEED)),
        train_accuracy=_batched_accuracy(model, x_train, y_train),
        test_accuracy=test_acc,
        test_errors=int(round((1 - test_acc) * len(y_test))),
        bundled_test_2000_accuracy=_batched_accuracy(model, x_part, y_part),
        fid_train_vs_test=fd_floor,
        train_seconds=round(train_seconds, 1),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    if out is not None:
        save(model, info, out, "fashion_classifier",
             f"train_fashion_classifier(seed={seed}, epochs={epochs}, out={out!r})")
    return model, info


def _batched_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (_batched(model, x).argmax(-1) == y).double().mean().item()


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    # One thread: it trains beside other jobs, and a fixed count keeps the reductions reproducible.
    torch.set_num_threads(1)
    _, info = CLI(train_fashion_classifier, args=args)
    print(f"test accuracy {info['test_accuracy']:.4f} ({info['test_errors']} errors; bundled 2,000: "
          f"{info['bundled_test_2000_accuracy']:.4f}), {info['num_parameters']} parameters, {info['train_seconds']} s")


if __name__ == "__main__":
    main()
