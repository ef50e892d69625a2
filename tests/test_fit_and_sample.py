"""The training path (LightningCLI under `critsample fit`) and `critsample sample` on a model it exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from critsample.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.model.num_layers=1", "--model.model.num_attention_heads=2", "--model.model.attention_head_dim=8",
    "--data.init_args.batch_size=16", "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1",
    "--trainer.limit_val_batches=1", "--model.val_steps=2", "--trainer.enable_progress_bar=false",
]


def _fit(root: Path, max_steps: int) -> int:
    """The shipped dit-digits config with every path moved into ``root`` and a tiny model."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/fit/dit-digits.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    ckpt = cfg["trainer"]["callbacks"][1]["init_args"]
    ckpt.update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    cfg["model"]["export_dir"] = str(root / "export")
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg))
    return main(["fit", "--config", str(root / "fit.yaml"), *TINY, f"--trainer.max_steps={max_steps}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    assert _fit(root, 2) == 0
    return root


def test_fit_writes_checkpoint_export_and_offline_wandb(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert "EMAWeightAveraging" in ckpt["callbacks"] and "current_model_state" in ckpt
    assert (trained / "export" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    meta = json.loads((trained / "export" / "critsample.json").read_text())
    assert meta["num_classes"] == 10 and meta["null_class"] == 10
    assert list((trained / "wandb").glob("offline-run-*")), "W&B must run offline by default"


def test_export_holds_ema_weights(trained):
    """The exported transformer is the EMA average (Lightning's callback swaps it in at the end), not the raw
    weights."""
    from safetensors.torch import load_file

    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    exported = load_file(trained / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    name = "proj_out_2.weight"
    ema = ckpt["state_dict"][f"denoiser.transformer.{name}"]
    raw = ckpt["current_model_state"][f"denoiser.transformer.{name}"]
    assert torch.equal(exported[name], ema)
    assert not torch.equal(ema, raw)


def test_fit_resumes_from_last_checkpoint(tmp_path):
    assert _fit(tmp_path, 2) == 0
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert _fit(tmp_path, 4) == 0  # same command, larger budget: continues at step 2
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 4
    assert second["lr_schedulers"][0]["last_epoch"] == first["lr_schedulers"][0]["last_epoch"] + 2


def test_print_config_lists_the_module_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/fit/dit-digits.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "radius_schedule" in out and "DigitsDataModule" in out


def test_sample_cli_writes_grid_npz_and_run_record(trained, tmp_path):
    out = tmp_path / "s"
    common = ["sample", "--model", str(trained / "export"), "--class", "3", "--num", "5", "--steps", "3",
              "--seed", "0", "--wandb", "false", "--batch-size", "2"]
    args = [*common, "--out", str(out)]
    assert main(args) == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (5, 8, 8) and data["images"].min() >= 0 and data["images"].max() <= 1
    assert (data["labels"] == 3).all()
    run = json.loads((out / "run.json").read_text())
    assert run["cost"]["model_evaluations"] == 5 * 3 * 2  # guided: two forwards per step
    assert (out / "grid.png").exists()
    # same seed, fresh folder: same numbers; same folder: batches reused, nothing recomputed
    assert main([*common, "--out", str(tmp_path / "s2")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s2" / "samples.npz")["images"], data["images"])
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["cost"]["samples_computed_this_run"] == 0


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--class", "12"], "outside"),
        (["--prompt", "a cat"], "class-conditional"),
        (["--adaptive"], "needs a window"),
        (["--adaptive", "--window", "0.8:0.2", "--radius", "1"], "0 <= t0 < t1 <= 1"),
        (["--adaptive", "--window", "0.2:0.5", "--radius", "9"], "does not fit"),
        (["--sampler", "euler"], "does not fit"),
    ],
)
def test_sample_bad_input_exits_2(trained, tmp_path, capsys, extra, fragment):
    code = main(["sample", "--model", str(trained / "export"), "--num", "2", "--steps", "2",
                 "--out", str(tmp_path), "--wandb", "false", *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_model_exits_2(tmp_path, capsys):
    assert main(["sample", "--model", "no-such-model", "--out", str(tmp_path), "--wandb", "false"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("detect", "sample", "fit"))
