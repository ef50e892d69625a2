"""Reliability: corrupt stored work is detected and recomputed, pickled payloads are refused, and every user error is
one sentence with exit code 2 (issue: reliability and safety)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from test_detect_cli import SMALL
from test_probes import TinyClassifier, small_config, tiny_digit_dit

from critsample import detect
from critsample.cli import main
from critsample.errors import UserError
from critsample.store import Store, Unit


@pytest.fixture(scope="module")
def tiny():
    return tiny_digit_dit()


class Payload:
    """An object whose unpickling would run code (here: only a marker)."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def _units(folder):
    return sorted((folder / "units").rglob("*.npz"))


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty", "other-values"])
def test_a_corrupt_unit_is_reported_and_recomputed(tiny, tmp_path, caplog, damage):
    cfg = small_config(tmp_path, probes=["cond_gap", "locality_gap"])
    clean = detect.run(cfg, tiny, classifier=TinyClassifier())
    victim = _units(tmp_path)[0]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        victim.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:300]) + data[300:])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:  # a valid file with other values: only the checksum can tell
        with np.load(victim) as f:
            arrays = {k: f[k] * 2 for k in f.files}
        np.savez(victim, **arrays)
    with caplog.at_level(logging.WARNING, logger="critsample"):
        again = detect.run(cfg, tiny, classifier=TinyClassifier())
    lines = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert len(lines) == 1 and "computing the unit again" in lines[0], caplog.text
    assert again["cost"]["units_computed_this_run"] == 1
    assert again["windows"] == clean["windows"] and again["probes"] == clean["probes"]


def test_store_load_verifies_the_checksum(tmp_path):
    store = Store(tmp_path, "m", 0)
    u = store.unit("p", {"i": 1})
    store.save(u, {"a": np.arange(3.0)})
    assert np.array_equal(store.load(u)["a"], np.arange(3.0))
    meta = json.loads(store.path(u).with_suffix(".json").read_text())
    assert len(meta["sha256"]) == 64
    assert isinstance(u, Unit)


def test_pickled_data_is_refused_with_one_sentence(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"latents": torch.zeros(2, 1, 8, 8), "extra": Payload()}, bad)
    cfg = small_config(tmp_path / "run", probes=["cond_gap"], data=str(bad))
    with pytest.raises(UserError, match="holds pickled Python objects"):
        detect.run(cfg, tiny, classifier=TinyClassifier())
    assert "pickled code ran" not in capsys.readouterr().out
    objects = tmp_path / "objects.npz"
    np.savez(objects, latents=np.array([object()], dtype=object))
    with pytest.raises(UserError, match="pickled object arrays"):
        detect.run(small_config(tmp_path / "run2", probes=["cond_gap"], data=str(objects)), tiny, classifier=TinyClassifier())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_digit_dit().transformer.save_pretrained(folder / "transformer")
    (folder / "critsample.json").write_text(json.dumps({"num_classes": 10, "dataset": "digits"}))
    return folder


def _detect(folder, *extra):
    return ["detect", "--model", str(folder), "--preset", "fast", *SMALL, "--classifier", "test_probes:tiny_classifier", "--no-wandb", *extra]


@pytest.mark.parametrize("args, needle", [
    (["--out", "FILE"], "is an existing file, not a folder"),
    (["--out", "/proc/critsample-test"], "Cannot write to --out /proc/critsample-test"),
    (["--out", ""], "--out is empty"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_detect_input_is_one_sentence_before_any_work(folder, tmp_path, capsys, args, needle):
    args = [str(tmp_path / "a-file") if a == "FILE" else a for a in args]
    (tmp_path / "a-file").write_text("not a folder")
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    assert main(_detect(folder, *out, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.rglob("*.npz"))  # nothing was computed


def test_the_readme_list_syntax_and_the_json_one_both_work(folder, tmp_path, capsys):
    for probes in (["cond_gap", "locality_gap"], ["[cond_gap, locality_gap]"]):
        assert main(_detect(folder, "--out", str(tmp_path / "r"), "--dry-run", "--probes", *probes)) == 0
        text = capsys.readouterr().out
        assert "probes cond_gap, locality_gap" in text and "window_cond" not in text
    assert main(_detect(folder, "--out", str(tmp_path / "r"), "--dry-run", "--gaps.radii", "1", "2")) == 0


def test_an_interruption_exits_130_and_says_how_to_resume(folder, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(detect, "run", interrupted)
    assert main(_detect(folder, "--out", str(tmp_path / "r"))) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["--radius", "1.5"], "--radius expects an integer or nothing (null); got '1.5'."),
    (["--guidance", "nan"], "--guidance expects a number"),
    (["--class", "3.5"], "--classes expects an integer; got '3.5'."),
    (["--num", "many"], "--num expects an integer; got 'many'."),
])
def test_type_errors_name_the_option_and_the_value(tmp_path, capsys, args, needle):
    assert main(["sample", "--model", "dit-digits", "--out", str(tmp_path), "--no-wandb", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command", ["detect", "sample", "fit"])
def test_a_malformed_config_file_names_the_file_and_line(tmp_path, capsys, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nprobes: [cond_gap, locality_gap\n")
    assert main([command, "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--config {bad} line 3, column 1" in err and len(err.splitlines()) == 1, err


def test_fit_config_errors_are_one_sentence_not_the_usage(capsys):
    assert main(["fit", "--config", "configs/fit/dit-digits.yaml", "--model.nonsense", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "critsample: error: unrecognized arguments: --model.nonsense 3", err


def test_summaries_with_bad_fields_are_refused(tmp_path):
    from critsample import summary

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"critical_window": {"t_start": 0.2, "t_end": 0.5}}))
    with pytest.raises(UserError, match="no 'model' key"):
        summary.read(path, "dit-digits")
    path.write_text(json.dumps({"model": "m", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": "two"}))
    with pytest.raises(UserError, match="suggested_radius must be an integer >= 0 or null; got 'two'"):
        summary.suggested_radius(summary.read(path, "m"))
