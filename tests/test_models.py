"""Model loading, window attention against stock diffusers, locality of r = 0, noise conventions, guidance."""

from __future__ import annotations

import itertools
import sys
import time

import pytest
import torch
from conftest import T5_LENGTH, tiny_sd3_transformer

import critsample
from critsample import NULL, PromptCond, Schedule, UserError, convert
from critsample.models.dit import DiTDenoiser
from critsample.models.sd3 import SD3Denoiser, load_sd3


def _has_local_attention() -> bool:
    try:
        from critsample.local_attention import local_attention  # noqa: F401
    except ImportError:
        return False
    return True


needs_local = pytest.mark.skipif(not _has_local_attention(), reason="critsample.local_attention is not written yet")


def _prompt(batch: int, seed: int = 0, seq: int = 20, dim: int = 32, pooled: int = 16) -> PromptCond:
    g = torch.Generator().manual_seed(seed)
    return PromptCond(torch.randn(batch, seq, dim, generator=g), torch.randn(batch, pooled, generator=g))


def _grid_mask(h: int, w: int, i: int, j: int, dist: int, patch: int) -> torch.Tensor:
    """(h p, w p) bool mask of the latent pixels whose token lies within Chebyshev distance ``dist`` of (i, j)."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    near = ((ii - i).abs() <= dist) & ((jj - j).abs() <= dist)
    return near.repeat_interleave(patch, 0).repeat_interleave(patch, 1)


# -- registry -----------------------------------------------------------------------------------
def test_registry_loads_tiny_folders(dit, sd3):
    assert isinstance(dit, DiTDenoiser) and isinstance(sd3, SD3Denoiser)
    assert (dit.prediction, dit.schedule.kind, dit.num_classes, dit.learned_sigma) == ("eps", "ddpm", 1000, True)
    assert (sd3.prediction, sd3.schedule.kind, sd3.num_classes) == ("velocity", "flow", None)
    assert dit.scheduler_config["_class_name"] == "DDIMScheduler"
    assert sd3.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert dit.sample_shape == sd3.sample_shape == (4, 8, 8)
    assert sd3.text is not None and len(sd3.text_encoders) == 3


def test_missing_weights_fail_fast_with_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        critsample.load("dit-xl")
    assert time.monotonic() - start < 10
    message = str(err.value)
    for needle in ("facebook/DiT-XL-2-256", "huggingface-cli download", "--model"):
        assert needle in message


def test_cli_missing_weights_exit_code_2(monkeypatch, tmp_path, capsys):
    pytest.importorskip("critsample.generate")
    import huggingface_hub.constants as hf_constants

    from critsample.cli import main

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code = main(["sample", "--model", "dit-xl", "--num", "1", "--steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "facebook/DiT-XL-2-256" in err and "Traceback" not in err


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="Unknown model"):
        critsample.load("no-such-model-or-folder")


# -- global radius == stock diffusers ---------------------------------------------------------
@pytest.mark.parametrize("size", [8, 12])  # diffusers' DiT unpatchifies with h = w = sqrt(N): square grids only
def test_dit_global_radius_equals_stock(dit, dit_folder, size):
    from diffusers import DiTTransformer2DModel

    stock = DiTTransformer2DModel.from_pretrained(dit_folder / "transformer").eval()  # original processors
    g = torch.Generator().manual_seed(size)
    x = torch.randn(3, 4, size, size, generator=g)
    k = torch.tensor([10, 500, 999])
    labels = torch.tensor([3, NULL, 999])
    with torch.no_grad():
        ref = stock(x, timestep=k, class_labels=torch.tensor([3, 1000, 999])).sample  # (3, 8, H, W)
        h = size // 2
        for radius in (None, h - 1, h + 3, [h - 1, h, 50]):
            out = dit(x, k / 1000, labels, radius=radius)
            assert (out - ref[:, :4]).abs().max() <= 1e-5, radius
            full = dit.transformer(x, timestep=k, class_labels=torch.tensor([3, 1000, 999]),
                                   cross_attention_kwargs={"radius": radius, "grid": (h, h)}).sample
            assert (full - ref).abs().max() <= 1e-5, radius


@pytest.mark.parametrize("shape", [(8, 8), (8, 12), (12, 6)])
def test_sd3_global_radius_equals_stock(sd3, sd3_folder, shape):
    from diffusers import SD3Transformer2DModel

    stock = SD3Transformer2DModel.from_pretrained(sd3_folder / "transformer").eval()
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(2, 4, *shape, generator=g)
    cond = _prompt(2, seed=1, seq=8 + T5_LENGTH)
    t = torch.tensor([0.3, 0.9])
    h, w = shape[0] // 2, shape[1] // 2
    with torch.no_grad():
        ref = stock(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, timestep=1000 * t).sample
        for radius in (None, max(h, w) - 1, [max(h, w) - 1, 99]):
            out = sd3(x, t, cond, radius=radius)
            assert out.shape == x.shape
            assert (out - ref).abs().max() <= 1e-5, radius


def test_sd35_layout_global_radius_equals_stock():
    """SD3.5 adds qk-norm and image-only ``attn2`` layers (the self-attention window processor)."""
    kw = dict(dual_attention_layers=(0,), qk_norm="rms_norm")
    model = SD3Denoiser(tiny_sd3_transformer(seed=5, **kw))
    stock = tiny_sd3_transformer(seed=5, **kw)
    x = torch.randn(2, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    cond = _prompt(2, seq=9)
    with torch.no_grad():
        ref = stock(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, timestep=torch.tensor([100.0, 700.0])).sample
        out = model(x, torch.tensor([0.1, 0.7]), cond, radius=4)
    assert (out - ref).abs().max() <= 1e-5


# -- locality of small radii -------------------------------------------------------------------
@needs_local
@pytest.mark.parametrize("radius", [0, 1])
def test_dit_radius_bounds_receptive_field(dit, radius):
    """r = 0: each token's output depends only on its own patch. With L blocks of radius r the receptive field is L r."""
    p, size, (i, j) = dit.patch_size, 12, (2, 3)
    h = size // p
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[..., i * p : (i + 1) * p, j * p : (j + 1) * p] += 1.0  # perturb one token's input patch
    t, c = torch.tensor([0.4]), torch.tensor([7])
    with torch.no_grad():
        diff = (dit(x2, t, c, radius=radius) - dit(x, t, c, radius=radius)).abs().amax(dim=(0, 1))  # (H, W)
    layers = len(dit.transformer.transformer_blocks)
    inside = _grid_mask(h, h, i, j, layers * radius, p)
    assert diff[~inside].max() == 0.0
    assert diff[_grid_mask(h, h, i, j, 0, p)].min() > 1e-4  # the perturbed token itself does change


