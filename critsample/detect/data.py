"""What a detection measures with: its clean data (the model's dataset, a user's ``--data``, or an oracle's exact
samples) and its classifier (``--classifier``, or the one of the model's declared dataset). Only the model's declared
``family`` and ``dataset`` decide the defaults (``Denoiser.family``, ``Denoiser.dataset``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..datasets import digits_split, fashion_mnist
from ..denoisers import Denoiser
from ..errors import UserError
from ..models.classifiers import load_classifier
from ..probes.rows import class_rows
from ..store import stable_hash, unit_generator
from ..tensorfiles import SUFFIXES, check_labels, check_samples, load_tensors

if TYPE_CHECKING:
    from .config import DetectConfig


def classifier_name(cfg: DetectConfig, model: Denoiser) -> str:
    """The classifier a detection scores images with: --classifier, else the one of the model's declared dataset."""
    if cfg.classifier:
        return cfg.classifier
    if model.family == "oracle":
        return "oracle-bayes"
    if model.dataset in ("digits", "fashion-mnist"):
        return model.dataset
    if (model.num_classes or 0) == 1000 or model.num_classes is None:
        return "resnet-50"
    raise UserError(f"No default classifier for {model.name}; pass --classifier digits, fashion-mnist, resnet-50 or "
                    "module.path:callable.")


class OracleClassifier(torch.nn.Module):
    """The oracle's exact Bayes classifier of clean data, with the pixels as FID features."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        self.num_classes = 2
        self.num_features = oracle.d

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        x0 = self.oracle.encode(images)
        return self.oracle.posterior(x0, torch.zeros(x0.shape[0])).log()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle.encode(images).reshape(images.shape[0], -1).double()


def load_classifier_for(cfg: DetectConfig, model: Denoiser, device) -> torch.nn.Module:
    name = classifier_name(cfg, model)
    if name == "oracle-bayes":
        return OracleClassifier(model)
    return load_classifier(name, device)


def load_data(cfg: DetectConfig, model: Denoiser, n: int, device, class_id: int | None) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor | None]:
    """n clean samples in model space (+ labels): --data, the digits test split, the 2,000 Fashion-MNIST test images
    bundled in the package (the same with or without Debian's full set, so detections do not depend on it), or an
    oracle's exact samples."""
    if cfg.data:
        return _load_user_data(Path(cfg.data), model, n, device, class_id)
    if model.family == "oracle":
        g = unit_generator(stable_hash({"data": model.name, "seed": cfg.seed}))
        y = class_rows(model, n, class_id)
        return model.sample_data(n, y, generator=g).to(device), y
    if model.dataset in ("digits", "fashion-mnist"):
        x, y = digits_split("test") if model.dataset == "digits" else fashion_mnist("test-2000")
        if class_id is not None:
            keep = y == class_id
            x, y = x[keep], y[keep]
        return model.encode((x + 1) / 2).to(device), y
    raise UserError(f"{model.name} has no default dataset: pass --data with an image folder or a .pt/.npz of latents "
                    "(or use --fb.source generated and no train trajectory).")


def _load_user_data(path: Path, model: Denoiser, n: int, device, class_id) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not path.exists():
        raise UserError(f"--data {path} does not exist; give an image folder or a .pt/.npz file.")
    labels = None
    if path.is_file():  # validated here, once (critsample.tensorfiles): one sentence naming the file for any problem
        obj = load_tensors(path)
        if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
            obj = {"latents": obj}
        if not isinstance(obj, dict):
            raise UserError(f"--data {path} holds a {type(obj).__name__}; store a tensor or a dict with 'latents' or "
                            "'images' (and optional 'labels').")
        kind = "latents" if "latents" in obj else "images" if "images" in obj else None
        if kind is None:
            raise UserError(f"--data {path} has neither 'latents' nor 'images' (it has "
                            f"{', '.join(map(repr, obj)) or 'nothing'}); store one of them (and optional 'labels').")
        x = check_samples(obj[kind], path, kind=kind)
        if obj.get("labels") is not None:
            labels = check_labels(obj["labels"], x.shape[0], path, num_classes=model.num_classes)
        x = x[:n].float() if kind == "latents" else _encode(model, x[:n].float(), device)
    elif not path.is_dir():
        raise UserError(f"--data {path} is neither a file ({', '.join(SUFFIXES)}) nor an image folder.")
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))[:n]
        if not files:
            raise UserError(f"No images (.png, .jpg, .jpeg, .webp, .bmp) in {path}.")
        vae = getattr(model, "vae", None)  # latent models: the VAE's downsampling factor, 2^(levels - 1)
        size = model.sample_shape[-1] * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
        imgs = []
        for f in files:
            im = Image.open(f).convert("RGB" if model.sample_shape[0] != 1 or getattr(model, "vae",
                                                                                      None) is not None else "L")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            imgs.append(torch.from_numpy(arr).reshape(size, size, -1).permute(2, 0, 1))
        x = _encode(model, torch.stack(imgs), device)
    if tuple(x.shape[1:]) != tuple(model.sample_shape):
        raise UserError(f"--data gives samples of shape {tuple(x.shape[1:])} but {model.name} takes "
                        f"{tuple(model.sample_shape)}.")
    if labels is None and class_id is not None:
        labels = torch.full((x.shape[0],), class_id, dtype=torch.long)
    return x.to(device), (labels[: x.shape[0]] if labels is not None else None)


def _encode(model: Denoiser, images: torch.Tensor, device) -> torch.Tensor:
    g = unit_generator(stable_hash({"encode": model.name}), device)
    out = [model.encode(images[i : i + 16].to(device), generator=g) for i in range(0, images.shape[0], 16)]
    return torch.cat(out).float()
