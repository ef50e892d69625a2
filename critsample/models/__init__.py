"""Model registry: a name (or a local diffusers folder) -> a :class:`~critsample.denoisers.Denoiser`.

Downloads happen only through :func:`critsample.models.hub.fetch_snapshot` (the Hugging Face cache, ``HF_HUB_OFFLINE``
and ``HF_TOKEN`` apply; what is fetched and its size are printed before fetching).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..denoisers import Denoiser
from ..errors import UserError
from ..store import record_weight_files
from .flux import load_flux
from .hub import fetch_snapshot
from .loaders import load_dit, read_json, trusting_pickled_weights
from .oracles import load_oracle
from .pixart import load_pixart
from .sd3 import load_sd3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "dit" | "sd3" | "pixart" | "flux" | "oracle"
    source: str  # Hugging Face repo id, or "package" for bundled weights
    about: str


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("dit-xl", "dit", "facebook/DiT-XL-2-256", "DiT-XL/2 at 256 px, ImageNet classes, with its VAE"),
        ModelSpec("dit-xl-512", "dit", "facebook/DiT-XL-2-512", "DiT-XL/2 at 512 px, ImageNet classes, with its VAE"),
        ModelSpec("sd3-medium", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers",
                  "SD3-medium (gated), 1024 px"),
        ModelSpec("pixart-alpha", "pixart", "PixArt-alpha/PixArt-XL-2-1024-MS",
                  "PixArt-alpha XL/2, 1024 px, T5 text, with its VAE"),
        ModelSpec("pixart-sigma", "pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                  "PixArt-Sigma XL/2, 1024 px, T5 text, with its VAE"),
        ModelSpec("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell",
                  "FLUX.1-schnell, 1024 px, 1-4 steps, no guidance input"),
        ModelSpec("flux-dev", "flux", "black-forest-labs/FLUX.1-dev",
                  "FLUX.1-dev (gated), 1024 px, guidance-distilled (3.5)"),
        ModelSpec("dit-digits", "dit", "package", "bundled class-conditional DiT on scikit-learn digits, 8x8 pixels"),
        ModelSpec("dit-fashion", "dit", "package",
                  "bundled class-conditional DiT on Fashion-MNIST, 32x32 pixels, patch 2 (16x16 tokens)"),
    ]
}

# Subfolders each family needs; nothing else is fetched.
_PATTERNS = {
    "dit": ["model_index.json", "transformer/*", "vae/*", "scheduler/*"],
    "sd3": ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "text_encoder*/*", "tokenizer*/*"],
    # Not the single-file checkpoints (flux1-*.safetensors, ~24 GB) at the FLUX repos' roots.
    "flux": ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "text_encoder/*", "text_encoder_2/*",
             "tokenizer/*", "tokenizer_2/*"],
    # Configs and safetensors only (critsample reads no pickles): pickled copies of T5 would add ~19 GB.
    "pixart": ["model_index.json", "scheduler/*", "tokenizer/*"]
    + [f"{part}/*.{ext}" for part in ("transformer", "vae", "text_encoder") for ext in ("json", "safetensors")],
}


def bundled_path(name: str) -> Path:
    """Folder of a model shipped inside the package."""
    return Path(str(resources.files("critsample") / "assets" / name))


def shipped_summary(name: str) -> Path | None:
    """The ``summary.json`` shipped for a bundled model (``assets/windows/NAME``): its windows from
    ``critsample detect`` and the plan ``critsample tune`` certified, made by the commands in the folder's
    ``record.json``; None for every other model. Kept apart from the weights' folder, whose files make the model's
    fingerprint."""
    spec = REGISTRY.get(name)
    if spec is None or spec.source != "package":
        return None
    path = Path(str(resources.files("critsample") / "assets" / "windows" / name / "summary.json"))
    return path if path.exists() else None


def fetch(spec: ModelSpec) -> Path:
    """Local folder of a registry model: the Hugging Face cache (no network), or an announced download (one try)
    unless ``HF_HUB_OFFLINE`` is set; a UserError sentence when neither works."""
    if spec.source == "package":
        path = bundled_path(spec.name)
        if not (path / "transformer" / "config.json").exists():
            raise UserError(f"The bundled weights of {spec.name} are missing from {path}; reinstall critsample or run "
                            "`critsample fit --config configs/fit/dit-digits.yaml`.")
        return path

    return fetch_snapshot(
        spec.source, _PATTERNS[spec.family], what=f"Weights of {spec.name}", required=("model_index.json",),
        alternative="pass a local diffusers folder with `--model /path/to/folder`",
    )


def family_of(folder: Path) -> str:
    """'dit', 'sd3', 'pixart' or 'flux' from a diffusers pipeline folder (model_index.json) or a bare transformer
    folder."""
    index = folder / "model_index.json"
    if index.exists():
        cls = read_json(index).get("_class_name", "")
        if "StableDiffusion3" in cls:
            return "sd3"
        if cls in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
            return "pixart"
        if "DiT" in cls:
            return "dit"
        if cls == "FluxPipeline":
            return "flux"
    for cfg in (folder / "transformer" / "config.json", folder / "config.json"):
        if cfg.exists():
            cls = read_json(cfg).get("_class_name", "")
            if cls.startswith("SD3"):
                return "sd3"
            if cls == "PixArtTransformer2DModel":
                return "pixart"
            if cls in ("DiTTransformer2DModel", "Transformer2DModel"):
                return "dit"
            if cls == "FluxTransformer2DModel":
                return "flux"
    raise UserError(f"{folder} is not a diffusers DiT, SD3, PixArt or FLUX folder (no model_index.json or "
                    "transformer/config.json naming one).")


def load(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
         trust_pickled_weights: bool = False, **kwargs) -> Denoiser:
    """Load a denoiser by registry name (``dit-xl``, ``dit-xl-512``, ``sd3-medium``, ``pixart-alpha``, ``pixart-sigma``,
    ``flux-schnell``, ``flux-dev``, ``dit-digits``, ``dit-fashion``, ``gmm-...``) or from a local diffusers folder.
    Weights are read from safetensors only; ``trust_pickled_weights`` also accepts pickled ``*.bin`` weights (only for
    files you trust: unpickling can run code). ``kwargs`` go to the family's loader (e.g. ``guide_channels=3``
    for DiT)."""
    with trusting_pickled_weights(trust_pickled_weights):
        model, folder = _load(str(name_or_path), device, dtype, **kwargs)
    if folder is not None and not trust_pickled_weights:  # every weight came from the folder's safetensors
        record_weight_files(model, folder)
    return model


def _load(name: str, device, dtype, **kwargs) -> tuple[Denoiser, Path | None]:
    if name.startswith("gmm"):
        return load_oracle(name, **kwargs).to(device), None
    if name in REGISTRY:
        spec = REGISTRY[name]
        folder, family = fetch(spec), spec.family
    else:
        folder = Path(name).expanduser()
        if not folder.exists():
            known = ", ".join([*REGISTRY, "gmm-..."])
            raise UserError(f"Unknown model {name!r}: use one of {known}, or a path to a local diffusers folder.")
        family = family_of(folder)
    if family == "dit":
        model = load_dit(folder, name=name, dtype=dtype, **kwargs)
    elif family == "flux":
        model = load_flux(folder, name=name, dtype=dtype, **kwargs)
    elif family == "pixart":
        model = load_pixart(folder, name=name, dtype=dtype, **kwargs)
    else:
        model = load_sd3(folder, name=name, dtype=dtype, **kwargs)
    return model.to(device).eval(), folder
