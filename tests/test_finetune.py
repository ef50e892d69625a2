"""Fine-tuning through `critsample fit`: from an exported model, with a radius schedule and a loss weighting, the
evaluation callback, resume, DDP on two CPU processes, and every shipped fit config loading without weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from critsample.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny dit-digits-shaped model (random weights) exported as a loadable folder."""
    from critsample.finetune.module import DiTModule

    torch.manual_seed(0)
    return DiTModule(model=TINY).export(tmp_path_factory.mktemp("tiny") / "model")


def _config(root: Path, init_from: Path, max_steps: int, **extra) -> Path:
    """The locality fine-tune config with every path in ``root``, a tiny budget and a tiny evaluation."""
    cfg = yaml.safe_load((REPO / "configs/fit/dit-digits-locality.yaml").read_text())
    t = cfg["trainer"]
    t.update(default_root_dir=str(root), max_steps=max_steps, limit_train_batches=2, check_val_every_n_epoch=1,
             limit_val_batches=1, enable_progress_bar=False, num_sanity_val_steps=0)
    t["logger"] = [
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": str(root), "offline": True, "project": "critsample"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(root), "name": "csv", "version": 0}},
    ]
    ema, ckpt, evaluation = t["callbacks"]
    ckpt["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    evaluation["init_args"].update(times=[0.5], num_images=4, samples_per_class=1, num_classes=3, steps=2, fid=True)
    m = cfg["model"]
    m.update(init_from=str(init_from), export_dir=str(root / "export"), val_steps=2, warmup_steps=1)
    m["radius_schedule"].update(anneal_steps=3)
    m["loss_weighting"].update(inside=3.0)
    cfg["data"]["init_args"]["batch_size"] = 16
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_finetune_with_schedules_from_an_exported_model_and_resume(tiny_model, tmp_path):
    from safetensors.torch import load_file

    import critsample

    cfg = _config(tmp_path, tiny_model, max_steps=2)
    assert main(["fit", "--config", str(cfg)]) == 0
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    hp = first["hyper_parameters"]
    assert first["global_step"] == 2 and hp["init_from"] == str(tiny_model)
    assert hp["radius_schedule"]["window"] == [0.3, 0.7] and hp["radius_schedule"]["anneal_steps"] == 3
    assert hp["loss_weighting"]["inside"] == 3.0
    logged = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the run's config, as LightningCLI logged it
    assert logged["model"]["radius_schedule"]["radius"] == 1 and logged["model"]["loss_weighting"]["inside"] == 3.0

    # the evaluation callback logged gaps, accuracies and costs (W&B offline and CSV)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    for key in ("eval/cond_gap/t=0.5", "eval/loc_gap_uncond_r1/t=0.5", "eval/full_accuracy", "eval/adaptive_accuracy",
                "eval/adaptive_fid"):
        assert key in last, key
    assert float(last["eval/full_forwards"]) == 4 and float(last["eval/adaptive_forwards"]) < 4
    assert 0 <= float(last["eval/adaptive_accuracy"]) <= 1 and float(last["eval/cond_gap/t=0.5"]) > 0
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/eval"))
    assert media and any("adaptive_samples" in p.name for p in media[0].iterdir())

    # fine-tuned from the exported weights: same shapes, different values; the export loads
    base = load_file(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == tuned.keys() and not torch.equal(base["proj_out_2.weight"], tuned["proj_out_2.weight"])
    assert critsample.load(str(tmp_path / "export")).num_classes == 10

    # resume: the same command with a larger budget continues at step 2, with the evaluation cadence restored
    cfg = _config(tmp_path, tiny_model, max_steps=4)
    assert main(["fit", "--config", str(cfg)]) == 0
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 4
    assert second["lr_schedulers"][0]["last_epoch"] == first["lr_schedulers"][0]["last_epoch"] + 2
    assert any("TrainingEvaluation" in k for k in second["callbacks"]), "the evaluation cadence is checkpointed"
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))  # the resumed run's log
    assert any(row.get("eval/adaptive_accuracy") for row in rows), "the resumed run evaluates too"


def test_init_from_loads_the_exported_weights(tiny_model):
    from safetensors.torch import load_file

    from critsample.finetune.module import DiTModule

    module = DiTModule(init_from=str(tiny_model))
    base = load_file(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors")
    state = module.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())


def test_summary_seeds_the_schedules_in_the_cli(tiny_model, tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.45}}))
    cfg = _config(tmp_path, tiny_model, max_steps=1)
    assert main(["fit", "--config", str(cfg), f"--model.radius_schedule.summary={summary}",
                 f"--model.loss_weighting.summary={summary}", "--trainer.logger=false",
                 "--trainer.limit_val_batches=0"]) == 0
    hp = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert hp["radius_schedule"]["window"] == [0.2, 0.45] and hp["loss_weighting"]["window"] == [0.2, 0.45]
    logged = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert logged["radius_schedule"]["summary"] == str(summary)


