"""Model registry: a name (or a local diffusers folder) -> a :class:`~critsample.denoisers.Denoiser`.

Downloads happen only here, through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` apply).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from ..denoisers import Denoiser
from ..errors import UserError
from .flux import load_flux
from .loaders import load_dit
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
        ModelSpec("sd3-medium", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "SD3-medium (gated), 1024 px"),
        ModelSpec("pixart-alpha", "pixart", "PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha XL/2, 1024 px, T5 text, with its VAE"),
        ModelSpec("pixart-sigma", "pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArt-Sigma XL/2, 1024 px, T5 text, with its VAE"),
        ModelSpec("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell", "FLUX.1-schnell, 1024 px, 1-4 steps, no guidance input"),
        ModelSpec("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", "FLUX.1-dev (gated), 1024 px, guidance-distilled (3.5)"),
        ModelSpec("dit-digits", "dit", "package", "bundled class-conditional DiT on scikit-learn digits, 8x8 pixels"),
    ]
}

# Subfolders each family needs; nothing else is fetched.
_PATTERNS = {
    "dit": ["model_index.json", "transformer/*", "vae/*", "scheduler/*"],
    "sd3": ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "text_encoder*/*", "tokenizer*/*"],
    # Not the single-file checkpoints (flux1-*.safetensors, ~24 GB) at the FLUX repos' roots.
    "flux": ["model_index.json", "transformer/*", "vae/*", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"],
    # Configs and safetensors only (critsample reads no pickles): pickled copies of T5 would add ~19 GB.
    "pixart": ["model_index.json", "scheduler/*", "tokenizer/*"]
    + [f"{part}/*.{ext}" for part in ("transformer", "vae", "text_encoder") for ext in ("json", "safetensors")],
}


def bundled_path(name: str) -> Path:
    """Folder of a model shipped inside the package."""
    return Path(str(resources.files("critsample") / "assets" / name))


def fetch(spec: ModelSpec) -> Path:
    """Local folder of a registry model: the Hugging Face cache, or a download when the network allows it."""
    if spec.source == "package":
        path = bundled_path(spec.name)
        if not (path / "transformer" / "config.json").exists():
            raise UserError(f"The bundled weights of {spec.name} are missing from {path}; reinstall critsample or run `critsample fit --config configs/fit/dit-digits.yaml`.")
        return path

    try:
        return Path(snapshot_download(spec.source, allow_patterns=_PATTERNS[spec.family]))
    except Exception as e:  # offline, gated, or not found: one sentence with the fix
        raise UserError(
            f"Weights of {spec.name} ({spec.source}) are not available here ({type(e).__name__}); fetch them with "
            f"`hf download {spec.source}` (older huggingface_hub: `huggingface-cli download {spec.source}`) (accept the licence on the Hub first if it is gated) "
            f"or pass a local diffusers folder with `--model /path/to/folder`."
        ) from None


def family_of(folder: Path) -> str:
    """'dit', 'sd3', 'pixart' or 'flux' from a diffusers pipeline folder (model_index.json) or a bare transformer folder."""
    index = folder / "model_index.json"
    if index.exists():
        cls = json.loads(index.read_text()).get("_class_name", "")
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
            cls = json.loads(cfg.read_text()).get("_class_name", "")
            if cls.startswith("SD3"):
                return "sd3"
            if cls == "PixArtTransformer2DModel":
                return "pixart"
            if cls in ("DiTTransformer2DModel", "Transformer2DModel"):
                return "dit"
            if cls == "FluxTransformer2DModel":
                return "flux"
    raise UserError(f"{folder} is not a diffusers DiT, SD3, PixArt or FLUX folder (no model_index.json or transformer/config.json naming one).")


def load(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> Denoiser:
    """Load a denoiser by registry name (``dit-xl``, ``dit-xl-512``, ``sd3-medium``, ``pixart-alpha``, ``pixart-sigma``, ``flux-schnell``, ``flux-dev``, ``dit-digits``, ``gmm-...``) or
    from a local diffusers folder. ``kwargs`` go to the family's loader (e.g. ``guide_channels=3`` for DiT)."""
    name = str(name_or_path)
    if name.startswith("gmm"):
        return load_oracle(name, **kwargs).to(device)
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
    return model.to(device).eval()
