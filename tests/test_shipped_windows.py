"""Bundled models ship their windows and certified plan: `critsample sample --adaptive` needs no --summary on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import critsample
from critsample import generate
from critsample import summary as summary_io
from critsample.cli import main
from critsample.models import REGISTRY, shipped_summary
from critsample.store import model_fingerprint

BUNDLED = [name for name, spec in REGISTRY.items() if spec.source == "package"]


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


def _summary(path, model_id, **extra):
    summary = {"schema": summary_io.SCHEMA, "model": "dit-digits", "model_id": model_id,
               "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": 2, **extra}
    path.write_text(json.dumps(summary))
    return path


def _sample(tmp_path, *extra) -> tuple[int, dict | None]:
    out = tmp_path / "s"
    code = main(["sample", "--model", "dit-digits", "--adaptive", "--class", "4", "--num", "2", "--steps", "6",
                 "--out", str(out), "--no-wandb", *extra])
    return code, json.loads((out / "run.json").read_text()) if code == 0 else None


def test_adaptive_sampling_takes_the_shipped_window_and_an_explicit_one_wins(tmp_path, monkeypatch, digits):
    shipped = _summary(tmp_path / "shipped.json", model_fingerprint(digits, "dit-digits"))
    monkeypatch.setattr(generate, "shipped_summary", lambda name: shipped if name == "dit-digits" else None)
    code, record = _sample(tmp_path)
    assert code == 0 and record["plan"]["name"].startswith("adaptive[0.2,0.5]")
    assert {s["radius"] for s in record["plan"]["steps"] if s["mode"] == "cond"} == {2}  # the shipped radius
    code, record = _sample(tmp_path, "--window", "0.1:0.3", "--radius", "1")
    assert code == 0 and record["plan"]["name"].startswith("adaptive[0.1,0.3]")
    own = _summary(tmp_path / "own.json", "x", critical_window={"t_start": 0.6, "t_end": 0.9})
    code, record = _sample(tmp_path, "--summary", str(own))
    assert code == 0 and record["plan"]["name"].startswith("adaptive[0.6,0.9]")


def test_shipped_window_of_other_weights_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    shipped = _summary(tmp_path / "shipped.json", "dit-digits@0000000000000000")
    monkeypatch.setattr(generate, "shipped_summary", lambda name: shipped)
    code, _ = _sample(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "measured on other weights" in err and len(err.strip().splitlines()) == 1


def test_a_model_that_ships_no_window_names_both_ways_to_give_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "shipped_summary", lambda name: None)
    code, _ = _sample(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "ships none" in err and "--summary" in err and "--window" in err


def test_only_bundled_models_have_shipped_summaries():
    assert shipped_summary("dit-xl") is None and shipped_summary("gmm-mixture") is None
    assert shipped_summary("/some/folder/dit-digits") is None


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_ship_windows_and_a_certified_plan_measured_on_their_weights(name, tmp_path):
    path = shipped_summary(name)
    assert path is not None, f"{name} ships no summary under critsample/assets/windows/{name}"
    summary = summary_io.read(path, name, require_window=False)
    model = critsample.load(name)
    assert summary["model_id"] == model_fingerprint(model, name)  # made on the shipped weights, not older ones
    found = summary_io.certified_plan(summary)
    assert found is not None and "quality" in found
    record = json.loads((path.parent / "record.json").read_text())
    assert any("critsample detect" in c for c in record["commands"]) and any("critsample tune" in c
                                                                               for c in record["commands"])
    out = tmp_path / name  # and the CLI uses the certified plan as it was measured, with no --summary
    steps = len(found["plan"]["steps"])
    code = main(["sample", "--model", name, "--adaptive", "--num", "2", "--steps", str(steps), "--out", str(out),
                 "--no-wandb"])
    assert code == 0
    used = json.loads((out / "run.json").read_text())["plan"]
    assert used["steps"] == found["plan"]["steps"]
    assert np.isfinite(np.load(out / "samples.npz")["images"]).all()


def test_a_shipped_plan_of_full_guidance_samples_full_guidance_and_says_so(tmp_path, monkeypatch, digits, caplog):
    from critsample import plans

    full = plans.full_guidance(digits, 6, 1.5).to_dict()
    shipped = _summary(tmp_path / "shipped.json", model_fingerprint(digits, "dit-digits"),
                       plan={"plan": full, "quality": {}, "confirmation": {"decision": "no candidate certified"}})
    monkeypatch.setattr(generate, "shipped_summary", lambda name: shipped)
    with caplog.at_level("WARNING", logger="critsample"):
        code, record = _sample(tmp_path)
    assert code == 0 and record["plan"]["steps"] == full["steps"]
    assert "certified no cheaper plan (no candidate certified)" in caplog.text
