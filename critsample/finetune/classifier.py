"""Train the shipped digits classifier (:class:`~critsample.models.classifiers.DigitsCNN`) on the digits train split.

    python -m critsample.finetune.classifier --out critsample/assets/digits-classifier

All randomness (initialisation, batch order, shift augmentation) comes from one ``torch.Generator`` seeded with
``seed``; the test split is only evaluated, once, after the last epoch (no model selection on it).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..datasets import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_split
from ..metrics import frechet_distance
from ..models.classifiers import DigitsCNN
from ..store import atomic_write

TRAIN_DEFAULTS = dict(epochs=60, batch_size=64, lr=3e-3, weight_decay=5e-4, label_smoothing=0.05, max_shift=1)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with background 0."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images_0_1: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images_0_1).argmax(-1) == labels).double().mean().item()


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *, epochs: int, batch_size: int,
        lr: float, weight_decay: float, label_smoothing: float, augment, on_epoch=None) -> None:
    """The training loop of the shipped classifiers: AdamW with a one-cycle learning rate over ``epochs`` passes
    (the last incomplete batch of an epoch dropped), batch order and ``augment(xb, g)`` drawn from ``g``;
    ``on_epoch(epoch, mean_loss)`` after each pass. Leaves the model in eval mode."""
    steps_per_epoch = len(y) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if on_epoch is not None:
            on_epoch(epoch, total / steps_per_epoch)
    model.eval()


def save(model: torch.nn.Module, info: dict, out: str, module: str, call: str) -> None:
    """Write a trained classifier to ``out`` (``model.safetensors``, ``config.json`` with ``info`` and the command
    that made it: ``python -m critsample.finetune.<module> ...`` when run as that script, else ``call``)."""
    from safetensors.torch import save as to_bytes

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    script = f"python -m critsample.finetune.{module} " + shlex.join(sys.argv[1:])
    info["train_command"] = script if Path(sys.argv[0]).stem == module else call
    atomic_write(folder / "model.safetensors", to_bytes({k: v.contiguous() for k, v in model.state_dict().items()}))
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the file ships in the package
    atomic_write(folder / "config.json", json.dumps(info, indent=2) + "\n")


def train_digits_classifier(
    seed: int = 0,
    epochs: int = TRAIN_DEFAULTS["epochs"],
    out: str | None = None,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
    label_smoothing: float = TRAIN_DEFAULTS["label_smoothing"],
    max_shift: int = TRAIN_DEFAULTS["max_shift"],
    width: int = 32,
    feature_dim: int = 64,
) -> tuple[DigitsCNN, dict]:
    """Train a DigitsCNN with AdamW and a one-cycle learning rate; write it to ``out`` when given.

    Args:
        seed: seed of the one generator behind initialisation, batch order and augmentation.
        epochs: passes over the 1,437 training images.
        out: folder for ``model.safetensors`` and ``config.json`` (arch, seed, command, test accuracy).
        batch_size: images per step (the last incomplete batch of an epoch is dropped).
        lr: peak AdamW learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        max_shift: augmentation, random integer shifts of up to this many pixels.
        width: channels of the first conv pair (the second pair has twice as many).
        feature_dim: size of the penultimate (feature) layer.
    """
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_split("train")
    x_train = (x_train + 1) / 2  # the classifier takes [0, 1]
    model = DigitsCNN(width=width, feature_dim=feature_dim).reset_parameters(g)
    fit(model, x_train, y_train, g, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        label_smoothing=label_smoothing, augment=lambda xb, g: random_shift(xb, max_shift, g))
    train_seconds = time.perf_counter() - start

    x_test, y_test = digits_split("test")
    x_test = (x_test + 1) / 2
    test_acc = accuracy(model, x_test, y_test)
    with torch.no_grad():  # the FID floor of this feature space: train split vs test split
        fid_floor = frechet_distance(model.features(x_train).double(), model.features(x_test).double())
    info = dict(
        arch=model.arch,
        architecture="DigitsCNN: [conv3x3 w, GELU] x2, maxpool2, [conv3x3 2w, GELU] x2, maxpool2, "
        "linear(8w -> feature_dim), GELU (features), linear(feature_dim -> 10)",
        input="(B, 1, 8, 8) images in [0, 1], 0 = background (digits_split images x mapped by (x + 1) / 2)",
        num_parameters=sum(p.numel() for p in model.parameters()),
        seed=seed,
        train=dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                   label_smoothing=label_smoothing, max_shift=max_shift, optimizer="AdamW + OneCycleLR"),
        data=dict(split_seed=DIGITS_SPLIT_SEED, test_fraction=DIGITS_TEST_FRACTION,
                  n_train=len(y_train), n_test=len(y_test)),
        train_accuracy=accuracy(model, x_train, y_train),
        test_accuracy=test_acc,
        test_errors=int(round((1 - test_acc) * len(y_test))),
        fid_train_vs_test=fid_floor,
        train_seconds=round(train_seconds, 1),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    if out is not None:
        save(model, info, out, "classifier", f"train_digits_classifier(seed={seed}, epochs={epochs}, out={out!r})")
    return model, info


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    # One thread: tiny convolutions gain nothing from more, and a fixed count keeps the reductions reproducible.
    torch.set_num_threads(1)
    _, info = CLI(train_digits_classifier, args=args)
    print(f"test accuracy {info['test_accuracy']:.4f} ({info['test_errors']} errors), "
          f"{info['num_parameters']} parameters, {info['train_seconds']} s")


if __name__ == "__main__":
    main()