@needs_local
@pytest.mark.parametrize("shape", [(8, 8), (8, 12)])
def test_sd3_radius_zero_one_block_is_pointwise(shape):
    """In one joint block (the last, text is not updated) an image token sees only itself and the text at r = 0."""
    model = SD3Denoiser(tiny_sd3_transformer(num_layers=1, seed=3))
    p, (i, j) = model.patch_size, (1, 2)
    h, w = shape[0] // p, shape[1] // p
    x = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[..., i * p : (i + 1) * p, j * p : (j + 1) * p] += 1.0
    cond, t = _prompt(1, seq=7), torch.tensor([0.5])
    with torch.no_grad():
        diff = (model(x2, t, cond, radius=0) - model(x, t, cond, radius=0)).abs().amax(dim=(0, 1))
        glob = (model(x2, t, cond) - model(x, t, cond)).abs().amax(dim=(0, 1))
    own = _grid_mask(h, w, i, j, 0, p)
    assert diff[~own].max() == 0.0 and diff[own].min() > 1e-4
    assert glob[~own].min() > 0.0  # the global model does mix tokens, so the check above is not vacuous


@needs_local
def test_per_row_radius_equals_separate_calls(dit, sd3):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([0.2, 0.5, 0.8]), torch.tensor([1, NULL, 5])
    radii = [0, 1, 3]
    with torch.no_grad():
        batched = dit(x, t, labels, radius=torch.tensor(radii))
        for b, r in enumerate(radii):
            single = dit(x[b : b + 1], t[b : b + 1], labels[b : b + 1], radius=r)
            assert (batched[b : b + 1] - single).abs().max() <= 1e-5
        xs = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
        cond = _prompt(2, seq=8 + T5_LENGTH)
        batched = sd3(xs, t[:2], cond, radius=[0, 2])
        for b, r in enumerate([0, 2]):
            single = sd3(xs[b : b + 1], t[b : b + 1], PromptCond(cond.embeds[b : b + 1], cond.pooled[b : b + 1]), radius=r)
            assert (batched[b : b + 1] - single).abs().max() <= 1e-5


def test_bad_radius_is_rejected(dit):
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="radius"):
        dit(x, torch.tensor([0.5]), torch.tensor([1]), radius=-1)


# -- noise conventions --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_conversions_agree_with_definitions(kind):
    """Every (src, dst) pair maps the true prediction of src to the true prediction of dst (noise.py definitions)."""
    sched = Schedule(kind=kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    x = sched.add_noise(x0, t, eps)
    ab, sb = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    assert torch.allclose(x, ab * x0 + sb * eps)
    truth = {"eps": eps, "x0": x0, "score": -eps / sb, "velocity": eps - x0}
    for src, dst in itertools.product(truth, truth):
        got = convert(truth[src], src, dst, x, a, s)
        assert torch.allclose(got, truth[dst], rtol=1e-9, atol=1e-9), (src, dst)
        back = convert(got, dst, src, x, a, s)
        assert torch.allclose(back, truth[src], rtol=1e-9, atol=1e-9), (dst, src)


def test_flow_schedule_is_the_sd3_interpolant():
    sched = Schedule(kind="flow")
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    a, s = sched.alpha_sigma(t)
    assert torch.equal(a, 1 - t) and torch.equal(s, t)
    assert torch.equal(sched.native(t), 1000 * t)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equals_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=beta_schedule)
    ours = Schedule(kind="ddpm", **kw).alphas_cumprod()
    ref = DDPMScheduler(**kw).alphas_cumprod.double()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 2e-6
    assert Schedule.from_scheduler_config(DDPMScheduler(**kw).config) == Schedule(kind="ddpm", **kw)


