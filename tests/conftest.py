"""Shared fixtures and helpers: tiny random diffusers pipelines saved to disk, built offline (diffusers-test style),
the tiny digit-shaped DiT and fixed random classifier the probe and CLI tests run on, and the shrunk detect sizes.

Every helper more than one test module uses lives here (test modules never import from each other). The CLI reaches
the tiny classifier by its import path :data:`CLASSIFIER` (``conftest`` is importable: tests/ is on ``sys.path``).

Nothing in the test session may download: ``HF_HUB_OFFLINE`` is set before any Hugging Face library is imported,
and the tokenizers of the tiny SD3 pipeline are built from in-memory vocabularies.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# critsample's weight-digest cache (store._DigestCache) goes to a folder of this session, not the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="critsample-tests-cache-")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import lightning.pytorch  # noqa: E402,F401  (its loggers' StreamHandlers bind sys.stderr at import: before any test captures it)
import pytest  # noqa: E402
import torch  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True  # in case a plugin imported huggingface_hub before this file

# Tiny models: one intra-op thread. On the shared 2-core machine a second thread makes each forward ~500x slower.
torch.set_num_threads(1)

# -- tiny model shapes (one place, so tests can reason about token grids) -----------------------
DIT_LATENT = 8  # latent H = W
DIT_PATCH = 2  # -> 4 x 4 token grid
SD3_LATENT = 8
SD3_PATCH = 2  # -> 4 x 4 token grid at the default size; pos_embed_max_size 16 allows up to 32 x 32 latents
CLIP_LENGTH = 8  # tokenizer.model_max_length of the tiny CLIP tokenizers
T5_LENGTH = 12  # max_sequence_length used with the tiny T5
PIXART_CAPTION = 32  # tiny T5 d_model = PixArt transformer caption_channels
VAE_SCALE = 2  # the tiny VAE has two blocks: 2 image pixels per latent pixel
FLUX_LATENT_CHANNELS = 4  # the tiny FLUX VAE's; the transformer takes 2x2-packed latents: in_channels 16
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611  # FLUX.1's VAE factors

# -- the probe / CLI helpers -----------------------------------------------------------------------
CLASSIFIER = "conftest:tiny_classifier"  # --classifier import path of TinyClassifier
# The fast preset with every size shrunk (seconds on CPU): the CLI overrides are the user's way to do this.
SMALL = [
    "--gaps.steps", "4", "--gaps.samples", "2", "--gaps.batch", "2", "--gaps.radii", "[1, 2]",
    "--fb.num_t", "3", "--fb.samples", "3", "--fb.steps", "4", "--fb.batch", "3", "--fb.radii", "[1]",
    "--windows.steps", "4", "--windows.t0_step", "0.34", "--windows.samples", "3", "--windows.batch", "3",
    "--windows.radii", "[1]",
]


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded ``seed``."""
    return torch.Generator().manual_seed(seed)


def tiny_digit_dit(seed: int = 0, name: str = "tiny-digits"):
    """A random class-conditional DiT on the 8 x 8 digit grid (patch 1, 10 classes), the shape of dit-digits."""
    from diffusers import DiTTransformer2DModel

    from critsample.models.dit import DiTDenoiser
    from critsample.noise import Schedule

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(
        num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=1, in_channels=1,
        out_channels=1, num_embeds_ada_norm=10,
    ).eval()
    return DiTDenoiser(tr, Schedule(), num_classes=10, name=name, dataset="digits").eval()


def save_tiny_digit_dit(folder: Path) -> Path:
    """:func:`tiny_digit_dit` as a local model folder (transformer/ + critsample.json), as ``--model`` takes it."""
    tiny_digit_dit().transformer.save_pretrained(folder / "transformer")
    (folder / "critsample.json").write_text(json.dumps({"num_classes": 10, "dataset": "digits"}))
    return folder


class TinyClassifier(torch.nn.Module):
    """A fixed random classifier of images in [0, 1] of any size and channels (channel mean, pooled to 8 x 8):
    logits over 10 classes, 16 tanh features."""

    def __init__(self):
        super().__init__()
        g = gen(123)
        self.w1 = torch.nn.Parameter(torch.randn(64, 16, generator=g) * 0.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(16, 10, generator=g), requires_grad=False)
        self.num_features = 16

    def features(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8)
        return torch.tanh((x.reshape(x.shape[0], -1) - 0.5) @ self.w1)

    def forward(self, x):
        return self.features(x) @ self.w2

    predict_logits = forward


def tiny_classifier() -> TinyClassifier:  # the CLI's import path: CLASSIFIER
    return TinyClassifier()


