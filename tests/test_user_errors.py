"""Every user error of the campaign in issue 21 is one sentence and exit code 2, for sample, detect, tune and fit alike;
options that need no model are refused before any model is loaded (tiny sizes throughout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL, tiny_digit_dit

import critsample.detect.run as detect_run
from critsample import generate, models, tune
from critsample.cli import main
from critsample.errors import UserError
from critsample.options import TimeWindow, is_global, numpy_seed, torch_seed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_digit_dit().transformer.save_pretrained(folder / "transformer")
    (folder / "critsample.json").write_text(json.dumps({"num_classes": 10, "dataset": "digits"}))
    return folder


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error must come from the options alone."""

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the options were checked")

    for module in (models, generate, tune, detect_run):  # imported above: none binds the patched load at import
        monkeypatch.setattr(module, "load", refuse, raising=False)


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    body = err.removeprefix("critsample: error: ")
    assert body.endswith((".", ")")), err
    return body


def _sample(tmp_path, *extra):
    return ["sample", "--model", "dit-digits", "--num", "2", "--steps", "2", "--batch_size", "2", "--no-wandb",
            "--out", str(tmp_path / "s"), *extra]


def _detect(folder, tmp_path, *extra):
    return ["detect", "--model", str(folder), "--preset", "fast", *SMALL, "--classifier", "conftest:tiny_classifier",
            "--no-wandb", "--out", str(tmp_path / "d"), *extra]


def _summary(tmp_path, t0=0.3, t1=0.6) -> Path:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"model": "dit-digits", "critical_window": {"t_start": t0, "t_end": t1},
                                "suggested_radius": 2}))
    return path


def _tune(tmp_path, *extra):
    return ["tune", "--summary", str(_summary(tmp_path)), "--num", "2", "--n_boot", "2", "--steps", "2", "--out",
            str(tmp_path / "t"), *extra]


# -- detect checks what sample checks --------------------------------------------------------------------------------


def test_detect_refuses_a_negative_guidance_before_loading(folder, tmp_path, capsys, no_load):
    assert main(_detect(folder, tmp_path, "--guidance", "-2")) == 2
    assert "--guidance must be a finite number >= 0" in one_sentence(capsys)


def test_detect_refuses_an_empty_prompt_on_a_class_model(folder, tmp_path, capsys):
    assert main(_detect(folder, tmp_path, "--prompt", "")) == 2
    assert "is class-conditional: use --class N, not a text prompt" in one_sentence(capsys)
    assert not list(tmp_path.rglob("*.npz"))


@pytest.mark.parametrize("seed, probe", [(-3, "cond_gap"), (10**30, "window_cond")])
def test_detect_takes_any_integer_seed_like_sample(folder, tmp_path, seed, probe):
    assert main(_detect(folder, tmp_path, "--seed", str(seed), "--probes", probe)) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["seed"] == seed


def test_numpy_seeds_keep_non_negative_seeds_and_separate_negative_ones():
    assert [numpy_seed(s) for s in (0, 1, 7, 10**30)] == [0, 1, 7, 10**30]
    mapped = {numpy_seed(s) for s in range(-50, 0)}
    assert len(mapped) == 50 and all(m >= 0 for m in mapped)
    assert [torch_seed(s) for s in (-3, 0, 2**64 - 1)] == [-3, 0, 2**64 - 1] and 0 <= torch_seed(10**30) < 2**63


# -- list and window syntax with negative numbers ----------------------------------------------------------------------


def test_list_options_take_negative_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*_tune(tmp_path, "--shifts", "-0.25", "0", "--scales", "0.5", "1", "--radii", "1", "2"),
              "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["shifts"] == [-0.25, 0.0] and cfg["scales"] == [0.5, 1.0] and cfg["radii"] == [1, 2]


