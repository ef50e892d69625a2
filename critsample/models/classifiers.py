"""Image classifiers for the probes (forward-backward error, class histograms) and for FID features.

Every classifier here maps images in [0, 1], shape (B, C, H, W), to logits with ``predict_logits`` and to its
penultimate-layer features (B, d) with ``features``; ``num_features`` = d and ``num_classes`` say the sizes.

- ``digits``: :class:`DigitsCNN`, shipped in ``critsample/assets/digits-classifier/`` (trained by
  ``python -m critsample.finetune.classifier``; its ``config.json`` records command, seed and test accuracy).
- ``fashion-mnist``: :class:`FashionCNN`, shipped in ``critsample/assets/fashion-classifier/`` (trained by
  ``python -m critsample.finetune.fashion_classifier``; its ``config.json`` records command, seed and test accuracy).
- ``resnet-50``: ``microsoft/resnet-50`` through transformers, with its image processor's resize, crop and
  normalisation redone in torch (differentiable, on the input's device). Fetched only through
  :func:`critsample.models.hub.fetch_snapshot` (safetensors weights; announced; ``HF_HUB_OFFLINE`` honoured).
- ``module.path:callable``: a user callable returning an ``nn.Module`` that maps [0, 1] images to logits.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import bundled_path
from .hub import fetch_snapshot

DIGITS_CLASSIFIER = "digits-classifier"  # asset folder
FASHION_CLASSIFIER = "fashion-classifier"  # asset folder
CLASSIFIERS = {"digits": "package", "fashion-mnist": "package", "resnet-50": "microsoft/resnet-50"}


class _SmallCNN(nn.Module):
    """What the bundled dataset CNNs share: a ``trunk`` ending in the GELU feature layer and a linear ``head``."""

    def _finish(self, trunk: nn.Sequential, width: int, feature_dim: int, num_classes: int) -> None:
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, num_classes)
        self.arch = dict(width=width, feature_dim=feature_dim, num_classes=num_classes)
        self.num_features = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> penultimate features (B, feature_dim)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    predict_logits = forward

    def reset_parameters(self, generator: torch.Generator) -> _SmallCNN:
        """PyTorch's default Conv/Linear initialisation, drawn from ``generator`` instead of the global RNG."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        return self