def small_config(out, **kw):
    """The fast preset shrunk to seconds, as a DetectConfig: 3 samples, 5 steps, 3 noise levels, 4 window positions."""
    from critsample.detect import DetectConfig, ForwardBackwardArgs, GapArgs, WindowArgs

    cfg = DetectConfig(
        model="tiny", out=str(out), wandb=False, seed=3,
        gaps=GapArgs(steps=5, samples=3, batch=2, radii=[1, 2]),
        fb=ForwardBackwardArgs(num_t=3, t_min=0.2, t_max=0.8, samples=4, steps=5, batch=2, radii=[1]),
        windows=WindowArgs(steps=5, t0_step=0.25, samples=3, batch=3, radii=[1]),
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def tiny_dit_transformer(num_layers: int = 2, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    # num_embeds_ada_norm=1000 because diffusers' DiTPipeline hard-codes the null class 1000.
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=DIT_LATENT, patch_size=DIT_PATCH, num_embeds_ada_norm=1000, norm_num_groups=1,
    ).eval()


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215,
             seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2,
        sample_size=16,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


def tiny_sd3_transformer(num_layers: int = 2, seed: int = 0, **kw):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=SD3_LATENT, patch_size=SD3_PATCH, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=16, pos_embed_max_size=16,
    )
    return SD3Transformer2DModel(**{**cfg, **kw}).eval()