def test_bad_window_in_the_cli_exits_2_in_one_sentence(tiny_model, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model, max_steps=1)
    code = main(["fit", "--config", str(cfg), "--model.radius_schedule.window=[0.8, 0.2]"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "Union subtypes" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("critsample: error: A window") and "0 <= t0 < t1 <= 1" in line and line.endswith(".")


@pytest.mark.parametrize("configs",
                         [["dit-digits.yaml"], ["dit-digits-locality.yaml"], ["dit-fashion.yaml"],
                          ["dit-xl-latents.yaml"],
                                     ["dit-xl-imagefolder.yaml"], ["dit-xl-latents.yaml", "fsdp.yaml"]])
def test_shipped_fit_configs_load_without_weights(configs, capsys):
    args = ["fit"] + [a for c in configs for a in ("--config", str(REPO / "configs/fit" / c))] + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert "radius_schedule" in out["model"]
    if "fsdp.yaml" in configs:
        assert out["trainer"]["strategy"]["init_args"]["wrap"] == ["diffusers.models.attention.BasicTransformerBlock"]
        assert not any("EMAWeightAveraging" in c["class_path"] for c in out["trainer"]["callbacks"])


def test_fit_configs_are_all_tested():
    shipped = {p.name for p in (REPO / "configs/fit").glob("*.yaml")}
    assert shipped == {"dit-digits.yaml", "dit-digits-locality.yaml", "dit-fashion.yaml", "dit-xl-latents.yaml",
                       "dit-xl-imagefolder.yaml", "fsdp.yaml", "student-digits.yaml"}  # the last: test_student.py


def test_export_from_a_gathered_state_dict_matches_the_module(tiny_model, tmp_path):
    """The FSDP export path: a transformer rebuilt from a full state dict exports the same tensors."""
    from safetensors.torch import load_file

    from critsample.finetune.module import DiTModule

    module = DiTModule(init_from=str(tiny_model))
    rebuilt = module.transformer_from_state_dict(module.state_dict())
    module.export(tmp_path / "a")
    module.export(tmp_path / "b", transformer=rebuilt)
    a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_module_samples_with_the_integrator_of_the_loaded_model(tiny_model, tmp_path):
    """Validation grids and TrainingEvaluation sample as `critsample sample` will: same DDIM config (no x0 clipping)."""
    import critsample
    from critsample.finetune.module import DiTModule
    from critsample.sampling import make_scheduler

    def config(denoiser) -> dict:
        return {k: v for k, v in make_scheduler(denoiser).config.items() if not k.startswith("_")}

    loaded = critsample.load(str(tiny_model))
    assert config(DiTModule(init_from=str(tiny_model)).denoiser) == config(loaded)
    assert config(loaded)["clip_sample"] is False
    scratch = DiTModule(model=TINY)
    assert config(scratch.denoiser) == config(critsample.load(str(scratch.export(tmp_path / "m"))))


def test_evaluation_gaps_match_a_direct_computation(tiny_model):
    """TrainingEvaluation's gaps are ||s_c - s_u|| / tokens (eq. 6) and ||s_r - s|| / tokens (eq. 7), batch means."""
    from diffusers.utils.torch_utils import randn_tensor

    from critsample.denoisers import NULL
    from critsample.finetune.callbacks import TrainingEvaluation
    from critsample.finetune.data import digits_split
    from critsample.finetune.module import DiTModule

    module = DiTModule(init_from=str(tiny_model)).eval()
    den = module.denoiser
    x, y = digits_split("test")
    x0, y = x[:4], y[:4]
    got = TrainingEvaluation(times=[0.6], seed=3).gaps(module, x0, y, radius=1)
    eps = randn_tensor(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    xt = den.schedule.add_noise(x0, torch.tensor(0.6), eps)
    null = torch.full_like(y, NULL)
    s_c, s_u = den.predict(xt, 0.6, y, kind="score"), den.predict(xt, 0.6, null, kind="score")
    s_cr, s_ur = (den.predict(xt, 0.6, c, radius=1, kind="score") for c in (y, null))

    def gap(a, b):
        return float(((a - b).double().flatten(1).norm(dim=1) / 64).mean())

    assert got["eval/cond_gap/t=0.6"] == pytest.approx(gap(s_c, s_u), rel=1e-4)
    assert got["eval/loc_gap_cond_r1/t=0.6"] == pytest.approx(gap(s_cr, s_c), rel=1e-4)
    assert got["eval/loc_gap_uncond_r1/t=0.6"] == pytest.approx(gap(s_ur, s_u), rel=1e-4)
    assert got["eval/loc_gap_uncond_r1/t=0.6"] > 0


def test_fsdp_strategy_wraps_dit_blocks():
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from critsample.finetune.strategies import DiTFSDPStrategy

    s = DiTFSDPStrategy(activation_checkpointing=True)
    policy = s.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and BasicTransformerBlock in policy._module_classes
    assert s.kwargs["use_orig_params"] and s._activation_checkpointing_kwargs


def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(tiny_model, tmp_path):
    """`critsample fit` with strategy ddp (gloo), two CPU processes: ranks see different batches, end equal."""
    from safetensors.torch import load_file

    cfg = _config(tmp_path, tiny_model, max_steps=3)
    report = tmp_path / "sync.json"
    callbacks = json.dumps([{"class_path": "critsample.finetune.callbacks.RankSyncCheck",
                             "init_args": {"path": str(report)}}])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "critsample.cli", "fit", "--config", str(cfg), "--trainer.accelerator=cpu",
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false",
           f"--trainer.callbacks={callbacks}",
           "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0", "--ckpt_path=null",
           f"--model.export_dir={tmp_path / 'export'}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["world_size"] == 2 and r["global_step"] == [3, 3]
    assert r["max_abs_difference"] == 0.0 and r["param_checksums"][0] == r["param_checksums"][1]
    assert r["first_batch_checksums"][0] != r["first_batch_checksums"][1], "each rank must get its own shard of data"
    base = load_file(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    moved = sum(float((tuned[k].double() - v.double()).abs().sum()) for k, v in base.items())
    assert moved > 0, "training moved the weights"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of four random 16 x 16 RGB images (the tiny VAE maps 16 px to the tiny DiT's 8 x 8 latents)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _xl_config(root: Path, model: Path, data: dict, config: str) -> Path:
    """A shipped DiT-XL config on CPU with the tiny diffusers DiT (learned sigma, VAE) and tiny data."""
    cfg = yaml.safe_load((REPO / "configs/fit" / config).read_text())
    t = cfg["trainer"]
    t.update(accelerator="cpu", precision="32-true", max_steps=2, default_root_dir=str(root), val_check_interval=2,
             limit_val_batches=1, enable_progress_bar=False, num_sanity_val_steps=0)
    t["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "csv", "version": 0}}
    t["callbacks"] = [c for c in t["callbacks"] if not c["class_path"].endswith("LearningRateMonitor")]
    for c in t["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
        if c["class_path"].endswith("TrainingEvaluation"):
            c["init_args"].update(times=[0.5], num_images=2, samples_per_class=1, num_classes=2, steps=2)
    m = cfg["model"]
    m.update(init_from=str(model), export_dir=str(root / "export"), val_steps=2, warmup_steps=1)
    m["radius_schedule"].update(anneal_steps=0)
    cfg["data"]["init_args"].update(data)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_finetune_a_latent_dit_on_precomputed_latents_and_on_images(dit_folder, image_folder, tmp_path):
    """The DiT-XL recipes at toy size: encode once with the VAE, train on latents; or encode in the step."""
    from safetensors.torch import load_file

    import critsample
    from critsample.finetune.encode import encode_folder

    latents = tmp_path / "latents.pt"
    assert encode_folder(str(dit_folder), str(image_folder), str(latents), resolution=16, batch_size=4) == 8
    blob = torch.load(latents)
    assert blob["latents"].shape == (8, 4, 8, 8) and blob["labels"].tolist() == [0] * 4 + [1] * 4

    run = tmp_path / "latents"
    cfg = _xl_config(run, dit_folder, {"path": str(latents), "batch_size": 4, "num_workers": 0, "val_fraction": 0.25},
                     "dit-xl-latents.yaml")
    assert main(["fit", "--config", str(cfg)]) == 0
    export = critsample.load(str(run / "export"))
    assert export.vae is not None and export.learned_sigma, "the export keeps the VAE and the learned-sigma head"
    tuned = load_file(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(dit_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(tuned["proj_out_2.weight"], base["proj_out_2.weight"])

    run = tmp_path / "images"
    cfg = _xl_config(run, dit_folder, {"root": str(image_folder), "resolution": 16, "batch_size": 4, "num_workers": 0,
                                       "val_fraction": 0.25}, "dit-xl-imagefolder.yaml")
    assert main(["fit", "--config", str(cfg)]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"val/loss", "eval/cond_gap/t=0.5", "eval/loc_gap_cond_r2/t=0.5", "eval/adaptive_forwards"} <= logged