class DigitsCNN(_SmallCNN):
    """Small CNN for 8 x 8 digits. Input (B, 1, 8, 8) in [0, 1] (0 = background); output logits (B, num_classes).

    Two 3 x 3 conv pairs with 2 x 2 max-pooling (8 -> 4 -> 2), then a GELU hidden layer of ``feature_dim`` units
    (the penultimate features) and a linear head. GELU keeps the features free of exact zeros, so their covariance
    (FID) is well conditioned.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self._finish(nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, w, 4, 4)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, 2w, 2, 2)
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim), nn.GELU(),
        ), width, feature_dim, num_classes)


def _load_bundled_cnn(cls: type[_SmallCNN], asset: str, what: str, trainer: str, device) -> _SmallCNN:
    """A shipped classifier (``model.safetensors`` + ``config.json`` in the asset folder) in eval mode (parameters
    frozen; input gradients still flow); a missing file names the trainer that writes it."""
    from safetensors.torch import load_file

    folder = bundled_path(asset)
    if not (folder / "model.safetensors").exists():
        raise UserError(
            f"The bundled {what} classifier is missing from {folder}; reinstall critsample or run "
            f"`python -m {trainer} --out {folder}`."
        )
    cfg = json.loads((folder / "config.json").read_text())
    model = cls(**cfg["arch"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.config = cfg
    return model.to(device).eval().requires_grad_(False)


def load_digits_classifier(device: str | torch.device = "cpu") -> DigitsCNN:
    """The shipped digits classifier in eval mode (parameters frozen; input gradients still flow)."""
    return _load_bundled_cnn(DigitsCNN, DIGITS_CLASSIFIER, "digits", "critsample.finetune.classifier", device)


class FashionCNN(_SmallCNN):
    """CNN for Fashion-MNIST padded to 32 x 32. Input (B, 1, 32, 32) in [0, 1] (0 = background); output logits.

    Three stages of 3 x 3 convolutions (two of ``width``, two of 2 ``width``, one of 4 ``width`` channels), each
    followed by 2 x 2 max-pooling (32 -> 16 -> 8 -> 4), then a GELU hidden layer of ``feature_dim`` units (the
    penultimate features, for FD) and a linear head. GELU everywhere (no exact zeros in the features; smooth input
    gradients for the probes); no batch norm, so train and eval modes compute the same function.
    """

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        w = width
        self._finish(nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, w, 16, 16)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, 4w, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * w, feature_dim), nn.GELU(),
        ), width, feature_dim, num_classes)


def load_fashion_classifier(device: str | torch.device = "cpu") -> FashionCNN:
    """The shipped Fashion-MNIST classifier in eval mode (parameters frozen; input gradients still flow)."""
    return _load_bundled_cnn(FashionCNN, FASHION_CLASSIFIER, "Fashion-MNIST", "critsample.finetune.fashion_classifier",
                             device)


class HFImageClassifier(nn.Module):
    """A transformers image classifier behind [0, 1] inputs.

    The processor's steps, in torch: grey -> RGB, resize (shortest edge to ``shortest_edge / crop_pct`` then
    centre crop, as ConvNextImageProcessor does below 384 px; or straight to height x width), then
    ``(x - image_mean) / image_std``.
    """

    def __init__(self, model: nn.Module, processor_config: dict, repo_id: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.repo_id = repo_id
        size = processor_config.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        self.size = size
        self.crop_pct = processor_config.get("crop_pct")
        self.interpolation = {2: "bilinear", 3: "bicubic"}.get(processor_config.get("resample", 2), "bilinear")
        self.register_buffer("mean", torch.tensor(processor_config.get("image_mean", [0.5] * 3)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(processor_config.get("image_std", [0.5] * 3)).view(1, -1, 1, 1))
        cfg = model.config
        self.num_classes = int(cfg.num_labels)
        self.num_features = int(cfg.hidden_sizes[-1] if hasattr(cfg, "hidden_sizes") else cfg.hidden_size)

    def _resize(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=hw, mode=self.interpolation, align_corners=False, antialias=True)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> normalised pixel_values (B, 3, S, S)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            if self.crop_pct and s < 384:  # ConvNextImageProcessor: short edge to s / crop_pct, centre crop s x s
                h, w = x.shape[-2:]
                edge = int(s / self.crop_pct)
                x = self._resize(x, (max(edge, round(h * edge / min(h, w))), max(edge, round(w * edge / min(h, w)))))
                top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
                x = x[..., top : top + s, left : left + s]
            else:
                x = self._resize(x, (s, s))
        else:
            x = self._resize(x, (self.size["height"], self.size["width"]))
        return (x - self.mean) / self.std

    def _pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(pixel_values)
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else out.last_hidden_state[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pooled(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(x)).logits

    predict_logits = forward


HF_CLASSIFIER_FILES = ["config.json", "preprocessor_config.json", "model.safetensors"]  # no pickled weights


def load_hf_classifier(repo_id: str, device: str | torch.device = "cpu", folder: str | Path | None = None,
                       alternative: str = "use a local classifier as `--classifier module.path:callable`"
                       ) -> HFImageClassifier:
    """A transformers image classifier from ``folder`` (a local ``save_pretrained`` folder with its
    ``preprocessor_config.json``) or the Hugging Face cache, downloaded (announced, one try) unless ``HF_HUB_OFFLINE``
    is set (:func:`critsample.models.hub.fetch_snapshot`); ``alternative`` ends the missing-weights sentence."""
    try:
        from transformers import AutoModelForImageClassification
    except ImportError as e:
        raise UserError(f"The {repo_id} classifier needs transformers ({e.name} is missing): `pip install "
                        "transformers`.") from None
    if folder is not None:
        folder = Path(folder)
        missing = [f for f in HF_CLASSIFIER_FILES if not (folder / f).exists()]
        if missing:
            raise UserError(f"The classifier folder {folder} lacks {', '.join(missing)}; write it with "
                            "`model.save_pretrained(folder)` and `processor.save_pretrained(folder)`.")
    else:
        folder = fetch_snapshot(repo_id, HF_CLASSIFIER_FILES, what="Weights of the image classifier",
                                required=tuple(HF_CLASSIFIER_FILES), alternative=alternative)
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as e:
        raise UserError(f"The classifier {repo_id} in {folder} does not load ({type(e).__name__}); delete that folder "
                        f"and fetch it again with `hf download {repo_id}`.") from None
    return HFImageClassifier(model, json.loads((folder / "preprocessor_config.json").read_text()), repo_id).to(device)


class ImportedClassifier(nn.Module):
    """A user ``nn.Module`` mapping [0, 1] images to logits. ``features`` uses the module's own ``features``
    method when it has one, else the input of its last ``nn.Linear`` (the usual penultimate layer)."""

    def __init__(self, module: nn.Module, path: str):
        super().__init__()
        self.module = module.eval()
        self.path = path
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        self._last_linear = linears[-1] if linears else None
        self.num_classes = self._last_linear.out_features if self._last_linear is not None else None
        self.num_features = getattr(module, "num_features", None) or (
            self._last_linear.in_features if self._last_linear is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    predict_logits = forward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if callable(getattr(self.module, "features", None)):
            return self.module.features(x)
        if self._last_linear is None:
            raise UserError(f"{self.path} has no `features` method and no nn.Linear layer whose input could serve as "
                            "features.")
        seen = []
        handle = self._last_linear.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            self.module(x)
        finally:
            handle.remove()
        return seen[-1].flatten(1)


def import_object(path: str, label: str, malformed: str):
    """The object ``package.module:attr`` names (dots after the colon reach attributes); user errors are one sentence
    naming ``label`` (``classifier``, ``--judge``), and ``malformed`` is the sentence for a path without that form."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(malformed)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"Cannot import module {module_name!r} of {label} {path!r}: {e}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"Module {module_name!r} has no attribute {attr!r} ({label} {path!r}).")
        obj = getattr(obj, part)
    return obj