def _tiny_tokenizers():
    """A byte-level CLIP BPE tokenizer and a T5 unigram tokenizer over single letters (no download)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters] + [("\u2581" + c, -3.5) for c in letters]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    return clip, t5


def _tiny_text_encoders(clip_vocab: int, t5_vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    # CLIP hidden 16 + 16 = 32 = T5 d_model = joint_attention_dim; pooled 8 + 8 = 16 = pooled_projection_dim.
    clip_cfg = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=clip_vocab, max_position_embeddings=CLIP_LENGTH, projection_dim=8,
        hidden_act="gelu",
    )
    torch.manual_seed(1)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    torch.manual_seed(3)
    te3 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    return te1, te2, te3


def tiny_pixart_transformer(sample_size: int = 8, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    # learned sigma (out = 2 x in), as the PixArt checkpoints; width 24 = cross_attention_dim (the caption projection
    # maps T5 to the width) and a multiple of 3 (alpha's micro-conditions: 2 thirds resolution, 1 third aspect ratio)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        sample_size=sample_size,
        patch_size=2, cross_attention_dim=24, caption_channels=PIXART_CAPTION, norm_num_groups=1,
    ).eval()


def save_pixart(folder: Path, pipeline_cls: str, sample_size: int) -> Path:
    """A tiny PixArtAlphaPipeline / PixArtSigmaPipeline folder: T5, tiny VAE, DPM-Solver++ (PixArt's integrator)."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler
    from transformers import T5Config, T5EncoderModel

    _, t5_tok = _tiny_tokenizers()
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=PIXART_CAPTION, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    # PixArt's own integrator: DPM-Solver++ over linear betas 1e-4..0.02, eps-prediction
    scheduler = DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    pipe = getattr(diffusers, pipeline_cls)(
        tokenizer=t5_tok, text_encoder=t5, vae=tiny_vae(), transformer=tiny_pixart_transformer(sample_size),
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_flux_transformer(guidance_embeds: bool, seed: int = 0):
    """One double-stream and one single-stream block; RoPE axes 4 + 6 + 6 = head dim 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * FLUX_LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_scheduler(dev: bool):
    """FLUX.1-dev's scheduler config (resolution-dependent shift) or FLUX.1-schnell's (no shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dev:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def save_flux(folder: Path, dev: bool) -> Path:
    """A tiny FluxPipeline folder: CLIP + T5, tiny VAE with FLUX.1's factors, dev (guidance embedding) or schnell."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _tiny_tokenizers()
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, vocab_size=len(clip_tok), max_position_embeddings=8, hidden_act="gelu",
    )).eval()  # pooled 16 = pooled_projection_dim
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()  # d_model 32 = joint_attention_dim
    FluxPipeline(
        scheduler=flux_scheduler(dev),
        vae=tiny_vae(FLUX_LATENT_CHANNELS, shift_factor=FLUX_VAE_SHIFT, scaling_factor=FLUX_VAE_SCALE),
        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(guidance_embeds=dev),
    ).save_pretrained(folder)
    return folder


def save_sd3(folder: Path, **transformer_kw) -> Path:
    """A tiny StableDiffusion3Pipeline folder: MMDiT (``transformer_kw``: e.g. SD3.5's dual attention and qk-norm),
    tiny VAE with shift, FlowMatchEuler, CLIP x2 + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_tok, t5_tok = _tiny_tokenizers()
    te1, te2, te3 = _tiny_text_encoders(len(clip_tok), len(t5_tok))
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(**transformer_kw), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny():
    """The tiny digit-shaped DiT (one per test module: tests may set its attributes)."""
    return tiny_digit_dit()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny digit-shaped DiT saved as a local model folder (read only: tests copy it to change it)."""
    return save_tiny_digit_dit(tmp_path_factory.mktemp("tiny-digit-dit"))


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory) -> Path:
    """A diffusers DiTPipeline folder: tiny learned-sigma DiT (1000 classes), tiny VAE, DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline

    folder = tmp_path_factory.mktemp("tiny-dit")
    scheduler = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=True)
    DiTPipeline(transformer=tiny_dit_transformer(), vae=tiny_vae(), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory) -> Path:
    """A diffusers StableDiffusion3Pipeline folder: tiny MMDiT, tiny VAE with shift, FlowMatchEuler, CLIP x2 + T5."""
    return save_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def sd35_folder(tmp_path_factory) -> Path:
    """The SD3.5 layout of the same pipeline: qk RMS-norm and an image-only ``attn2`` (dual attention) in block 0."""
    return save_sd3(tmp_path_factory.mktemp("tiny-sd35"), dual_attention_layers=(0,), qk_norm="rms_norm")


@pytest.fixture(scope="session")
def pixart_sigma_folder(tmp_path_factory) -> Path:
    """Tiny PixArtSigmaPipeline: 8 x 8 latents, no micro-conditions, 300 T5 tokens."""
    return save_pixart(tmp_path_factory.mktemp("tiny-pixart-sigma"), "PixArtSigmaPipeline", 8)


@pytest.fixture(scope="session")
def pixart_alpha_folder(tmp_path_factory) -> Path:
    """Tiny PixArtAlphaPipeline whose transformer has ``sample_size = 128``, so it takes PixArt-alpha's resolution /
    aspect-ratio micro-conditions (it runs on small latents: the position embedding is recomputed per size)."""
    return save_pixart(tmp_path_factory.mktemp("tiny-pixart-alpha"), "PixArtAlphaPipeline", 128)


@pytest.fixture(scope="session")
def flux_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny FluxPipeline folders: "dev" (guidance-distilled, dynamic shift) and "schnell" (no guidance embedding)."""
    return {k: save_flux(tmp_path_factory.mktemp(f"tiny-flux-{k}"), dev=k == "dev") for k in ("dev", "schnell")}


@pytest.fixture(scope="session")
def dit(dit_folder):
    """The tiny DiT loaded through critsample's registry (fp32, CPU)."""
    import critsample

    return critsample.load(str(dit_folder))


@pytest.fixture(scope="session")
def sd3(sd3_folder):
    """The tiny SD3 loaded through critsample's registry, text encoders included."""
    import critsample

    return critsample.load(str(sd3_folder), max_sequence_length=T5_LENGTH)


# -- tiny random judges, saved and read back through the loaders of the real ones (critsample.judges) ------------------


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random transformers CLIPModel folder as openai/clip-vit-large-patch14 is laid out: safetensors weights,
    the letter tokenizer (vocab.json, merges.txt) and a CLIPImageProcessor config (16 x 16 crops)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _tiny_tokenizers()[0]
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_hidden_layers=1, max_position_embeddings=CLIP_LENGTH, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=4)
    torch.manual_seed(7)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def save_tiny_resnet(folder: Path, num_labels: int = 1000) -> Path:
    """A tiny random ResNetForImageClassification folder laid out as microsoft/resnet-50 (safetensors, ConvNext-style
    preprocessor_config.json with crop_pct), 1000 labels like ImageNet."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(8)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=num_labels)
    ResNetForImageClassification(cfg).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": {"shortest_edge": 16}}))
    return folder


@pytest.fixture(scope="session")
def judge_folders(tmp_path_factory) -> dict[str, Path]:
    """{"clip": tiny CLIPModel folder, "imagenet": tiny ResNet folder}: what --judge_weights points to in tests."""
    return {"clip": save_tiny_clip(tmp_path_factory.mktemp("tiny-clip")),
            "imagenet": save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))}


class TinyInception(torch.nn.Module):
    """Stands in for torchmetrics' InceptionV3 (whose 0.1 GB weights tests cannot fetch): a fixed random map of [0, 1]
    images to 12 features."""

    num_features = 12

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * 16, 12, generator=gen(9)), requires_grad=False)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, 4)
        return torch.tanh(x.flatten(1) @ self.w)


class TinyJudge:
    """A user's judge (``--judge conftest:tiny_judge``) for the class oracles: correctness of the sign of the image
    mean against class 0 / 1 and FD of the flattened image to full guidance's samples (reference None)."""

    name = "tiny-sign"
    score_name = "accuracy"
    binary_rows = True  # correctness: the exact bound of the discordant pairs
    targets = "class"
    reference = None

    def score(self, images, targets):
        from critsample.judges import Scores

        pred = (images.flatten(1).mean(1) > 0.5).long()
        rows = (pred == torch.as_tensor(targets).long()).double().numpy()
        return Scores(rows, images.flatten(1).double())

    def set_reference(self, features):
        from critsample.metrics import FrechetReference

        self.reference = FrechetReference(features)

    def fd(self, features):
        return self.reference(features)


def tiny_judge(model) -> TinyJudge:  # the CLI's import path: conftest:tiny_judge
    assert model.num_classes == 2
    return TinyJudge()
