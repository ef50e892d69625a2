"""FLUX.1 behind the denoiser interface: the window processor against diffusers' masked ``FluxAttnProcessor`` in both
block kinds, the pipeline's step times, prompts and VAE factors, the CLI on a saved folder, the registry offline.
(Stock equality, r = 0 locality, ``FluxPipeline`` equality and counted FLOPs: test_denoiser_contract.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    CLASSIFIER,
    FLUX_LATENT_CHANNELS,
    FLUX_VAE_SCALE,
    FLUX_VAE_SHIFT,
    SMALL,
    T5_LENGTH,
    tiny_flux_transformer,
)

import critsample
from critsample import Plan, PromptCond
from critsample.attention import FluxWindowAttnProcessor
from critsample.local_attention import window_mask
from critsample.models.flux import FluxDenoiser, image_ids

LATENT_CHANNELS = FLUX_LATENT_CHANNELS  # the tiny VAE's; the transformer takes 2x2-packed latents: in_channels 16
VAE_SHIFT, VAE_SCALE = FLUX_VAE_SHIFT, FLUX_VAE_SCALE  # FLUX.1's VAE factors


@pytest.fixture(scope="module")
def flux(flux_folders) -> dict[str, FluxDenoiser]:
    return {k: critsample.load(str(f), max_sequence_length=T5_LENGTH) for k, f in flux_folders.items()}


def _prompt(batch: int, seed: int = 0, seq: int = T5_LENGTH) -> PromptCond:
    g = torch.Generator().manual_seed(seed)
    return PromptCond(torch.randn(batch, seq, 32, generator=g), torch.randn(batch, 16, generator=g))


def test_registry_loads_both_kinds(flux):
    dev, schnell = flux["dev"], flux["schnell"]
    for m in (dev, schnell):
        assert isinstance(m, FluxDenoiser)
        got = (m.family, m.prediction, m.schedule.kind, m.num_classes, m.default_guidance)
        assert got == ("flux", "velocity", "flow", None, 1.0)
        assert m.sample_shape == (LATENT_CHANNELS, 8, 8) and m.token_grid == (4, 4)  # the tiny VAE's 16 px, 2x VAE
        assert m.text is not None and len(m.text_encoders) == 2
    assert dev.distilled_guidance == 3.5 and schnell.distilled_guidance is None


# -- one attention layer: window against a masked stock processor -------------------------------------------------
def _layer_inputs(model: FluxDenoiser, block: str, grid, seed: int = 0):
    """The attention module of ``block``, its inputs (hidden, encoder or None) and RoPE, for a random state."""
    tr = model.transformer
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    d, n_txt = tr.inner_dim, 5
    img, txt = torch.randn(2, h * w, d, generator=g), torch.randn(2, n_txt, d, generator=g)
    rope = tr.pos_embed(torch.cat([torch.zeros(n_txt, 3), image_ids(h, w)]))
    if block == "double":
        return tr.transformer_blocks[0].attn, img, txt, rope, n_txt
    return tr.single_transformer_blocks[0].attn, torch.cat([txt, img], dim=1), None, rope, n_txt


def _image_out(out, block: str, n_txt: int):
    """(image rows, text rows) of a processor's output."""
    if block == "double":
        return out[0], out[1]
    return out[:, n_txt:], out[:, :n_txt]


