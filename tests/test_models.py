"""Model loading, noise conventions, DiT guidance channels, SD3 specifics (the window-attention contract every family
keeps is in test_denoiser_contract.py)."""

from __future__ import annotations

import itertools
import sys
import time

import pytest
import torch
from conftest import T5_LENGTH

import critsample
from critsample import PromptCond, Schedule, UserError, convert
from critsample.models.dit import DiTDenoiser
from critsample.models.sd3 import SD3Denoiser, load_sd3


def _prompt(batch: int, seed: int = 0, seq: int = 20, dim: int = 32, pooled: int = 16) -> PromptCond:
    g = torch.Generator().manual_seed(seed)
    return PromptCond(torch.randn(batch, seq, dim, generator=g), torch.randn(batch, pooled, generator=g))


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