# -- guidance ----------------------------------------------------------------------------------
def test_guide_channels_3_differs_only_in_fourth_channel(dit, dit_folder):
    dit3 = critsample.load(str(dit_folder), guide_channels=3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels, t = torch.tensor([4, 9]), 0.6
    full = dit.predict(x, t, labels, guidance=4.0)
    first3 = dit3.predict(x, t, labels, guidance=4.0)
    cond = dit.predict(x, t, labels)
    assert (full[:, :3] - first3[:, :3]).abs().max() <= 1e-6
    assert (full[:, 3] - first3[:, 3]).abs().max() > 1e-3
    assert (first3[:, 3] - cond[:, 3]).abs().max() <= 1e-5  # the 4th channel stays conditional


@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_guidance_one_equals_conditional(dit, sd3, which):
    model = dit if which == "dit" else sd3
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([2, 7]) if which == "dit" else sd3.encode_prompt(["a cat", "dog"])
    guided = model.predict(x, 0.5, cond, guidance=1.0)
    plain = model.predict(x, 0.5, cond)
    assert (guided - plain).abs().max() <= 1e-5
    assert (model.predict(x, 0.5, cond, guidance=3.0) - plain).abs().max() > 1e-3


# -- SD3 specifics ------------------------------------------------------------------------------
def test_sd3_prompts_and_null_match_diffusers_pipeline(sd3, sd3_folder, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    prompts = ["a red cat", "dog"]
    pe, ne, pp, npool = pipe.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=T5_LENGTH)
    cond = sd3.encode_prompt(prompts)
    calls = []
    encode = sd3.encode_prompt
    monkeypatch.setattr(sd3, "encode_prompt", lambda *a, **k: calls.append(a) or encode(*a, **k))
    null = sd3.null(cond)
    assert cond.embeds.shape == (2, 8 + T5_LENGTH, 32)
    close = lambda a, b: (a - b).abs().max() <= 1e-5  # noqa: E731  (the pipeline ran with autograd on)
    assert close(cond.embeds, pe) and close(cond.pooled, pp)
    assert close(null.embeds, ne) and close(null.pooled, npool)
    assert close(sd3.null(PromptCond(cond.embeds[:1], cond.pooled[:1])).embeds, ne[:1])
    assert len(calls) <= 1  # the empty prompt is embedded once, then cached


def test_sd3_without_text_encoders(sd3_folder):
    model = critsample.load(str(sd3_folder), text_encoders=False)
    assert model.text is None and len(model.text_encoders) == 0
    cond = _prompt(1, seq=8 + T5_LENGTH)
    x = torch.randn(1, 4, 8, 8)
    assert model(x, torch.tensor([0.5]), cond).shape == x.shape  # prompt-embedding-level use works
    with pytest.raises(UserError, match="text encoders"):
        model.encode_prompt(["a cat"])
    with pytest.raises(UserError, match="null_cond"):
        model.predict(x, 0.5, cond, guidance=2.0)
    model.null_cond = _prompt(1, seed=9, seq=8 + T5_LENGTH)
    assert model.predict(x, 0.5, cond, guidance=2.0).shape == x.shape


def test_sd3_without_t5_embeds_zeros(sd3_folder):
    model = critsample.load(str(sd3_folder), t5=False, max_sequence_length=T5_LENGTH)
    assert len(model.text_encoders) == 2
    cond = model.encode_prompt(["a cat"])
    assert cond.embeds.shape == (1, 8 + T5_LENGTH, 32)
    assert torch.equal(cond.embeds[:, 8:], torch.zeros(1, T5_LENGTH, 32))  # diffusers' T5-less SD3 convention


def test_sd3_missing_transformers_names_the_extra(sd3_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(UserError, match=r"pip install critsample\[sd3\]"):
        load_sd3(sd3_folder, name="tiny")


def test_sd3_vae_latent_convention(sd3):
    """latents = (vae_latent - shift) * scale, and decode inverts it before the VAE decoder."""
    vae = sd3.vae
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = sd3.encode(images, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(1))
        ref = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(z, (raw - 0.0609) * 1.5035, atol=1e-6)
    assert (sd3.decode(z) - ref).abs().max() <= 1e-5
