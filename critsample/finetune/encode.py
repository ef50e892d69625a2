"""Encode an image folder once with a model's VAE and store latents for ``LatentsDataModule`` (as fast-DiT does).

    python -m critsample.finetune.encode --model dit-xl --images /data/imagenet/train --out latents.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from ..models import load
from ..store import atomic_write
from .data import ImageFolderDataset


@torch.no_grad()
def encode_folder(model_name: str, images: str, out: str, resolution: int | None = None, batch_size: int = 32,
                  device: str = "cpu", seed: int = 0, class_index: str | None = None) -> int:
    """Write ``{"latents", "labels", "model", "resolution"}`` to ``out``; returns the number of images."""
    model = load(model_name, device=device)
    if getattr(model, "vae", None) is None:
        raise UserError(f"{model_name} has no VAE: it trains in pixel space, use its own DataModule.")
    res = resolution or model.sample_shape[-1] * 8
    data = ImageFolderDataset(images, res, class_index)
    g = torch.Generator(device=device).manual_seed(seed)
    latents, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1)):
        latents.append(model.encode(x.to(device), generator=g).cpu().half())
        labels.append(y)
    blob = {"latents": torch.cat(latents), "labels": torch.cat(labels), "model": model_name, "resolution": res}
    atomic_write(out, lambda f: torch.save(blob, f))
    return len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-xl")
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--class-index", default=None)
    a = ap.parse_args()
    try:
        n = encode_folder(a.model, a.images, a.out, a.resolution, a.batch_size, a.device, class_index=a.class_index)
    except ValueError as e:
        print(f"critsample encode: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"encoded {n} images to {a.out}")


if __name__ == "__main__":
    main()
