"""PixArt-alpha / Sigma behind the denoiser interface: stock equality at a global radius, r = 0 locality of the
self-attention, the sampler against diffusers' PixArt pipelines, the CLI on a saved folder, offline registry names.

Two tiny random pipelines saved with ``save_pretrained``: a Sigma-style one (8 x 8 latents, no micro-conditions, 300
T5 tokens) and an alpha-style one whose transformer has ``sample_size = 128`` so that it takes PixArt-alpha's
resolution / aspect-ratio micro-conditions (it runs on small latents: the position embedding is recomputed per size).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PIXART_CAPTION, VAE_SCALE

import critsample
from critsample import PromptCond, UserError, plans
from critsample.attention import DenseCrossAttnProcessor, WindowAttnProcessor
from critsample.denoisers import cat_rows, tile_rows
from critsample.flops import forward_flops, plan_flops, transformer_shape
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
    pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu", max_sequence_length=300)
    cond = sigma.encode_prompt(prompts)
    null = sigma.null(cond)
    assert cond.embeds.shape == (2, 300, CAPTION) and cond.pooled.shape == (2, 0)
    assert torch.equal(cond.mask, pm) and torch.equal(null.mask, nm)
    assert cond.mask.sum(1).tolist() == [8, 4]  # single letters, word starts and </s>; padding masked
    assert (cond.embeds - pe).abs().max() <= 1e-5 and (null.embeds - ne).abs().max() <= 1e-5
    # the mask travels with the rows
    rows = cat_rows([cond, null])[torch.tensor([3, 0])]
    assert torch.equal(rows.mask, torch.stack([nm[1], pm[0]])) and torch.equal(tile_rows(cond, 2).mask, torch.cat([pm, pm]))
    assert torch.equal(cond[1].to("cpu").mask, pm[1:])
    assert cat_rows([PromptCond(cond.embeds, cond.pooled), null]).mask[:2].eq(1).all()  # no mask = every token kept


# -- global radius == stock diffusers ---------------------------------------------------------
@pytest.mark.parametrize("which", ["sigma", "alpha"])
@pytest.mark.parametrize("shape", [(8, 8), (8, 12)])
def test_global_radius_equals_stock(sigma, alpha, sigma_folder, alpha_folder, which, shape):
    model, folder = (sigma, sigma_folder) if which == "sigma" else (alpha, alpha_folder)
    x = torch.randn(2, 4, *shape, generator=_gen(sum(shape)))
    cond = model.encode_prompt(["a red cat", "dog"])
    t = torch.tensor([0.3, 0.9])
    ref = _stock_eps(folder, x, torch.tensor([300, 900]), cond, micro=which == "alpha")
    h, w = shape[0] // 2, shape[1] // 2
    with torch.no_grad():
        for radius in (None, max(h, w) - 1, [max(h, w) - 1, 99]):
            out = model(x, t, cond, radius=radius)
            assert out.shape == x.shape
            assert (out - ref).abs().max() <= 1e-5, radius
        assert (model(x, t, cond, radius=0) - ref).abs().max() > 1e-4  # the window is not a no-op
        if which == "alpha":  # the micro-conditions reach the network: another image size gives another output
            model.vae_scale_factor = 2 * VAE_SCALE
            try:
                assert (model(x, t, cond) - ref).abs().max() > 1e-4
            finally:
                model.vae_scale_factor = VAE_SCALE


# -- locality of r = 0 --------------------------------------------------------------------------
def test_radius_zero_self_attention_sees_only_its_token(sigma):
    """One attn1 layer: at r = 0 perturbing token j leaves every other token's output exactly unchanged."""
    attn = sigma.transformer.transformer_blocks[0].attn1
    grid, j = (3, 4), 5
    hs = torch.randn(2, 12, 24, generator=_gen(0))  # (B, N, width)
    hs2 = hs.clone()
    hs2[:, j] += 1.0
    others = torch.arange(12) != j
    with torch.no_grad():
        local = (attn(hs2, radius=0, grid=grid) - attn(hs, radius=0, grid=grid)).abs().amax(dim=(0, 2))  # (N,)
        glob = (attn(hs2, radius=None, grid=grid) - attn(hs, radius=None, grid=grid)).abs().amax(dim=(0, 2))
    assert local[others].max() == 0.0 and local[j] > 1e-4
    assert glob[others].min() > 0.0


def test_radius_zero_model_is_pointwise_but_reads_the_text(sigma):
    """Cross-attention and MLP act per image token, so at r = 0 the whole PixArt forward is pointwise in the image;
    the text still reaches every token (cross-attention stays dense)."""
    p, (i, j) = sigma.patch_size, (1, 2)
    x = torch.randn(1, 4, 8, 12, generator=_gen(0))
    x2 = x.clone()
    x2[..., i * p : (i + 1) * p, j * p : (j + 1) * p] += 1.0
    cond, other, t = sigma.encode_prompt(["a cat"]), sigma.encode_prompt(["zebra"]), torch.tensor([0.5])
    own = torch.zeros(8, 12, dtype=torch.bool)
    own[i * p : (i + 1) * p, j * p : (j + 1) * p] = True
    with torch.no_grad():
        diff = (sigma(x2, t, cond, radius=0) - sigma(x, t, cond, radius=0)).abs().amax(dim=(0, 1))  # (H, W)
        glob = (sigma(x2, t, cond) - sigma(x, t, cond)).abs().amax(dim=(0, 1))
        text = (sigma(x, t, other, radius=0) - sigma(x, t, cond, radius=0)).abs().amax(dim=(0, 1))
    assert diff[~own].max() == 0.0 and diff[own].min() > 1e-4
    assert glob[~own].min() > 0.0 and text.min() > 0.0


