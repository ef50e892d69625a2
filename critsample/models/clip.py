"""CLIP for judging text-to-image samples: image-text agreement (CLIP score) and image embeddings (for an FD).

``openai/clip-vit-large-patch14`` (transformers ``CLIPModel``) from the Hugging Face cache, fetched only through
:func:`critsample.models.hub.fetch_snapshot` (safetensors weights; announced; ``HF_HUB_OFFLINE`` honoured), or any
local ``CLIPModel`` folder written with ``save_pretrained`` next to its tokenizer and ``preprocessor_config.json``.
The image processor's steps are redone in torch on the input's device: grey -> RGB, shortest edge to the crop size
(bicubic, antialiased), centre crop, ``(x - image_mean) / image_std``.

The CLIP score of an image and its prompt is torchmetrics' ``CLIPScore`` per sample, divided by 100:
``max(cos(image_embeds, text_embeds), 0)`` (Hessel et al. 2021 use 2.5 x that; torchmetrics 100 x).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .hub import fetch_snapshot

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json",
              "vocab.json", "merges.txt", "special_tokens_map.json"]  # no pickled weights
CLIP_REQUIRED = ("config.json", "preprocessor_config.json", "model.safetensors")  # and a tokenizer: TOKENIZER_FILES
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either (transformers 5 writes only tokenizer.json)


class ClipScorer(nn.Module):
    """A ``CLIPModel`` behind [0, 1] images and prompt strings."""

    def __init__(self, model: nn.Module, tokenizer, processor_config: dict, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        crop = processor_config.get("crop_size", model.config.vision_config.image_size)
        self.size = int(crop["height"] if isinstance(crop, dict) else crop)
        self.register_buffer("mean", torch.tensor(processor_config.get("image_mean", [0.5] * 3)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(processor_config.get("image_std", [0.5] * 3)).view(1, -1, 1, 1))
        self.num_features = int(model.config.projection_dim)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> pixel_values (B, 3, S, S)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = self.size
        hw = (max(s, round(h * s / min(h, w))), max(s, round(w * s / min(h, w))))
        x = F.interpolate(x.float(), size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        return (x[..., top : top + s, left : left + s] - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim) image embeddings (not normalised): the FD features."""
        out = self.model.get_image_features(pixel_values=self.preprocess(x.to(self.mean.device)))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.mean.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def score(self, image_embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) CLIP score / 100 of each image embedding with its prompt: max(cosine, 0)."""
        text = self.text_embeds(prompts).to(image_embeds)
        return F.cosine_similarity(image_embeds, text, dim=-1).clamp_min(0)


def load_clip(folder: str | Path | None = None, device: str | torch.device = "cpu",
              alternative: str = "pass a local CLIPModel folder with --judge_weights, or your own judge with "
                                 "--judge module.path:factory") -> ClipScorer:
    """:class:`ClipScorer` of a local folder, else of :data:`CLIP_REPO` from the cache (or downloaded, announced)."""
    try:
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError as e:
        raise UserError(f"The CLIP judge needs transformers ({e.name} is missing): `pip install "
                        "transformers`.") from None
    if folder is not None:
        folder = Path(folder)
        missing = [f for f in CLIP_REQUIRED if not (folder / f).exists()]
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            missing.append(" or ".join(TOKENIZER_FILES))
        if missing:
            raise UserError(f"The CLIP folder {folder} lacks {', '.join(missing)}; write it with "
                            "`CLIPModel.save_pretrained`, `CLIPTokenizer.save_pretrained` and "
                            f"`CLIPImageProcessor.save_pretrained` (or fetch one with `hf download {CLIP_REPO}`).")
        name = str(folder)
    else:
        folder = fetch_snapshot(CLIP_REPO, CLIP_FILES, what="Weights of the CLIP judge",
                                required=(*CLIP_REQUIRED, "vocab.json"), alternative=alternative)
        name = CLIP_REPO
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"The CLIP model in {folder} does not load ({type(e).__name__}: {e}); fetch it again with "
                        f"`hf download {CLIP_REPO}` or pass another folder with --judge_weights.") from None
    return ClipScorer(model, tokenizer, json.loads((folder / "preprocessor_config.json").read_text()), name).to(device)
