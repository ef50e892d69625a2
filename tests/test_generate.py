"""`critsample sample` and its library (critsample.generate): images through Denoiser.images, per-sample noise,
resumable batches keyed by the model's weights, safetensors-only loading, and the help text."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import itertools
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_dit_transformer

import critsample
import critsample.generate as generate
from critsample.cli import main
from critsample.errors import UserError
from critsample.generate import SampleConfig
from critsample.sampling import noise, sample_generator


def _cfg(tmp_path, **kw) -> SampleConfig:
    return SampleConfig(**{"num": 8, "steps": 3, "seed": 0, "out": str(tmp_path), "wandb": False, **kw})


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


# -- 1. one image path under no-grad ---------------------------------------------------------------


def test_images_are_float32_in_unit_range_without_graph_and_refuse_nan(dit):
    z = torch.randn(2, *dit.sample_shape, generator=torch.Generator().manual_seed(0))
    assert any(p.requires_grad for p in dit.vae.parameters())  # the VAE's graph is what broke `sample`
    img = dit.images(z)
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32 and not img.requires_grad
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, dit.decode(z).detach())  # the same numbers as the families' hook
    with pytest.raises(RuntimeError, match="not finite.*sampler"):
        dit.images(torch.full_like(z, float("nan")))


def test_sample_a_latent_dit_with_vae_through_run_and_cli(dit, dit_folder, tmp_path):
    record = generate.run(_cfg(tmp_path / "lib", model=str(dit_folder), num=3, batch_size=2, classes=[1, 2]), model=dit)
    assert record["cost"]["samples_computed_this_run"] == 3
    cli_out = tmp_path / "cli"
    code = main(["sample", "--model", str(dit_folder), "--class", "1", "2", "--num", "3", "--steps", "3",
                 "--batch_size", "2",
                 "--device", "cpu", "--wandb", "false", "--out", str(cli_out)])
    assert code == 0
    for out in (tmp_path / "lib", cli_out):
        images = np.load(out / "samples.npz")["images"]
        assert images.shape == (3, 3, 16, 16) and images.dtype == np.float32
        assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # the CLI loads the same weights: the same samples as the library
    np.testing.assert_array_equal(np.load(cli_out / "samples.npz")["images"],
                                  np.load(tmp_path / "lib" / "samples.npz")["images"])


# -- 2. per-sample determinism, resume keyed by the weights -----------------------------------------


def test_noise_of_a_sample_depends_on_seed_and_index_only(digits):
    whole = noise(digits, [sample_generator(0, i) for i in range(8)])
    parts = torch.cat([noise(digits, [sample_generator(0, i) for i in range(lo, min(8, lo + 3))])
                       for lo in range(0, 8, 3)])
    assert whole.shape == (8, *digits.sample_shape) and torch.equal(whole, parts)
    # diffusers' randn_tensor semantics: row i is drawn alone from its generator
    assert torch.equal(whole[5:6], torch.randn(1, *digits.sample_shape, generator=sample_generator(0, 5)))
    other = noise(digits, [sample_generator(1, 0)])
    # seed + b collided: seed 1 batch 0 = seed 0 batch 1
    assert not any(torch.equal(other[0], whole[i]) for i in range(8))


def test_batch_size_does_not_change_samples_and_seeds_do_not_collide(digits, tmp_path, monkeypatch):
    first_states = {}
    real_sample = generate.sample

    def recording(model, plan, cond, callback=None, **kw):  # records each batch's initial state (step 0's input)
        def cb(d):
            if callback is not None:
                callback(d)
            if d["i"] == 0:
                first_states[bs].append(d["x_in"])

        return real_sample(model, plan, cond, callback=cb, **kw)

    monkeypatch.setattr(generate, "sample", recording)
    images = {}
    for bs in (1, 3, 8):
        first_states[bs] = []
        generate.run(_cfg(tmp_path / f"bs{bs}", batch_size=bs), model=digits)
        images[bs] = np.load(tmp_path / f"bs{bs}" / "samples.npz")["images"]
    monkeypatch.undo()
    generate.run(_cfg(tmp_path / "seed1", seed=1, num=1, batch_size=1), model=digits)
    seed1 = np.load(tmp_path / "seed1" / "samples.npz")["images"][0]
    # the noise of every sample is bit-identical whatever the batch size
    for bs in (1, 3):
        assert torch.equal(torch.cat(first_states[bs]), torch.cat(first_states[8]))
    # the samples agree to float32 rounding only: CPU GEMM kernels sum in a different order for different row counts
    for bs in (1, 3):
        np.testing.assert_allclose(images[bs], images[8], rtol=0, atol=1e-5)
    # seed 1's first sample is none of seed 0's (seed + b gave seed 1 batch 0 = seed 0 batch 1)
    assert min(np.abs(seed1 - images[8][i]).max() for i in range(8)) > 0.05


def test_resume_is_keyed_by_weights_and_stores_npz(dit, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, model="tiny", num=4, batch_size=2, classes=[3])
    other = copy.deepcopy(dit)  # same name, different weights
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.01)
    first = generate.run(cfg, model=dit)
    a = np.load(tmp_path / "samples.npz")["images"]
    assert first["cost"]["samples_computed_this_run"] == 4
    assert generate.run(cfg, model=other)["cost"]["samples_computed_this_run"] == 4  # nothing shared
    assert not np.array_equal(np.load(tmp_path / "samples.npz")["images"], a)
    assert generate.run(cfg, model=dit)["cost"]["samples_computed_this_run"] == 0  # both models' batches stay stored
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["images"], a)
    stored = [p for p in (tmp_path / ".batches").rglob("*") if p.is_file()]
    assert {p.suffix for p in stored} == {".npz", ".json"} and sum(p.suffix == ".npz" for p in stored) == 4

    # killed during the second batch: the rerun computes only that batch, and ends with the uninterrupted numbers
    out = tmp_path / "killed"
    real_sample, calls = generate.sample, []

    def dies_on_second_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(*args, **kw)

    monkeypatch.setattr(generate, "sample", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.run(_cfg(out, model="tiny", num=4, batch_size=2, classes=[3]), model=dit)
    monkeypatch.setattr(generate, "sample", real_sample)
    assert generate.run(_cfg(out, model="tiny", num=4, batch_size=2, classes=[3]),
                        model=dit)["cost"]["samples_computed_this_run"] == 2
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], a)


# -- 3. safetensors only ---------------------------------------------------------------------------


def test_a_folder_of_pickled_weights_is_refused_in_one_sentence(tmp_path, capsys):
    folder = tmp_path / "pickled-dit"
    tiny_dit_transformer().save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("*.bin")) and not list(folder.glob("*.safetensors"))
    with pytest.raises(UserError) as e:
        critsample.load(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and "pickle" in msg and "run code" in msg and "safe_serialization=True" in msg
    code = main(["sample", "--model", str(folder), "--num", "1", "--steps", "1", "--wandb", "false", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # the same weights as safetensors load
    safe = tmp_path / "safe-dit"
    tiny_dit_transformer().save_pretrained(safe)
    assert critsample.load(str(safe)).transformer.config.num_layers == 2
    # the explicit opt-in for files the user trusts, from Python and from the CLI; it does not outlive the call
    trusted = critsample.load(str(folder), trust_pickled_weights=True)
    safe_model = critsample.load(str(safe))
    pairs = zip(trusted.state_dict().values(), safe_model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # same weights; the outputs agree to float rounding, not bitwise (the two loaders leave the tensors at different
    # memory alignments, and CPU kernels pick their vector paths by alignment)
    x, t, c = torch.randn(1, *trusted.sample_shape), 0.5, torch.tensor([1])
    torch.testing.assert_close(trusted.predict(x, t, c), safe_model.predict(x, t, c), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="only pickled weights"):
        critsample.load(str(folder))
    assert main(["sample", "--model", str(folder), "--trust_pickled_weights", "--num", "1", "--steps", "1", "--wandb",
                 "false",
                 "--out", str(tmp_path / "o2")]) == 0


def test_sd3_text_encoders_must_be_safetensors(sd3_folder, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "sd3"
    shutil.copytree(sd3_folder, folder)
    te = folder / "text_encoder"
    # transformers 5 always writes safetensors, so the pickled file of an older checkpoint is made by hand
    torch.save(load_file(te / "model.safetensors"), te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    with pytest.raises(UserError, match="text_encoder holds only pickled weights .*CLIPTextModelWithProjection"):
        critsample.load(str(folder))


# -- 4. help -----------------------------------------------------------------------------------------


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass and of the option sections it inherits (critsample.options), read from
    their source; a redefined field takes the subclass's docstring."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        docs.update({a.target.id: b.value.value for a, b in itertools.pairwise(body)
                     if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)})
    return docs


def test_sample_help_documents_every_option(capsys):
    docs = _field_docs(SampleConfig)
    assert set(docs) == set(SampleConfig.__dataclass_fields__)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    assert e.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # argparse rewraps lines (and breaks at hyphens)
    for name, doc in docs.items():
        assert f"--{name}" in out and "".join(doc.split()) in out, name


def test_a_single_batch_killed_midway_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """--num <= --batch_size: the batch in flight is checkpointed, and the rerun continues from the last checkpoint
    (fewer model evaluations) and ends bitwise equal to an uninterrupted run."""
    model = critsample.load("dit-digits")
    monkeypatch.setattr(generate, "CHECKPOINT_SECONDS", 0.0)  # checkpoint after every step
    cfg = lambda out: SampleConfig(classes=[1, 7], num=4, batch_size=8, steps=6, out=str(out), wandb=False)  # noqa: E731
    whole = generate.run(cfg(tmp_path / "whole"), model)
    real = generate.sample

    def killed_after_step_3(*args, callback=None, **kwargs):
        def cb(d):
            callback(d)
            if d["i"] == 3:
                raise KeyboardInterrupt
        return real(*args, callback=cb, **kwargs)

    monkeypatch.setattr(generate, "sample", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg(tmp_path / "killed"), model)
    monkeypatch.setattr(generate, "sample", real)
    again = generate.run(cfg(tmp_path / "killed"), model)
    assert again["cost"]["model_evaluations_this_run"] == 4 * sum(s.forwards for s in generate.build_plan(
        cfg(tmp_path), model).steps[4:])
    a = np.load(tmp_path / "whole" / "samples.npz")["images"]
    b = np.load(tmp_path / "killed" / "samples.npz")["images"]
    assert np.array_equal(a, b)
    assert not list((tmp_path / "killed" / ".batches").rglob("sample_state/*.npz"))  # the checkpoint is gone
    assert whole["cost"]["model_evaluations_this_run"] == whole["cost"]["model_evaluations"]


def test_batch_invariant_samples_are_bitwise_identical_for_batch_sizes_1_3_8(tmp_path, dit):
    """--batch_invariant: every sample is computed alone (network and VAE), so batch sizes 1, 3 and 8 give bitwise
    identical samples, on dit-digits and on a latent DiT with a VAE (guided steps included)."""
    for name, model in (("digits", critsample.load("dit-digits")), ("latent", dit)):
        images = {}
        for bs in (1, 3, 8):
            cfg = SampleConfig(classes=[1, 7, 3], num=8, batch_size=bs, steps=4, batch_invariant=True, guidance=2.0,
                               out=str(tmp_path / f"{name}{bs}"), wandb=False)
            generate.run(cfg, model=model)
            images[bs] = np.load(tmp_path / f"{name}{bs}" / "samples.npz")["images"]
        assert np.array_equal(images[1], images[8]) and np.array_equal(images[3], images[8]), name
    assert main(["sample", "--model", "dit-digits", "--num", "2", "--steps", "2", "--batch_invariant", "--no-wandb",
                 "--out", str(tmp_path / "cli")]) == 0