def test_a_window_starting_with_a_minus_is_parsed_and_refused_before_loading(tmp_path, capsys, no_load):
    assert main(_sample(tmp_path, "--adaptive", "--window", "-0.2:0.5", "--radius", "1")) == 2
    assert one_sentence(capsys) == "--window -0.2:0.5 needs 0 <= t0 < t1 <= 1 (t: 0 = clean, 1 = noise)."
    assert main(_sample(tmp_path, "--interval", "0.5")) == 2
    assert "--interval is written t0:t1" in one_sentence(capsys)


def test_the_time_window_value_type():
    w = TimeWindow.parse("0.2:0.5")
    assert w == (0.2, 0.5) and str(w) == "0.2:0.5" and 0.2 in w and 0.5 in w and 0.51 not in w
    assert w.contains(torch.tensor([0.1, 0.3])).tolist() == [False, True]
    for bad in ("0.5:0.2", "-0.1:0.3", "0.3", "a:b", "0.1:nan"):
        with pytest.raises(UserError):
            TimeWindow.parse(bad)


def test_one_global_radius_rule():
    assert is_global(None, (4, 4)) and is_global(3, (4, 4)) and is_global(3, (2, 4)) and not is_global(2, (4, 4))
    assert is_global(torch.tensor([3, 5]), (4, 4)) and not is_global([3, 1], 4)


# -- tune: a search that keeps no candidate -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--shifts", "100"], ["--scales", "1000"]])
def test_a_tune_search_left_without_candidates_is_an_error(tmp_path, capsys, args):
    assert main(_tune(tmp_path, *args)) == 2
    assert "leave no plan to certify" in one_sentence(capsys)
    assert "plan" not in json.loads(_summary(tmp_path).read_text())


# -- more steps than the model has ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "tune", "detect-gaps", "detect-fb", "detect-windows"])
def test_more_steps_than_the_model_has_is_one_sentence(folder, tmp_path, capsys, command):
    argv = {
        "sample": _sample(tmp_path, "--steps", "100000"),
        "tune": _tune(tmp_path, "--steps", "100000"),
        "detect-gaps": _detect(folder, tmp_path, "--gaps.steps", "100000"),
        "detect-fb": _detect(folder, tmp_path, "--fb.steps", "100000"),
        "detect-windows": _detect(folder, tmp_path, "--windows.steps", "100000"),
    }[command]
    assert main(argv) == 2
    assert "steps 100000 is more than" in one_sentence(capsys)
    assert not list(tmp_path.rglob("*.npz"))


# -- devices ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "detect", "tune"])
@pytest.mark.parametrize("device", ["mps", "cuda", "tpu"])
def test_an_unusable_device_is_one_sentence_before_loading(folder, tmp_path, capsys, no_load, command, device):
    if device == "cuda" and torch.cuda.is_available():
        device = "cuda:99"
    argv = {"sample": _sample, "tune": _tune}[command](tmp_path) if command != "detect" else _detect(folder, tmp_path)
    assert main([*argv, "--device", device]) == 2
    assert f"device {device}" in one_sentence(capsys)


# -- model folders ----------------------------------------------------------------------------------------------------


def test_a_folder_whose_config_does_not_match_its_weights(folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "transformer").mkdir(parents=True)
    for f in (folder / "transformer").iterdir():
        (bad / "transformer" / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "transformer" / "config.json").read_text())
    config["num_layers"] = config["num_layers"] + 2  # the weights hold fewer layers than the config says
    (bad / "transformer" / "config.json").write_text(json.dumps(config))
    assert main(_sample(tmp_path, "--model", str(bad))) == 2
    err = one_sentence(capsys)
    assert str(bad / "transformer") in err and "do not match" in err


@pytest.mark.parametrize("part",
                         ["transformer/config.json", "critsample.json", "scheduler/scheduler_config.json",
                          "model_index.json"])