# -- sampling against diffusers' pipelines ------------------------------------------------------
@pytest.mark.parametrize("which,size", [("sigma", (16, 16)), ("alpha", (16, 24))])
def test_full_guidance_equals_pixart_pipeline(sigma, alpha, sigma_folder, alpha_folder, which, size):
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    model, folder = (sigma, sigma_folder) if which == "sigma" else (alpha, alpha_folder)
    pipe = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"]).from_pretrained(folder)
    prompts = ["a red cat", "dog"]
    x = randn_tensor((2, 4, size[0] // VAE_SCALE, size[1] // VAE_SCALE), generator=_gen(3), dtype=torch.float32)
    common = dict(height=size[0], width=size[1], guidance_scale=4.5, num_inference_steps=4, use_resolution_binning=False)
    ref = pipe(prompts, latents=x.clone(), output_type="latent", **common).images
    z = critsample.sample(model, plans.full_guidance(model, 4, 4.5, "dpm"), model.encode_prompt(prompts), x=x)
    assert z.shape == ref.shape and (z - ref).abs().max() <= 1e-4
    if which == "sigma":
        images = pipe(prompts, latents=x.clone(), output_type="pt", **common).images
        assert (model.decode(z) - images).abs().max() <= 1e-4
        z0 = critsample.sample(model, plans.full_guidance(model, 4, 4.5, "dpm"), model.encode_prompt(prompts), generator=_gen(3))
        assert torch.equal(z0, z)  # sample() draws its noise as the pipeline does


# -- embedding-level use and cost accounting -----------------------------------------------------
def test_bare_transformer_folder_works_on_embeddings(sigma_folder, sigma):
    model = critsample.load(str(sigma_folder / "transformer"))
    assert model.text is None and model.vae is None and model.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
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
    shape = transformer_shape(sigma)
    n, m, L, d = 16, 300, 2, 24
    assert (shape["cross_tokens"], shape["text_tokens"], shape["mlp_ratio"]) == (m, 0, 4.0)
    glob, local = forward_flops(shape, (4, 4), None), forward_flops(shape, (4, 4), 0)
    assert glob.attention_pairs == L * (n * n + n * m) and local.attention_pairs == L * (n * 1 + n * m)
    assert glob.mlp == local.mlp == 2 * 2 * 4 * d * d * n * L  # image rows only
    cost = plan_flops(sigma, plans.full_guidance(sigma, 3, 4.5), (4, 4))
    assert cost["forwards"] == 6 and cost["total"] == pytest.approx(6 * glob.total)


# -- the CLI on a saved folder ------------------------------------------------------------------
SMALL = [
    "--gaps.steps", "4", "--gaps.samples", "2", "--gaps.batch", "2", "--gaps.radii", "[1, 2]",
    "--fb.num_t", "3", "--fb.samples", "3", "--fb.steps", "4", "--fb.batch", "3", "--fb.radii", "[1]",
    "--windows.steps", "4", "--windows.t0_step", "0.34", "--windows.samples", "3", "--windows.batch", "3", "--windows.radii", "[1]",
]


def test_cli_sample_on_a_pixart_folder(sigma_folder, tmp_path):
    from critsample.cli import main

    out = tmp_path / "samples"
    argv = ["sample", "--model", str(sigma_folder), "--prompt", "a cat", "--num", "2", "--steps", "3", "--out", str(out), "--no-wandb"]
    assert main(argv) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    cost = json.loads((out / "run.json").read_text())["cost"]
    assert np.isfinite(cost["flops_per_sample"]["total"]) and cost["model_evaluations"] == 2 * 6


def test_cli_detect_on_a_pixart_folder(sigma_folder, tmp_path):
    from critsample.cli import main

    out = tmp_path / "detect"
    # no dataset: forward-backward from generated images, gaps on sampling trajectories only (no training trajectory)
    argv = ["detect", "--model", str(sigma_folder), "--prompt", "a cat", "--preset", "fast", *SMALL, "--fb.source", "generated",
            "--gaps.trajectories", "[sample_cond, sample_uncond]",
            "--classifier", "test_probes:tiny_classifier", "--out", str(out), "--no-wandb"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["probes"]) == {"cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality"}


@pytest.mark.parametrize(
    "name,repo", [("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS"), ("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")]
)
def test_registry_name_offline_is_one_sentence(monkeypatch, tmp_path, capsys, name, repo):
    import huggingface_hub.constants as hf_constants

    from critsample.cli import main

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, whatever this machine holds
    code = main(["sample", "--model", name, "--prompt", "a cat", "--num", "1", "--steps", "2", "--out", str(tmp_path / "o"), "--no-wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and repo in err and "Traceback" not in err and len(err.splitlines()) == 1