@pytest.mark.parametrize("block", ["double", "single"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("radius", [0, 1])
def test_window_equals_stock_processor_with_window_mask(flux, block, grid, radius):
    """The window processor = diffusers' FluxAttnProcessor given the text-first window mask (text rows and columns
    dense)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    attn, hidden, enc, rope, n_txt = _layer_inputs(flux["dev"], block, grid)
    mask = window_mask(*grid, radius, num_extra=n_txt)  # (L, L) over [image; text]
    mask = torch.roll(mask, (n_txt, n_txt), dims=(0, 1))  # over [text; image], FLUX's order
    with torch.no_grad():
        ours = FluxWindowAttnProcessor()(attn, hidden, enc, image_rotary_emb=rope, radius=radius, grid=grid)
        ref = FluxAttnProcessor()(attn, hidden, enc, attention_mask=mask, image_rotary_emb=rope)
        glob = FluxAttnProcessor()(attn, hidden, enc, image_rotary_emb=rope)
        full = FluxWindowAttnProcessor()(attn, hidden, enc, image_rotary_emb=rope, radius=max(grid) - 1, grid=grid)
    for a, b in zip(_image_out(ours, block, n_txt), _image_out(ref, block, n_txt), strict=True):
        assert (a - b).abs().max() <= 1e-5
    for a, b in zip(_image_out(full, block, n_txt), _image_out(glob, block, n_txt), strict=True):
        assert torch.equal(a, b)  # a global radius is the stock computation itself


# -- the pipeline's conventions: step times, prompts, VAE ----------------------------------------------------------
def test_step_times_follow_the_resolution_shift(flux):
    """dev's sigmas are FluxPipeline's linspace(1, 1/N, N) shifted by mu(image tokens); schnell's are unshifted."""
    from critsample.sampling import step_times

    n = 4
    base = np.linspace(1.0, 1 / n, n)
    assert np.allclose(step_times(flux["schnell"], n), base, atol=1e-6)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # 4 x 4 tokens
    shifted = np.exp(mu) / (np.exp(mu) + (1 / base - 1))
    assert np.allclose(step_times(flux["dev"], n), shifted, atol=1e-6)


def test_prompts_and_null_match_the_pipeline(flux, flux_folders):
    from diffusers import FluxPipeline

    model = flux["dev"]
    pipe = FluxPipeline.from_pretrained(flux_folders["dev"])
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(["a cat", ""], max_sequence_length=T5_LENGTH)
    cond = model.encode_prompt(["a cat", "dog"])
    null = model.null(cond)
    close = lambda a, b: (a - b).abs().max() <= 1e-6  # noqa: E731  (rows batched differently)
    assert cond.embeds.shape == (2, T5_LENGTH, 32) and cond.pooled.shape == (2, 16)
    assert close(cond.embeds[0], embeds[0]) and close(cond.pooled[0], pooled[0])
    assert close(null.embeds, embeds[1:].expand(2, -1, -1)) and close(null.pooled, pooled[1:].expand(2, -1))


def test_vae_latent_convention(flux):
    model = flux["dev"]
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = model.encode(images, generator=torch.Generator().manual_seed(1))
    assert z.shape == (1, *model.sample_shape)
    with torch.no_grad():
        ref = (model.vae.decode(z / VAE_SCALE + VAE_SHIFT).sample / 2 + 0.5).clamp(0, 1)  # FluxPipeline's decode
    assert (model.decode(z) - ref).abs().max() <= 1e-6


# -- the CLI on a saved folder, the registry offline -------------------------------------------------------
def test_cli_sample_and_detect(flux_folders, tmp_path, capsys):
    from critsample.cli import main

    folder = str(flux_folders["dev"])
    out = tmp_path / "sample"
    code = main(["sample", "--model", folder, "--prompt", "a cat", "--num", "2", "--steps", "3", "--out", str(out),
                 "--no-wandb"])
    assert code == 0, capsys.readouterr().err
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    record = json.loads((out / "run.json").read_text())
    assert record["cost"]["model_evaluations"] == 6 and np.isfinite(record["cost"]["flops_per_sample"]["total"])

    det = tmp_path / "detect"
    code = main([
        "detect", "--model", folder, "--prompt", "a cat", "--preset", "fast", *SMALL, "--fb.source", "generated",
        "--gaps.trajectories", '["sample_cond", "sample_uncond"]',  # no dataset to noise forward: sampling trajectories
        "--classifier", CLASSIFIER, "--out", str(det), "--no-wandb",
    ])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((det / "summary.json").read_text())
    assert set(summary["probes"]) == {"cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality"}
    assert summary["schedule"]["kind"] == "flow"


@pytest.mark.parametrize("name,repo",
                         [("flux-dev", "black-forest-labs/FLUX.1-dev"),
                          ("flux-schnell", "black-forest-labs/FLUX.1-schnell")])
def test_registry_offline_is_one_sentence_exit_2(monkeypatch, tmp_path, capsys, name, repo):
    import huggingface_hub.constants as hf_constants

    from critsample.cli import main

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    code = main(["sample", "--model", name, "--prompt", "a cat", "--num", "1", "--steps", "2", "--out",
                 str(tmp_path / "o"), "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and repo in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_bad_input_is_one_sentence(flux):
    model = flux["schnell"]
    with pytest.raises(critsample.UserError, match="even"):
        model(torch.zeros(1, LATENT_CHANNELS, 8, 7), torch.tensor([0.5]), _prompt(1))
    with pytest.raises(critsample.UserError, match="no guidance embedding"):
        FluxDenoiser(tiny_flux_transformer(guidance_embeds=False), distilled_guidance=3.5)


def test_text_encoders_must_be_safetensors(flux_folders, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "flux"
    shutil.copytree(flux_folders["schnell"], folder)
    te = folder / "text_encoder_2"
    torch.save(load_file(te / "model.safetensors"), te / "pytorch_model.bin")  # an older checkpoint's pickled T5
    (te / "model.safetensors").unlink()
    with pytest.raises(critsample.UserError, match="text_encoder_2 holds only pickled weights .*T5EncoderModel"):
        critsample.load(str(folder))


def test_bare_transformer_folder_works_on_embeddings(tmp_path):
    """A folder with only the transformer: recognised as FLUX, latent size from critsample.json, no text encoders."""
    folder = tmp_path / "bare"
    tiny_flux_transformer(guidance_embeds=True).save_pretrained(folder)
    (folder / "critsample.json").write_text(json.dumps({"sample_size": 12}))
    model = critsample.load(str(folder))
    assert isinstance(model, FluxDenoiser) and model.sample_shape == (LATENT_CHANNELS, 12, 12) and model.text is None
    cond = _prompt(2)
    with pytest.raises(critsample.UserError, match="null_cond"):
        model.null(cond)
    with pytest.raises(critsample.UserError, match="without text encoders"):
        model.encode_prompt("a cat")
    model.null_cond = _prompt(1, seed=5)
    x = critsample.sample(model, Plan.guided(2, 2.0), cond, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, LATENT_CHANNELS, 12, 12) and torch.isfinite(x).all()