def test_a_config_file_that_is_not_json(folder, tmp_path, capsys, part):
    bad = tmp_path / "bad"
    (bad / "transformer").mkdir(parents=True)
    for f in (folder / "transformer").iterdir():
        (bad / "transformer" / f.name).write_bytes(f.read_bytes())
    (bad / part).parent.mkdir(parents=True, exist_ok=True)
    (bad / part).write_text("{not json")
    assert main(_sample(tmp_path, "--model", str(bad))) == 2
    err = one_sentence(capsys)
    assert f"{bad / part} is not valid JSON" in err


def test_an_empty_model_name_says_so(tmp_path, capsys, no_load):
    assert main(_sample(tmp_path, "--model", "")) == 2
    assert one_sentence(capsys).startswith("--model is empty")


# -- detect options -------------------------------------------------------------------------------------------------


def test_generated_forward_backward_with_no_gap_trajectories(folder, tmp_path, capsys):
    assert main(_detect(folder, tmp_path, "--fb.source", "generated", "--gaps.trajectories", "--probes", "cond_gap",
                        "forward_backward")) == 2
    assert one_sentence(capsys).startswith("--gaps.trajectories is empty")


# -- cosmetic ------------------------------------------------------------------------------------------------------


def test_oracles_print_no_nan_flops(tmp_path, capsys):
    assert main(["sample", "--model", "gmm-mixture", "--num", "2", "--steps", "2", "--no-wandb", "--out",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "nan GFLOPs" not in out and "analytic model: no transformer FLOPs" in out


# -- fit ------------------------------------------------------------------------------------------------------------

TINY_FIT = [
    "--model.model.num_layers=1", "--model.model.num_attention_heads=2", "--model.model.attention_head_dim=8",
    "--data.init_args.batch_size=16", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
    "--model.val_steps=2", "--trainer.enable_progress_bar=false", "--trainer.max_steps=1", "--trainer.logger=false",
]


def _fit_config(root: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs/fit/dit-digits.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(root / "checkpoints")
    cfg["model"]["export_dir"] = str(root / "export")
    cfg["ckpt_path"] = None
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg))
    return root / "fit.yaml"


def _pickled_ckpt(root: Path) -> Path:
    path = root / "pickled.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": {}, "payload": Payload()}, path)
    return path


@pytest.mark.parametrize("args, needle", [
    (["--model.class_dropout", "1.5"], "class_dropout"),
    (["--model.num_classes", "0"], "num_classes"),
    (["--model.model.sample_size", "7"], "sample_size"),
    (["--model.lr", "-1"], "--model.lr"),
    (["--trainer.max_steps", "-5"], "max_steps"),
    (["--trainer.accelerator", "mps"], "accelerator mps"),
    (["--trainer.accelerator", "cuda"], "accelerator cuda"),
    (["--ckpt_path", "MISSING"], "--ckpt_path"),
    (["--ckpt_path", "PICKLED"], "--ckpt_path"),
    (["--data.init_args.batch_size", "0"], "batch_size"),
    (["--model.export_dir", "FILE"], "export_dir"),
    (["--model.export_dir", "READONLY"], "export_dir"),
    (["--model.model.num_layers", "-1"], "num_layers"),
])
def test_fit_user_errors_are_one_sentence(tmp_path, capsys, monkeypatch, args, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = _fit_config(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    names = {"MISSING": str(tmp_path / "missing.ckpt"), "PICKLED": str(_pickled_ckpt(tmp_path)),
             "FILE": str(tmp_path / "a-file"),
             "READONLY": str(readonly / "export")}
    if "READONLY" in args:
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):  # chmod cannot show a read-only folder to root
            if dir is not None and readonly.resolve() in (Path(dir).resolve(), *Path(dir).resolve().parents):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        os.chmod(readonly, 0o555)
    args = [names.get(a, a) for a in args]
    try:
        assert main(["fit", "--config", str(config), *TINY_FIT, *args]) == 2
    finally:
        os.chmod(readonly, 0o755)
    err = one_sentence(capsys)
    assert needle in err, err
    assert "pickled code ran" not in capsys.readouterr().out
    assert not (tmp_path / "export" / "transformer").exists()
