"""Nothing silently wrong (issue 21): stored work is keyed by everything it depends on and verified against its key,
the weights fingerprint reads every byte, files a user keeps are written atomically, data is validated where it
enters, and a full disk or a failing W&B never loses finished work. docs/reliability.md maps each guarantee here."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import critsample
import critsample.generate as generate
from critsample import detect, store, summary
from critsample.cli import main
from critsample.detect import DetectConfig, GapArgs
from critsample.generate import SampleConfig


@pytest.fixture(autouse=True)
def _own_digest_cache(tmp_path, monkeypatch):
    """Each test its own digest cache (never the user's ~/.cache/critsample)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("critsample: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _small_detect(out, **kw) -> DetectConfig:
    """dit-digits' conditioning gap at toy size (seconds): 2 samples per trajectory, 4 steps."""
    cfg = DetectConfig(model="dit-digits", out=str(out), wandb=False, seed=3, probes=["cond_gap"],
                       gaps=GapArgs(steps=4, samples=2, batch=1, radii=[1]))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


DETECT = ["detect", "--model", "dit-digits", "--preset", "fast", "--probes", "cond_gap", "--gaps.steps", "4",
          "--gaps.samples", "2",
          "--gaps.batch", "1", "--gaps.radii", "[1]"]


def _fail_writes_of(monkeypatch, *names: str, exc=None):
    """Writes through store.atomic_write to a file named in ``names`` fail with ENOSPC once their bytes are written
    (at the fsync), as on a full disk; returns the list of files that failed."""
    failed = []
    real = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")  # the temporary file: .<name>.<random>.tmp
        name = Path(target).name
        if any(name.startswith(f".{n}.") for n in names):
            failed.append(target)
            raise exc or OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    return failed


# -- 1. the mid-batch checkpoint of `sample` is keyed by everything its result depends on ----------------------------


def _killed_after_step_3(monkeypatch):
    real = generate.sample

    def sample(*args, callback=None, **kwargs):
        def cb(d):
            callback(d)
            if d["i"] == 3:
                raise KeyboardInterrupt
        return real(*args, callback=cb, **kwargs)

    monkeypatch.setattr(generate, "sample", sample)
    return real


@pytest.mark.parametrize("other",
                         [{"classes": [5]}, {"steps": 8}, {"guidance": 2.0}, {"interval": "0.2:0.6"}, {"seed": 4}])
def test_a_mid_batch_checkpoint_is_never_resumed_by_another_command(digits, tmp_path, monkeypatch, other):
    """`sample --class 3 --steps 6` killed mid-batch, then another command in the same --out (another class, steps,
    guidance, plan, seed): it samples from the start and equals a fresh run bitwise; the first command still resumes."""
    monkeypatch.setattr(generate, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every step
    a = dict(classes=[3], num=2, batch_size=8, steps=6, seed=0, wandb=False)
    b = {**a, **other}
    real = _killed_after_step_3(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        generate.run(SampleConfig(**a, out=str(tmp_path / "ck")), digits)
    assert list((tmp_path / "ck" / ".batches").rglob("sample_state/*.npz"))  # a checkpoint of A is stored
    monkeypatch.setattr(generate, "sample", real)

    resumed = generate.run(SampleConfig(**b, out=str(tmp_path / "ck")), digits)
    fresh = generate.run(SampleConfig(**b, out=str(tmp_path / "fresh")), digits)
    assert resumed["cost"]["model_evaluations_this_run"] == fresh["cost"]["model_evaluations"]  # nothing of A reused
    np.testing.assert_array_equal(np.load(tmp_path / "ck" / "samples.npz")["images"],
                                  np.load(tmp_path / "fresh" / "samples.npz")["images"])

    again = generate.run(SampleConfig(**a, out=str(tmp_path / "ck")), digits)  # A's own checkpoint is still its own
    plan = generate.build_plan(SampleConfig(**a, out=str(tmp_path)), digits)
    assert again["cost"]["model_evaluations_this_run"] == 2 * sum(s.forwards for s in plan.steps[4:])


# -- 2. every file a user keeps is written atomically -----------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_on_a_full_disk_or_an_error_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "kept.json"
    store.atomic_write(path, '{"old": 1}')
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~store._UMASK)  # the usual permissions, not mkstemp's 0600

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise RuntimeError("the serializer failed")

    with pytest.raises(RuntimeError):
        store.atomic_write(path, half_then_fail)
    failed = _fail_writes_of(monkeypatch, "kept.json")
    with pytest.raises(store.WriteError,
                       match=f"Could not write {path} \\(No space left on device\\); the work finished so far is kept"):
        store.atomic_write(path, '{"new": 2}' * 1000)
    assert failed and path.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]  # no temporary file left behind


def test_tune_writing_its_plan_on_a_full_disk_keeps_the_summary(tmp_path, monkeypatch, capsys):
    path = tmp_path / "summary.json"
    summary.write({"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "big": list(range(20000))},
                  path)
    before = path.read_bytes()
    _fail_writes_of(monkeypatch, "summary.json")
    with pytest.raises(store.WriteError, match=f"Could not write {path}"):
        summary.write_plan(path, {"plan": {"steps": [{"mode": "guided"}]}})
    assert path.read_bytes() == before


def test_tune_on_a_full_disk_is_one_sentence_and_keeps_the_summary(tmp_path, monkeypatch, capsys):
    """`critsample tune` writing its plan into summary.json on a full disk: exit 2, one sentence naming the file; the
    summary is byte for byte the one before (it used to be cut at the point the disk filled)."""
    path = tmp_path / "summary.json"
    summary.write({"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": 1},
                  path)
    before = path.read_bytes()
    failed = _fail_writes_of(monkeypatch, "summary.json")
    argv = ["tune", "--summary", str(path), "--num", "4", "--steps", "2", "--n_boot", "2", "--shifts", "0", "--scales",
            "1",
            "--outside", "local-uncond", "--out", str(tmp_path / "tune")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # tune's progress lines, then the error
    err = lines[-1]
    assert (err.startswith("critsample: error: ") and "Traceback" not in "\n".join(lines)
            and "internal error" not in "\n".join(lines))
    assert f"Could not write {path} (No space left on device); the work finished so far is kept" in err
    assert failed and path.read_bytes() == before and (tmp_path / "tune" / "frontier.json").exists()


def test_sample_on_a_full_disk_keeps_the_previous_samples_and_record(digits, tmp_path, monkeypatch, capsys):
    """Each file is whole, old or new; run.json, written last, is the old record until every output is new."""
    cfg = dict(num=2, batch_size=2, steps=2, out=str(tmp_path), wandb=False)
    generate.run(SampleConfig(**cfg, seed=0), digits)
    for seed, name in enumerate(("samples.npz", "grid.png", "run.json"), start=1):
        kept = {n: (tmp_path / n).read_bytes() for n in ("samples.npz", "grid.png", "run.json")}
        with monkeypatch.context() as m:
            failed = _fail_writes_of(m, name)
            with pytest.raises(store.WriteError, match=f"Could not write {tmp_path / name}"):
                generate.run(SampleConfig(**cfg, seed=seed), digits)
        assert failed and (tmp_path / name).read_bytes() == kept[name]
        assert (tmp_path / "run.json").read_bytes() == kept["run.json"]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["seed"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_file_is_written_in_place_in_critsample():
    """Every write of a file goes through store.atomic_write (a static check of the source)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "critsample"
    writers = {"write_text", "write_bytes", "savez", "savez_compressed", "savefig", "save_file", "dump"}
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "store.py":
            continue
        tree = ast.parse(path.read_text())
        allowed = {id(n) for call in ast.walk(tree) if isinstance(
            call, ast.Call) and ast.unparse(call.func).endswith("atomic_write")
                   for arg in call.args for n in ast.walk(arg)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in allowed:
                continue
            name = ast.unparse(node.func)
            last = name.rsplit(".", 1)[-1]
            opens_for_writing = last == "open" and any(isinstance(a, ast.Constant) and isinstance(
                a.value, str) and set(a.value) & set("wax")
                                                       for a in [*node.args[1:],
                                                                 *(k.value for k in node.keywords if k.arg == "mode")])
            if (last in writers and name not in ("json.dumps",
                                                 "yaml.safe_dump")) or name == "torch.save" or opens_for_writing:
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert not offenders, offenders


def test_model_folders_are_exported_whole_or_not_at_all():
    """Every save_pretrained in critsample/ writes inside a ``with atomic_folder(...)`` block (static check)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "critsample"
    offenders, seen = [], 0
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inside = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With) and any(
            "atomic_folder" in ast.unparse(item.context_expr) for item in w.items) for stmt in w.body
                  for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("save_pretrained"):
                seen += 1
                if id(node) not in inside:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert seen >= 3 and not offenders, offenders


def test_an_export_that_fails_midway_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler

    from critsample.store import WriteError, atomic_folder

    folder = tmp_path / "export"
    with atomic_folder(folder) as tmp:
        (tmp / "weights.txt").write_text("old")
    assert (folder / "weights.txt").read_text() == "old"

    def fail(*args, **kwargs):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(DDIMScheduler, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        with atomic_folder(folder) as tmp:
            (tmp / "weights.txt").write_text("new")
            DDIMScheduler().save_pretrained(tmp / "scheduler")
    assert (folder / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind
    with atomic_folder(folder) as tmp:
        (tmp / "weights.txt").write_text("new")
    assert (folder / "weights.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    real_replace = os.replace

    def second_rename_fails(src, dst):
        if Path(dst) == folder and ".old-" not in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(WriteError, match="Could not write"):
        with atomic_folder(folder) as tmp:
            (tmp / "weights.txt").write_text("newer")
    assert (folder / "weights.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# -- 3. the weights fingerprint reads every byte ----------------------------------------------------------------------


def _biggest(model):
    name, p = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    assert p.numel() > 2 * 4096  # the old stride read every (numel // 4096)-th value: index 1 was never read
    return name, p


def test_one_value_far_from_any_stride_changes_the_fingerprint(digits):
    before = store.model_fingerprint(digits, digits.name)
    other = copy.deepcopy(digits)
    _, p = _biggest(other)
    with torch.no_grad():
        p.view(-1)[1] += 1e-3
    assert store.model_fingerprint(other, other.name) != before
    with torch.no_grad():
        p.view(-1)[1] -= 1e-3
        p.view(-1)[1] = p.view(-1)[1].clone()  # a no-op change in place: the same bytes give the same fingerprint
    assert store.model_fingerprint(other, other.name) == before
    assert store.model_fingerprint(digits, digits.name) == before


def test_a_loaded_model_changed_in_place_is_hashed_again():
    """The files' digest stands for the weights only while no tensor has changed since the load."""
    model = critsample.load("dit-digits")
    first = store.model_fingerprint(model, model.name)
    _, p = _biggest(model)
    with torch.no_grad():
        p.view(-1)[1] += 1e-3
    assert store.model_fingerprint(model, model.name) != first


def test_a_loaded_model_is_fingerprinted_from_its_files_once(dit_folder, tmp_path, monkeypatch):
    """First load: the tensors are hashed once and remembered under the files' digests (path, size, mtime); the next
    loads read no tensor, and the value is the one of a full hash. A rewritten file (same size) is hashed again."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(dit_folder, folder)
    first = critsample.load(str(folder))
    value = store.model_fingerprint(first, "m")
    assert value == f"m@{hashlib.sha256(('m:' + store.weights_digest(first.state_dict())).encode()).hexdigest()[:16]}"
    cache = json.loads((tmp_path / "xdg-cache" / "critsample" / "digests.json").read_text())
    assert (str((folder / "transformer" / "diffusion_pytorch_model.safetensors").resolve()) in cache["files"]
            and cache["weights"])

    def no_tensor_reads(*a, **kw):
        raise AssertionError("the weights were read again")

    with monkeypatch.context() as m:
        m.setattr(store, "weights_digest", no_tensor_reads)
        assert store.model_fingerprint(critsample.load(str(folder)), "m") == value

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = max(tensors, key=lambda k: tensors[k].numel())
    tensors[key].view(-1)[1] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = critsample.load(str(folder))
    assert store.model_fingerprint(changed, "m") != value


def test_a_hugging_face_cache_blob_is_known_by_its_name(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    sha = "ab" * 32
    (blobs / sha).write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(blobs / sha)
    assert store._DigestCache().digest(tmp_path / "model.safetensors") == sha  # the content is not read


def test_changed_weights_recompute_sample_detect_and_tune_units(digits, tmp_path, monkeypatch):
    other = copy.deepcopy(digits)
    _, p = _biggest(other)
    with torch.no_grad():
        p.view(-1)[1] += 1e-3
    cfg = SampleConfig(classes=[3], num=2, batch_size=2, steps=2, out=str(tmp_path / "s"), wandb=False)
    assert generate.run(cfg, digits)["cost"]["samples_computed_this_run"] == 2
    assert generate.run(cfg, other)["cost"]["samples_computed_this_run"] == 2
    assert generate.run(cfg, digits)["cost"]["samples_computed_this_run"] == 0

    dcfg = _small_detect(tmp_path / "d")
    n = detect.run(dcfg, digits)["cost"]["units_computed_this_run"]
    assert n > 0 and detect.run(dcfg, other)["cost"]["units_computed_this_run"] == n
    assert detect.run(dcfg, digits)["cost"]["units_computed_this_run"] == 0

    from critsample import tune

    ids = []
    monkeypatch.setattr(tune, "certify", lambda *a, store,
                        **kw: ids.append(store.model_id) or (_ for _ in ()).throw(KeyboardInterrupt))
    path = tmp_path / "summary.json"
    summary.write({"model": "dit-digits", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": 1},
                  path)
    for model in (digits, other):
        with pytest.raises(KeyboardInterrupt):
            tune.run(tune.TuneConfig(summary=str(path), num=2, steps=2, out=str(tmp_path / "t")), model)
    assert ids[0] != ids[1] and ids[0] == store.model_fingerprint(digits, digits.name)  # tune's units are keyed by it


# -- 4. data is validated where it enters ------------------------------------------------------------------------------


def _latents(n=3, value=None, **extra):
    x = np.random.default_rng(0).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    if value is not None:
        x[0, 0, 2, 3] = value
    return {"latents": x, **extra}


BAD_DATA = {
    "nan": ("x.npz", _latents(value=np.nan), "has 1 NaN or infinite value among its 192 latents values"),
    "inf": ("x.pt", {"images": torch.full((2, 1, 8, 8), float("inf"))}, "has 128 NaN or infinite values"),
    "1000x": ("x.npz", {"latents": _latents()["latents"] * 1000}, "far outside the model's range"),
    "0..255": ("x.npz", {"images": np.full((2, 1, 8, 8), 255.0, np.float32)},
               "images must be in [0, 1]; divide by 255"),
    "text": ("x.pt", "not a tensor file at all\n", "is not a tensor file written by torch.save"),
    "text-npz": ("x.npz", "not a zip\n", "is not a .npz file"),
    "labels": ("x.npz", _latents(labels=np.array([0, 10, 3])),
               "has 1 label outside the classes (e.g. 10); labels must be in 0..9"),
    "negative-labels": ("x.npz", _latents(labels=np.array([0, -1, 3])), "labels must be in 0..9"),
    "string-labels": ("x.npz", _latents(labels=np.array(["a", "b", "c"])), "has labels of type <U1"),
    "fraction-labels": ("x.npz", _latents(labels=np.array([0.5, 1, 2])), "has labels of type float64"),
    "few-labels": ("x.npz", _latents(labels=np.array([1])), "has 1 labels for 3 samples"),
    "zero": ("x.npz", {"latents": np.zeros((0, 1, 8, 8), np.float32)}, "holds 0 samples"),
    "extension": ("x.txt", "1 2 3\n", "has the unknown extension '.txt'"),
    "no-latents": ("x.npz", {"pixels": np.zeros((2, 1, 8, 8), np.float32)},
                   "has neither 'latents' nor 'images' (it has 'pixels')"),
    "not-a-folder": ("missing", None, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_sentence_and_exit_2(tmp_path, capsys, case):
    name, content, needle = BAD_DATA[case]
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict) and name.endswith(".npz"):
        np.savez(path, **content)
    elif content is not None:
        torch.save(content, path)
    assert main([*DETECT, "--out", str(tmp_path / "run"), "--no-wandb", "--data", str(path)]) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and needle in err, err
    assert not list((tmp_path / "run").rglob("*.npz"))  # nothing computed from it


def test_latents_somewhat_out_of_range_are_a_warning(caplog):
    from critsample.tensorfiles import check_samples

    with caplog.at_level(logging.WARNING, logger="critsample"):
        check_samples(_latents()["latents"] * 20, "x.npz")
    assert ["--data x.npz holds latents as large as" in r.getMessage() and "usual range" in r.getMessage()
            for r in caplog.records] == [True]
    caplog.clear()
    check_samples(_latents()["latents"] * 3, "x.npz")  # a VAE's latents reach a few units: nothing said
    assert not caplog.records


@pytest.mark.parametrize("blob, needle", [
    ({"labels": torch.arange(4)}, "has no 'latents' (it holds 'labels')"),
    ({"latents": torch.zeros(4, 4, 2, 2)}, "has no 'labels'"),
    ({"latents": torch.full((4, 4, 2, 2), float("nan")), "labels": torch.arange(4)}, "has 64 NaN or infinite values"),
    ({"latents": torch.zeros(4, 4, 2, 2), "labels": torch.tensor([0, 1, -3, 2])}, "labels must be 0 or more"),
])
def test_bad_fine_tuning_latents_are_one_sentence_and_exit_2(dit_folder, tmp_path, capsys, blob, needle):
    path = tmp_path / "latents.pt"
    torch.save(blob, path)
    argv = ["fit", "--config", "configs/fit/dit-xl-latents.yaml", "--trainer.accelerator", "cpu", "--trainer.precision",
            "32-true",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--model.init_from", str(dit_folder), "--model.export_dir", str(tmp_path / "export"),
            "--data.path", str(path), "--data.num_workers", "0", "--ckpt_path", "null"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"LatentsDataModule path {path}" in err and needle in err, err


# -- 5. a unit's sidecar is verified against the key asked for ---------------------------------------------------------


def test_swapped_unit_pairs_are_detected_and_recomputed(tmp_path, caplog):
    s = store.Store(tmp_path, "m", 0)
    u, v = s.unit("p", {"i": 1}), s.unit("p", {"i": 2})
    s.save(u, {"a": np.zeros(3)})
    s.save(v, {"a": np.ones(3)})
    for suffix in (".npz", ".json"):  # swap both files: each pair's checksum still matches its .npz
        pu, pv = s.path(u).with_suffix(suffix), s.path(v).with_suffix(suffix)
        tmp = pu.with_name("swap")
        pu.rename(tmp), pv.rename(pu), tmp.rename(pv)
    with pytest.raises(store.CorruptUnit, match="records the unit"):
        s.load(u)
    with caplog.at_level(logging.WARNING, logger="critsample"):
        got = s.get_or_compute(u, lambda g: {"a": np.full(3, 7.0)})
    assert got["a"].tolist() == [7.0] * 3 and "computing the unit again" in caplog.text


def test_swapped_detect_units_are_recomputed_and_the_window_stays(digits, tmp_path, caplog):
    cfg = _small_detect(tmp_path)
    clean = detect.run(cfg, digits)
    a, b = sorted((tmp_path / "units").rglob("*.npz"))[:2]
    for suffix in (".npz", ".json"):
        pa, pb = a.with_suffix(suffix), b.with_suffix(suffix)
        tmp = pa.with_name("swap")
        pa.rename(tmp), pb.rename(pa), tmp.rename(pb)
    with caplog.at_level(logging.WARNING, logger="critsample"):
        again = detect.run(cfg, digits)
    assert sum("computing the unit again" in r.getMessage() for r in caplog.records) == 2
    assert again["cost"]["units_computed_this_run"] == 2
    assert again["windows"] == clean["windows"] and again["probes"] == clean["probes"]


# -- 6. a full disk or a failing W&B never loses finished work ---------------------------------------------------------


def test_a_full_disk_during_detect_is_one_sentence_and_keeps_finished_units(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, saved = store.Store.save, []

    def save(self, unit, arrays):
        if len(saved) == 2:  # the third unit meets a full disk
            _fail_writes_of(monkeypatch, unit.key)
        real(self, unit, arrays)
        saved.append(unit.key)

    monkeypatch.setattr(store.Store, "save", save)
    assert main([*DETECT, "--out", str(out), "--no-wandb"]) == 2
    err = _one_line_error(capsys)
    assert ("Could not write " in err and "(No space left on device); the work finished so far is kept" in err
            and "run the same command again" in err)
    assert "internal error" not in err
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    assert main([*DETECT, "--out", str(out), "--no-wandb"]) == 0
    record = json.loads((out / "summary.json").read_text())
    assert record["cost"]["units_loaded"] == 2  # the two units finished before the full disk were kept


def test_a_full_disk_outside_the_atomic_writes_is_one_sentence_too(tmp_path, monkeypatch, capsys):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "wandb" / "x"))

    monkeypatch.setattr(detect, "run", full)
    assert main([*DETECT, "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert (f"No space left on device writing {tmp_path / 'run' / 'wandb' / 'x'}; the work finished so far is kept"
            in err)


@pytest.mark.parametrize("command", ["detect", "sample"])
def test_a_failing_wandb_is_a_warning_after_the_results_are_written(tmp_path, monkeypatch, caplog, command):
    import wandb

    def init(*a, **kw):
        raise PermissionError(13, "Permission denied", "/home/user/.config/wandb")

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    argv = [*DETECT, "--out", str(out)] if command == "detect" else \
        ["sample", "--model", "dit-digits", "--num", "2", "--steps", "2", "--out", str(out)]
    with caplog.at_level(logging.WARNING, logger="critsample"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert (len(said) == 1 and "W&B logging failed (PermissionError" in said[0]
            and f"the results are written under {out}" in said[0]), said
    for name in (["summary.json", "report.md", "config.yaml"] if command == "detect" else ["samples.npz", "run.json",
                                                                                           "grid.png"]):
        assert (out / name).stat().st_size > 0