def import_classifier(path: str) -> ImportedClassifier:
    """``package.module:callable`` (dots after the colon reach attributes) -> the callable's ``nn.Module``."""
    obj = import_object(path, "classifier", f"Classifier {path!r} is not a known name ({', '.join(CLASSIFIERS)}) or "
                        "an import path 'module.path:callable'.")
    if not callable(obj):
        raise UserError(f"{path!r} is not callable; it should return an nn.Module mapping [0, 1] images to logits.")
    try:
        module = obj()
    except Exception as e:
        raise UserError(f"Calling {path!r} failed ({type(e).__name__}: {e}); it should take no arguments and return an "
                        "nn.Module.") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{path!r} returned a {type(module).__name__}, not an nn.Module mapping [0, 1] images to "
                        "logits.")
    return ImportedClassifier(module, path)


def load_classifier(name_or_import_path: str, device: str | torch.device = "cpu") -> nn.Module:
    """``digits`` or ``fashion-mnist`` (bundled), ``resnet-50`` (microsoft/resnet-50), or ``module.path:callable``.

    The result is an ``nn.Module`` in eval mode: ``clf(x)`` and ``clf.predict_logits(x)`` give logits of images in
    [0, 1], ``clf.features(x)`` the penultimate features (B, ``clf.num_features``).
    """
    name = str(name_or_import_path)
    if name == "digits":
        return load_digits_classifier(device)
    if name == "fashion-mnist":
        return load_fashion_classifier(device)
    if name in CLASSIFIERS:
        return load_hf_classifier(CLASSIFIERS[name], device)
    return import_classifier(name).to(device)
