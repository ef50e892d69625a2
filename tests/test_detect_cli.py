"""``critsample detect`` driven as a user would: end to end at reduced size, resume, dry run, configs, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CLASSIFIER, SMALL

from critsample.cli import main
from critsample.detect import DetectConfig

ROOT = Path(__file__).resolve().parents[1]
def _detect(folder, out, *extra) -> list[str]:
    return ["detect", "--model", str(folder), "--preset", "fast", *SMALL, "--classifier", CLASSIFIER, "--out", str(out),
            *extra]


def test_end_to_end_then_resume(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main(_detect(tiny_folder, out, "--seed", "1")) == 0
    printed = capsys.readouterr().out
    assert "critical window" in printed and "summary.json" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == str(tiny_folder) and s["schedule"]["kind"] == "ddpm" and "t_convention" in s["schedule"]
    # a random network has no transition: every window is invalid with its reason, so there is no critical window
    # and every concurrence test says "no window" (never "concurrent")
    cw = s["critical_window"]
    assert cw is None and "critical_window" in s
    assert set(s["windows"]) >= {"cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality"}
    assert all(not w["valid"] and w["reason"] for w in s["windows"].values()), s["windows"]
    assert {v["outcome"] for v in s["concurrence"].values()} == {"no window"}
    assert set(s["probes"]) == {"cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality"}
    # the auto radius (1) and the primary radius (2) are scanned; a random model shows no contrast between them
    assert s["suggested_radius"] is None and "no contrast" in s["suggested_radius_reason"]
    assert s["verdict"] == s["concurrence"]["primary"]["verdict"] and s["concurrence"]["primary"]["role"] == "primary"
    # consumers of the summary
    from critsample import summary
    from critsample.errors import UserError
    from critsample.finetune.schedules import window_from_summary

    with pytest.raises(UserError, match="none was detected"):
        window_from_summary(out / "summary.json")
    assert summary.read(out / "summary.json", require_window=False)["critical_window"] is None
    # report, figures, arrays
    report = (out / "report.md").read_text()
    for name, rel in s["outputs"]["figures"].items():
        assert (out / rel).exists() and f"]({rel})" in report, name
    assert {"cond_gap", "forward_backward", "window_cond", "window_cond_strips",
            "locality_heatmap_train"} <= set(s["outputs"]["figures"])
    gaps = np.load(out / "arrays" / "gaps.npz")
    assert gaps["train__cond_gap_score"].shape == (2, 4) and gaps["train__loc_gap_uncond_score"].shape == (2, 4, 2)
    fb = np.load(out / "arrays" / "forward_backward.npz")
    assert fb["error"].shape == (2, 3, 3)  # (global + r=1, samples, t)
    assert list((out / "wandb").glob("offline-run-*"))
    # started again: every unit is loaded, nothing recomputed, the same numbers
    assert main(_detect(tiny_folder, out, "--seed", "1", "--no-wandb")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["cost"]["units_computed_this_run"] == 0 and again["cost"]["units_loaded"] == s["cost"]["units"]
    assert again["windows"] == s["windows"] and again["critical_window"] == cw


def test_dry_run_counts_and_writes_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_detect(tiny_folder, out, "--dry-run", "--probes", "[cond_gap, locality_gap]")) == 0
    text = capsys.readouterr().out
    # 3 trajectories x 2 samples x 4 times x 2 (1 + 2 radii) rows, plus sampling: 4 steps x (2 guided + 1 uncond) x 2
    assert re.search(r"gaps\s+3 units\s+168 model evaluations \(96 local\)", text), text
    assert "total: 168 model evaluations" in text and "per second" in text
    assert not (out / "units").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--probes", "[cond_gap, nonsense]"], "Unknown probe 'nonsense'"),
    (["--gaps.radii", "[9]"], "Radius 9 is out of range"),
    (["--windows.radii", "[-1]"], "Radius -1 is out of range"),
    (["--windows.width", "1.5"], "window width must lie in (0, 1]"),
    (["--fb.t_max", "1.2"], "0 <= t_min <= t_max <= 1"),
    (["--prompt", "a dog"], "class-conditional: use --class N, not a text prompt"),
    (["--class", "10"], "Class 10 is outside"),
    (["--preset", "huge"], "Unknown preset 'huge'"),
    (["--gaps.samples", "many"], "gaps.samples"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(tiny_folder, tmp_path, capsys, args, needle):
    assert main(_detect(tiny_folder, tmp_path / "bad", "--dry-run", *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and needle in err and len(err.splitlines()) == 1, err


def test_unknown_model_exit_code_2(capsys):
    assert main(["detect", "--model", "no-such-model", "--dry-run"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_config_files_are_the_presets(preset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["detect", "--preset", preset, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load((ROOT / "configs" / "detect" / f"{preset}.yaml").read_text())
    # and a config file round-trips to the same options (and to the library's preset)
    with pytest.raises(SystemExit):
        main(["detect", "--config", str(ROOT / "configs" / "detect" / f"{preset}.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == preset and cfg["gaps"]["steps"] == printed["gaps"]["steps"]
    assert cfg["windows"]["samples"] == printed["windows"]["samples"]
    lib = DetectConfig.from_preset(preset)
    assert asdict(lib.gaps) == printed["gaps"] and asdict(lib.fb) == printed["fb"]
    assert asdict(lib.windows) == printed["windows"]


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(tiny_folder, tmp_path):
    """Lightning Fabric DDP on CPU (gloo), 2 processes: units split round-robin, rank 0 writes the same summary."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled"}
    args = ["--probes", "[cond_gap, window_cond]", "--device", "cpu", "--no-wandb", "--threads", "1"]
    for out, devices in ((tmp_path / "ddp", "2"), (tmp_path / "one", "1")):
        cmd = [sys.executable, "-m", "critsample.cli", *_detect(tiny_folder, out, *args, "--devices", devices)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "one"))
    assert a["windows"] == b["windows"]
    assert a["cost"]["units_computed_this_run"] == a["cost"]["units"]  # counted over both ranks
