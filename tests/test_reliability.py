"""Reliability: corrupt stored work is detected and recomputed, pickled payloads are refused, and every user error is
one sentence with exit code 2 (issue: reliability and safety)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import CLASSIFIER, SMALL, TinyClassifier, small_config

from critsample import detect
from critsample.cli import main
from critsample.errors import UserError
from critsample.store import Store, Unit


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
        detect.run(small_config(tmp_path / "run2", probes=["cond_gap"], data=str(objects)), tiny,
                   classifier=TinyClassifier())


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


def _detect(folder, *extra):
    return ["detect", "--model", str(folder), "--preset", "fast", *SMALL, "--classifier", CLASSIFIER, "--no-wandb",
            *extra]


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
    path.write_text(json.dumps({"model": "m", "critical_window": {"t_start": 0.2, "t_end": 0.5},
                                "suggested_radius": "two"}))
    with pytest.raises(UserError, match="suggested_radius must be an integer >= 0 or null; got 'two'"):
        summary.suggested_radius(summary.read(path, "m"))


# ===================================================================================================================
# Issue 14, item by item. Tests above or in other files that already cover an item are listed in docs/reliability.md.


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _sample(tmp_path, *extra):
    return ["sample", "--model", "dit-digits", "--num", "4", "--steps", "2", "--batch_size", "2", "--no-wandb", *extra]


# -- 1. no pickle from files a user did not write --------------------------------------------------------------------


def test_user_tensor_files_load_weights_only_even_when_torch_is_told_otherwise(tmp_path, monkeypatch, capsys):
    from critsample.tensorfiles import load_tensors

    # flips torch.load's default, not an explicit weights_only=True
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    bad = tmp_path / "bad.pt"
    torch.save({"latents": torch.zeros(2), "extra": Payload()}, bad)
    with pytest.raises(UserError, match=f"--data {bad} holds pickled Python objects"):
        load_tensors(bad)
    assert "pickled code ran" not in capsys.readouterr().out


def test_no_loader_of_pickles_in_critsample_and_a_torch_floor_with_safe_defaults():
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in (root / "critsample").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load" and kw.get("weights_only") != "True":
                offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if kw.get("allow_pickle") == "True" or name in ("pickle.load", "pickle.loads"):
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert not offenders, offenders
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (root / "pyproject.toml").read_text())
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 6)  # torch.load defaults to weights_only from 2.6


def test_latents_datamodule_refuses_a_pickled_latents_file(tmp_path, capsys):
    from critsample.finetune.data import LatentsDataModule

    good, bad = tmp_path / "latents.pt", tmp_path / "pickled.pt"
    torch.save({"latents": torch.zeros(10, 4, 2, 2, dtype=torch.float16), "labels": torch.arange(10)}, good)
    torch.save({"latents": torch.zeros(10, 4, 2, 2), "labels": torch.arange(10), "extra": Payload()}, bad)
    dm = LatentsDataModule(str(good), batch_size=2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 10
    with pytest.raises(UserError, match=f"LatentsDataModule path {bad} holds pickled Python objects"):
        LatentsDataModule(str(bad)).setup()
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_pickled_data_file_is_one_sentence_and_exit_2_on_the_command_line(folder, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"latents": torch.zeros(2, 1, 8, 8), "extra": Payload()}, bad)
    assert main(_detect(folder, "--out", str(tmp_path / "run"), "--probes", "cond_gap", "--data", str(bad))) == 2
    err = _one_line_error(capsys)
    assert f"--data {bad} holds pickled Python objects" in err and "pickled code ran" not in err


# -- 3. downloads: announced with their size, HF_HUB_OFFLINE honoured, one try ---------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every way to the network records its use and fails; returns the list of uses."""
    import socket

    import httpx2
    import huggingface_hub

    used = []

    def refuse(name):
        def f(*args, **kw):
            used.append(name)
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
        return f

    for method in ("model_info", "repo_info", "list_repo_tree", "get_paths_info"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, refuse(method))
    monkeypatch.setattr(httpx2.Client, "send", refuse("httpx2.send"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    return used


def _hub(monkeypatch, tmp_path, offline: bool):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)  # huggingface_hub reads the variable once, at import
    # this test's cache, whatever the machine holds
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def _cached_snapshot(cache, repo_id: str):
    """A snapshot in the Hugging Face cache layout, as `hf download` leaves it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    return snap


@pytest.mark.parametrize("what", ["dit-xl", "resnet-50", "cli"])
def test_offline_and_not_cached_is_one_sentence_at_once_without_a_network_attempt(tmp_path, monkeypatch, capsys,
                                                                                  no_network, what):
    import time

    import critsample
    from critsample.models.classifiers import load_classifier

    _hub(monkeypatch, tmp_path, offline=True)
    start = time.perf_counter()
    if what == "cli":
        assert main(["sample", "--model", "sd3-medium", "--prompt", "a cat", "--out", str(tmp_path / "o"),
                     "--no-wandb"]) == 2
        msg = _one_line_error(capsys)
        repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    else:
        with pytest.raises(UserError) as e:
            critsample.load("dit-xl") if what == "dit-xl" else load_classifier("resnet-50")
        msg = str(e.value)
        repo = "facebook/DiT-XL-2-256" if what == "dit-xl" else "microsoft/resnet-50"
    assert time.perf_counter() - start < 5
    assert no_network == []
    assert f"({repo})" in msg and "HF_HUB_OFFLINE is set" in msg and f"`hf download {repo}`" in msg
    assert ("--model /path/to/folder" if what != "resnet-50" else "--classifier module.path:callable") in msg
    assert msg.count(". ") == 0 and "\n" not in msg  # one sentence


def test_a_cached_model_loads_with_no_network_attempt_and_no_notice(tmp_path, monkeypatch, capsys, no_network):
    from conftest import tiny_dit_transformer
    from transformers import ResNetConfig, ResNetForImageClassification

    import critsample
    from critsample.models.classifiers import load_classifier

    cache = _hub(monkeypatch, tmp_path, offline=False)  # the network is allowed, and must not be used
    snap = _cached_snapshot(cache, "facebook/DiT-XL-2-256")
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    tiny_dit_transformer().save_pretrained(snap / "transformer")
    snap = _cached_snapshot(cache, "microsoft/resnet-50")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=10)).save_pretrained(snap)
    (snap / "preprocessor_config.json").write_text(json.dumps({"crop_pct": 0.875, "size": {"shortest_edge": 224}}))

    model = critsample.load("dit-xl")
    clf = load_classifier("resnet-50")
    assert model.transformer.config.num_layers == 2 and clf.num_classes == 10
    assert no_network == [] and capsys.readouterr().err == ""


def _fake_download(monkeypatch, tmp_path, capsys, events, info):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def model_info(self, repo_id, **kw):
        events.append(("model_info", repo_id, kw.get("files_metadata")))
        if isinstance(info, Exception):
            raise info
        return info

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        # what was printed before the fetch
        events.append(("download", repo_id, allow_patterns, capsys.readouterr().err))
        return str(tmp_path / "downloaded")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_a_download_is_announced_with_its_files_and_size_before_it_starts(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from huggingface_hub.hf_api import RepoSibling

    from critsample.models import _PATTERNS, REGISTRY, fetch

    _hub(monkeypatch, tmp_path, offline=False)
    siblings = [RepoSibling("model_index.json", 300), RepoSibling("README.md", 5_000),
                RepoSibling("DiT-XL-2-256.pt", 2_700_000_000),
                RepoSibling("transformer/config.json", 700),
                RepoSibling("transformer/diffusion_pytorch_model.safetensors", 2_700_000_000),
                RepoSibling("vae/config.json", 600),
                RepoSibling("vae/diffusion_pytorch_model.safetensors", 335_000_000),
                RepoSibling("scheduler/scheduler_config.json", 400)]
    events = []
    _fake_download(monkeypatch, tmp_path, capsys, events, SimpleNamespace(siblings=siblings))
    assert fetch(REGISTRY["dit-xl"]) == tmp_path / "downloaded"
    assert [e[0] for e in events] == ["model_info", "download"] and events[0][2] is True
    _, repo, patterns, printed = events[1]
    assert repo == "facebook/DiT-XL-2-256" and patterns == _PATTERNS["dit"]
    assert "downloading 6 files of facebook/DiT-XL-2-256, 3.0 GB in all" in printed  # not README.md nor the 2.7 GB .pt
    assert "transformer/ (2 files, 2.7 GB)" in printed and "vae/ (2 files, 335.0 MB)" in printed
    assert "HF_HUB_OFFLINE=1" in printed


def test_a_download_of_unknown_size_says_so_before_it_starts(tmp_path, monkeypatch, capsys):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from critsample.models.classifiers import HF_CLASSIFIER_FILES
    from critsample.models.hub import fetch_snapshot

    _hub(monkeypatch, tmp_path, offline=False)
    events = []
    answer = httpx2.Response(503, request=httpx2.Request("GET", "https://huggingface.co/api/models/microsoft/resnet-50"))
    _fake_download(monkeypatch, tmp_path, capsys, events, HfHubHTTPError("503 Service Unavailable", response=answer))
    fetch_snapshot("microsoft/resnet-50", HF_CLASSIFIER_FILES, what="Weights", alternative="no")
    assert [e[0] for e in events] == ["model_info", "download"]
    assert "microsoft/resnet-50" in events[1][3] and "size unknown" in events[1][3]


@pytest.mark.parametrize("what", ["dit-xl", "resnet-50"])
def test_an_unreachable_hub_fails_fast_after_one_try(tmp_path, monkeypatch, capsys, no_network, what):
    import time

    import huggingface_hub

    import critsample
    from critsample.models.classifiers import load_classifier

    _hub(monkeypatch, tmp_path, offline=False)
    downloads = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: real(*a, **kw) if kw.get("local_files_only") else downloads.append(a))
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        critsample.load("dit-xl") if what == "dit-xl" else load_classifier("resnet-50")
    assert time.perf_counter() - start < 5
    assert no_network == ["model_info"] and downloads == []  # one metadata request, no download attempt
    repo = "facebook/DiT-XL-2-256" if what == "dit-xl" else "microsoft/resnet-50"
    msg = str(e.value)
    assert f"({repo})" in msg and "the Hub cannot be reached (ConnectError)" in msg and f"`hf download {repo}`" in msg
    assert capsys.readouterr().err == ""  # nothing announced: nothing is fetched


# -- 4. a changed model never reuses stored work ---------------------------------------------------------------------


def test_detect_recomputes_every_unit_for_changed_weights_of_the_same_name(tiny, tmp_path):
    import copy

    cfg = small_config(tmp_path, probes=["cond_gap"])
    first = detect.run(cfg, tiny, classifier=TinyClassifier())
    retrained = copy.deepcopy(tiny)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    assert retrained.name == tiny.name
    again = detect.run(cfg, retrained, classifier=TinyClassifier())
    assert again["cost"]["units_computed_this_run"] == first["cost"]["units_computed_this_run"] > 0
    assert detect.run(cfg, tiny, classifier=TinyClassifier())["cost"]["units_computed_this_run"] == 0


# -- 5. corrupt stored sample batches ---------------------------------------------------------------------------------


def test_a_corrupt_sample_batch_is_reported_and_recomputed(tmp_path, caplog):
    import critsample.generate as generate

    cfg = generate.SampleConfig(num=4, batch_size=2, steps=2, out=str(tmp_path), wandb=False)
    generate.run(cfg)
    clean = np.load(tmp_path / "samples.npz")["images"]
    victim = sorted((tmp_path / ".batches").rglob("*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="critsample"):
        record = generate.run(cfg)
    lines = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert len(lines) == 1 and "computing the unit again" in lines[0], caplog.text
    assert record["cost"]["samples_computed_this_run"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["images"], clean)


# -- 7, 8, 10. sample: bad input is one sentence and exit 2, before any work -----------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--out", "FILE"], "is an existing file, not a folder"),
    (["--out", "/proc/critsample-test"], "Cannot write to --out /proc/critsample-test"),
    (["--out", ""], "--out is empty"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--adaptive", "--summary", "EMPTY", "--radius", "1"], "No summary at EMPTY/summary.json; run `critsample detect"),
    (["--adaptive", "--summary", "NOMODEL"], "does not say which model it was measured on (no 'model' key)"),
    (["--summary", "EMPTY"], "--summary applies only to --adaptive plans"),
    (["--window", "0.2:0.5", "--radius", "1"], "--window, --radius apply only to --adaptive plans"),
    (["--adaptive", "--window", "0.2:0.5", "--radius", "1", "--interval", "0.2:0.5"],
     "are two different plans; choose one"),
    (["--class"], "--class needs at least one value"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--num", "0"], "--num must be an integer >= 1"),
    (["--seed", "1.5"], "--seed expects an integer; got '1.5'."),
])
def test_bad_sample_input_is_one_sentence_before_any_work(tmp_path, capsys, args, needle):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nomodel.json").write_text(json.dumps({"critical_window": {"t_start": 0.2, "t_end": 0.5},
                                                       "suggested_radius": 1}))
    names = {"FILE": tmp_path / "a-file", "EMPTY": tmp_path / "empty", "NOMODEL": tmp_path / "nomodel.json"}
    args = [str(names[a]) if a in names else a for a in args]
    needle = needle.replace("EMPTY", str(names["EMPTY"]))
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    assert main(_sample(tmp_path, *out, *args)) == 2
    err = _one_line_error(capsys)
    assert needle in err, err
    assert not list(tmp_path.rglob("*.npz"))


@pytest.mark.parametrize("command", ["detect", "sample"])
def test_an_unwritable_out_is_one_sentence_before_any_work(folder, tmp_path, capsys, monkeypatch, command):
    import tempfile
    from pathlib import Path

    real = tempfile.mkstemp
    locked = tmp_path / "locked"

    def mkstemp(*args, dir=None, **kw):  # a folder without write permission (chmod cannot show it to root)
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    argv = _detect(folder, "--out", str(locked)) if command == "detect" else _sample(tmp_path, "--out", str(locked))
    assert main(argv) == 2
    assert f"Cannot write to --out {locked}: Permission denied; choose a writable folder." in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.npz"))


def test_a_huge_or_negative_seed_is_a_seed(tmp_path, capsys):
    images = {}
    for seed in ("0", str(10**30), "-7"):
        assert main(_sample(tmp_path, "--num", "2", "--out", str(tmp_path / seed), "--seed", seed)) == 0
        images[seed] = np.load(tmp_path / seed / "samples.npz")["images"]
    assert not np.array_equal(images["0"], images[str(10**30)]) and not np.array_equal(images["0"], images["-7"])


def test_the_readme_list_syntax_works_for_sample_too(tmp_path):
    for i, classes in enumerate((["1", "2"], ["[1, 2]"])):
        assert main(_sample(tmp_path, "--out", str(tmp_path / str(i)), "--class", *classes)) == 0
        assert np.load(tmp_path / str(i) / "samples.npz")["labels"].tolist() == [1, 2, 1, 2]


def test_a_window_or_radius_replacing_the_summarys_is_said(tmp_path, caplog):
    import critsample.generate as generate

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.5},
                                "suggested_radius": 1}))
    cfg = generate.SampleConfig(num=2, steps=4, adaptive=True, summary=str(path), out=str(tmp_path / "a"), wandb=False)
    with caplog.at_level(logging.WARNING, logger="critsample"):
        generate.run(cfg)
    assert not caplog.records  # the summary's window and radius, silently: nothing replaced
    cfg.window, cfg.radius, cfg.out = "0.3:0.6", 2, str(tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="critsample"):
        record = generate.run(cfg)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"--window 0.3:0.6 replaces the critical window 0.2:0.5 of {path}.",
                    f"--radius 2 replaces the suggested radius 1 of {path}."]
    assert record["plan_description"].startswith("adaptive[0.3,0.6](") and "r=2)" in record["plan_description"]


# -- 11. max_batch (exit 130 and cost over ranks: see docs/reliability.md) ---------------------------------------------


def test_max_batch_moves_numbers_only_within_the_documented_tolerance(tiny, tmp_path):
    """Unit keys leave out --max_batch (rows per forward): the same unit computed in other chunks differs only by
    float32 rounding of the network (docs/reliability.md: relative 1e-4 on per-sample values), and windows agree."""
    probes = ["cond_gap", "locality_gap", "forward_backward"]
    a = detect.run(small_config(tmp_path / "a", probes=probes, max_batch=128), tiny, classifier=TinyClassifier())
    b = detect.run(small_config(tmp_path / "b", probes=probes, max_batch=3), tiny, classifier=TinyClassifier())
    for f in sorted((tmp_path / "a" / "arrays").glob("*.npz")):
        with np.load(f) as x, np.load(tmp_path / "b" / "arrays" / f.name) as y:
            for k in x.files:
                if x[k].dtype.kind != "f":
                    np.testing.assert_array_equal(x[k], y[k], err_msg=f"{f.name}:{k}")
                else:
                    np.testing.assert_allclose(x[k], y[k], rtol=1e-4, atol=1e-6, err_msg=f"{f.name}:{k}")
    def numbers(obj, path=""):
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in numbers(val, f"{path}.{key}").items()}
        if isinstance(obj, list):
            return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{path}[{i}]").items()}
        return {path: obj}

    wa, wb = numbers(a["windows"]), numbers(b["windows"])
    assert wa.keys() == wb.keys() and any(isinstance(v, float) for v in wa.values())
    for k, v in wa.items():
        assert wb[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k
    # the same folder with another --max_batch reuses every unit
    again = detect.run(small_config(tmp_path / "a", probes=probes, max_batch=3), tiny, classifier=TinyClassifier())
    assert again["cost"]["units_computed_this_run"] == 0
