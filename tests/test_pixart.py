"""PixArt-alpha / Sigma behind the denoiser interface: loading, T5 prompts and their mask against the pipeline, alpha's
micro-conditions, embedding-level use, the FLOPs of dense cross-attention, the CLI on a saved folder, offline registry
names. (Stock equality, r = 0 locality, pipeline equality and counted FLOPs: test_denoiser_contract.py.)

Two tiny random pipelines saved with ``save_pretrained``: a Sigma-style one (8 x 8 latents, no micro-conditions, 300
T5 tokens) and an alpha-style one whose transformer has ``sample_size = 128`` so that it takes PixArt-alpha's
resolution / aspect-ratio micro-conditions (it runs on small latents: the position embedding is recomputed per size).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CLASSIFIER, PIXART_CAPTION, SMALL, VAE_SCALE

import critsample
from critsample import PromptCond, UserError
from critsample.attention import DenseCrossAttnProcessor, WindowAttnProcessor
from critsample.denoisers import cat_rows, tile_rows
from critsample.flops import forward_flops, transformer_shape
from critsample.models import family_of
from critsample.models.pixart import PixArtDenoiser

CAPTION = PIXART_CAPTION


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sigma_folder(pixart_sigma_folder):
    return pixart_sigma_folder


@pytest.fixture(scope="module")
def alpha_folder(pixart_alpha_folder):
    return pixart_alpha_folder


@pytest.fixture(scope="module")
def sigma(sigma_folder):
    return critsample.load(str(sigma_folder))


@pytest.fixture(scope="module")
def alpha(alpha_folder):
    return critsample.load(str(alpha_folder))


def _stock_eps(folder, x, timestep, cond: PromptCond, micro: bool) -> torch.Tensor:
    """The stock diffusers transformer (original processors), called as the PixArt pipelines call it."""
    from diffusers import PixArtTransformer2DModel

    stock = PixArtTransformer2DModel.from_pretrained(folder / "transformer").eval()
    added = {"resolution": None, "aspect_ratio": None}
    if micro:  # PixArtAlphaPipeline: image pixels (height, width) and height / width
        h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        added = {"resolution": torch.tensor([[h, w]] * x.shape[0], dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[h / w]] * x.shape[0], dtype=torch.float32)}
    with torch.no_grad():
        out = stock(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=timestep,
                    added_cond_kwargs=added).sample  # (B, 8, H, W): eps and learned variance
    return out[:, :4]


# -- loading ------------------------------------------------------------------------------------
def test_registry_loads_pixart_folders(sigma, alpha, sigma_folder, alpha_folder):
    assert family_of(sigma_folder) == family_of(alpha_folder) == family_of(sigma_folder / "transformer") == "pixart"
    for m in (sigma, alpha):
        assert isinstance(m, PixArtDenoiser) and m.family == "pixart" and m.is_text
        assert (m.prediction, m.schedule.kind, m.learned_sigma, m.default_guidance) == ("eps", "ddpm", True, 4.5)
        assert m.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
        assert [type(b.attn1.processor) for b in m.transformer.transformer_blocks] == [WindowAttnProcessor] * 2
        assert [type(b.attn2.processor) for b in m.transformer.transformer_blocks] == [DenseCrossAttnProcessor] * 2
    assert (sigma.max_sequence_length, alpha.max_sequence_length) == (300, 120)  # the pipelines' defaults
    assert not sigma.transformer.use_additional_conditions and alpha.transformer.use_additional_conditions
    assert sigma.sample_shape == (4, 8, 8) and sigma.token_grid == (4, 4)


def test_prompts_mask_and_null_match_the_pipeline(sigma, sigma_folder):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(sigma_folder)
    prompts = ["a red cat", "dog"]
    pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu",
                                        max_sequence_length=300)
    cond = sigma.encode_prompt(prompts)
    null = sigma.null(cond)
    assert cond.embeds.shape == (2, 300, CAPTION) and cond.pooled.shape == (2, 0)
    assert torch.equal(cond.mask, pm) and torch.equal(null.mask, nm)
    assert cond.mask.sum(1).tolist() == [8, 4]  # single letters, word starts and </s>; padding masked
    assert (cond.embeds - pe).abs().max() <= 1e-5 and (null.embeds - ne).abs().max() <= 1e-5
    # the mask travels with the rows
    rows = cat_rows([cond, null])[torch.tensor([3, 0])]
    assert torch.equal(rows.mask, torch.stack([nm[1], pm[0]])) and torch.equal(tile_rows(cond, 2).mask,
                                                                               torch.cat([pm, pm]))
    assert torch.equal(cond[1].to("cpu").mask, pm[1:])
    assert cat_rows([PromptCond(cond.embeds, cond.pooled), null]).mask[:2].eq(1).all()  # no mask = every token kept


# -- alpha's micro-conditions --------------------------------------------------------------------
def test_alpha_micro_conditions_follow_the_image_size(alpha, alpha_folder):
    """PixArt-alpha's resolution / aspect-ratio micro-conditions are the pipeline's (the stock transformer given the
    image size in pixels), and they reach the network: another VAE factor gives another output."""
    x = torch.randn(2, 4, 8, 12, generator=_gen(20))
    cond = alpha.encode_prompt(["a red cat", "dog"])
    t = torch.tensor([0.3, 0.9])
    ref = _stock_eps(alpha_folder, x, torch.tensor([300, 900]), cond, micro=True)
    with torch.no_grad():
        assert (alpha(x, t, cond) - ref).abs().max() <= 1e-5
        alpha.vae_scale_factor = 2 * VAE_SCALE
        try:
            assert (alpha(x, t, cond) - ref).abs().max() > 1e-4
        finally:
            alpha.vae_scale_factor = VAE_SCALE


# -- embedding-level use and cost accounting -----------------------------------------------------
def test_bare_transformer_folder_works_on_embeddings(sigma_folder, sigma):
    model = critsample.load(str(sigma_folder / "transformer"))
    assert model.text is None and model.vae is None
    assert model.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    cond = sigma.encode_prompt(["a cat"])
    x = torch.randn(1, 4, 8, 8, generator=_gen(1))
    assert (model(x, torch.tensor([0.4]), cond) - sigma(x, torch.tensor([0.4]), cond)).abs().max() <= 1e-6
    with pytest.raises(UserError, match="T5 text encoder"):
        model.encode_prompt("a cat")
    with pytest.raises(UserError, match="null_cond"):
        model.predict(x, 0.4, cond, guidance=2.0)
    model.null_cond = sigma.null(cond)
    assert (model.predict(x, 0.4, cond, guidance=2.0) - sigma.predict(x, 0.4, cond, guidance=2.0)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="width 32"):
        model.predict(x, 0.4, PromptCond(torch.randn(1, 5, 8), torch.zeros(1, 0)))
    with pytest.raises(UserError, match="v_prediction"):  # v is not one of critsample's prediction kinds
        PixArtDenoiser(model.transformer, scheduler_config={"prediction_type": "v_prediction"})


def test_flops_count_dense_cross_attention(sigma):
    """Cross-attention keys are the T5 tokens (not joint text rows): the MLP runs on image rows only, at any radius."""
    shape = transformer_shape(sigma)
    n, L, d = 16, 2, 24
    assert (shape["cross_tokens"], shape["text_tokens"], shape["mlp_ratio"]) == (300, 0, 4.0)
    glob, local = forward_flops(shape, (4, 4), None), forward_flops(shape, (4, 4), 0)
    assert glob.mlp == local.mlp == 2 * 2 * 4 * d * d * n * L


# -- the CLI on a saved folder ------------------------------------------------------------------
def test_cli_sample_on_a_pixart_folder(sigma_folder, tmp_path):
    from critsample.cli import main

    out = tmp_path / "samples"
    argv = ["sample", "--model", str(sigma_folder), "--prompt", "a cat", "--num", "2", "--steps", "3", "--out",
            str(out), "--no-wandb"]
    assert main(argv) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    cost = json.loads((out / "run.json").read_text())["cost"]
    assert np.isfinite(cost["flops_per_sample"]["total"]) and cost["model_evaluations"] == 2 * 6


def test_cli_detect_on_a_pixart_folder(sigma_folder, tmp_path):
    from critsample.cli import main

    out = tmp_path / "detect"
    # no dataset: forward-backward from generated images, gaps on sampling trajectories only (no training trajectory)
    argv = ["detect", "--model", str(sigma_folder), "--prompt", "a cat", "--preset", "fast", *SMALL, "--fb.source",
            "generated",
            "--gaps.trajectories", "[sample_cond, sample_uncond]",
            "--classifier", CLASSIFIER, "--out", str(out), "--no-wandb"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["probes"]) == {"cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality"}


@pytest.mark.parametrize(
    "name,repo",
    [("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS"), ("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")]
)
def test_registry_name_offline_is_one_sentence(monkeypatch, tmp_path, capsys, name, repo):
    import huggingface_hub.constants as hf_constants

    from critsample.cli import main

    # an empty cache, whatever this machine holds
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code = main(["sample", "--model", name, "--prompt", "a cat", "--num", "1", "--steps", "2", "--out",
                 str(tmp_path / "o"), "--no-wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and repo in err and "Traceback" not in err and len(err.splitlines()) == 1
