"""Loading diffusers DiT folders (hub snapshots, user folders, the bundled dit-digits)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ..errors import UserError
from ..noise import Schedule
from .dit import DiTDenoiser


def load_parts(folder: Path, cls, dtype: torch.dtype, label: str, default_scheduler: dict | None = None):
    """(transformer, vae or None, scheduler config) of a pipeline folder or a bare transformer folder, any family."""
    folder = Path(folder)
    sub = folder / "transformer"
    tdir = sub if sub.exists() else folder
    try:
        transformer = cls.from_pretrained(tdir, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load {label} transformer from {tdir}: {str(e).splitlines()[0]}") from None
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype) if (folder / "vae" / "config.json").exists() else None
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.exists() else dict(default_scheduler or {})
    return transformer, vae, sched_cfg


def load_dit(folder: Path, name: str, dtype: torch.dtype = torch.float32, guide_channels: int | None = None) -> DiTDenoiser:
    """A DiT pipeline folder (transformer/, optional vae/, scheduler/) or a bare transformer folder.

    ``facebook/DiT-XL-2-256`` names its transformer ``Transformer2DModel``; ``DiTTransformer2DModel.from_pretrained``
    reads that config as a DiT. A folder without ``vae/`` is a pixel-space model (dit-digits).
    """
    folder = Path(folder)
    transformer, vae, sched_cfg = load_parts(folder, DiTTransformer2DModel, dtype, "a DiT")
    meta_file = folder / "critsample.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    model = DiTDenoiser(
        transformer, Schedule.from_scheduler_config(sched_cfg), vae,
        num_classes=meta.get("num_classes"), guide_channels=guide_channels, name=name, scheduler_config=sched_cfg,
        dataset=meta.get("dataset"),
    )
    model.meta = meta
    model.default_guidance = float(meta.get("default_guidance", model.default_guidance))
    return model
