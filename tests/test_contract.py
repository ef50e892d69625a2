"""The contract matrix: every model family users run, through every command, from the CLI and from Python.

Families (one fixture each): the bundled dit-digits and dit-fashion (16 x 16 tokens), a latent class DiT (VAE, learned
sigma, 1000 classes), SD3, the SD3.5 layout (qk RMS-norm, image-only ``attn2``), PixArt-Sigma, FLUX.1-dev and an
analytic oracle. The neural ones are
tiny random pipelines written with ``save_pretrained`` (tests/conftest.py) and loaded through ``critsample.load`` from
their folder; the bundled DiTs and the oracle are loaded by name. Paths: every probe of ``detect``; ``sample`` plain,
``--interval``, ``--adaptive --window --radius`` and ``--adaptive --summary``; resuming both after a simulated kill;
``fit`` + export + reload + sample where the family trains. Each output is checked against what can be counted:
images finite in [0, 1], a summary that carries every probe run and a critical window or an explicit null, and
model evaluations equal to the rows the network actually saw. (What each denoiser promises by itself, stock equality,
locality, pipeline equality and FLOPs, is test_denoiser_contract.py.)

A new family is one entry of :data:`FAMILIES` (and, for a new kind of folder, one builder in conftest.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CLASSIFIER

import critsample
from critsample import detect, generate
from critsample.cli import main
from critsample.denoisers import Denoiser
from critsample.detect import DetectConfig
from critsample.errors import UserError
from critsample.generate import SampleConfig

REPO = Path(__file__).resolve().parents[1]
PROBES = list(detect.PROBES)  # the default probe set
ORACLE = "gmm-mixture:N=4,mu=0.6,s2=0.8"
# Detection sizes: the fast preset shrunk to seconds (3 steps, 2 samples, 3 noise levels, 3 window positions). Two
# window radii, so that the windowed-locality scan can suggest the radius `sample --adaptive --summary` reads.
SIZES = {
    "gaps": {"steps": 3, "samples": 2, "batch": 2, "radii": [1, 2]},
    "fb": {"num_t": 3, "samples": 2, "steps": 3, "batch": 2, "radii": [1]},
    "windows": {"steps": 3, "t0_step": 0.34, "samples": 2, "batch": 2, "radii": [1, 2]},
}
NO_DATA = {"fb": {"source": "generated"}, "gaps": {"trajectories": ["sample_cond", "sample_uncond"]}}
SAMPLE = {"num": 3, "batch_size": 2, "steps": 3, "seed": 5}  # two batches: a kill can fall between them
KILL_AFTER_UNITS = 2


# -- the families ---------------------------------------------------------------------------------
@dataclass
class Family:
    """One model family as the matrix drives it."""

    key: str
    ref: str  # what a user passes to --model: a registry name, an oracle name or a folder
    model: Denoiser  # critsample.load(ref)
    has_data: bool  # a default dataset exists (else: generated clean images, sampling trajectories only)
    trains: bool  # `critsample fit` fine-tunes it
    classes: list[int] = field(default_factory=lambda: [1, 0])

    @property
    def net(self) -> type:
        """The class whose forward is one network evaluation per row: the transformer, or the oracle itself."""
        return type(getattr(self.model, "transformer", self.model))

    def cond_kw(self) -> dict:
        return {"prompt": ["a cat"]} if self.model.is_text else {"classes": list(self.classes)}

    def cond_args(self) -> list[str]:
        return ["--prompt", "a cat"] if self.model.is_text else ["--class", *map(str, self.classes)]

    def detect_sections(self) -> dict:
        return {s: {**SIZES[s], **({} if self.has_data else NO_DATA.get(s, {}))} for s in SIZES}

    def detect_config(self, out: Path) -> DetectConfig:
        text = {"prompt": "a cat"} if self.model.is_text else {}
        clf = {} if self.key == "oracle" else {"classifier": CLASSIFIER}  # the oracle's Bayes classifier is its default
        return DetectConfig.from_preset("fast", model=self.ref, out=str(out), wandb=False, **text, **clf,
                                        **self.detect_sections())

    def detect_argv(self, out: Path) -> list[str]:
        argv = ["detect", "--model", self.ref, "--preset", "fast", "--out", str(out), "--no-wandb"]
        argv += ["--prompt", "a cat"] if self.model.is_text else []
        argv += [] if self.key == "oracle" else ["--classifier", CLASSIFIER]
        for section, values in self.detect_sections().items():
            for k, v in values.items():  # lists in the README's shell syntax: --gaps.radii 1 2
                argv += [f"--{section}.{k}", *map(str, v)] if isinstance(v, list) else [f"--{section}.{k}", str(v)]
        return argv


FAMILIES = ["dit-digits", "dit-fashion", "dit", "sd3", "sd35", "pixart", "flux", "oracle"]


def _load_family(key: str, request) -> Family:
    if key == "dit-digits":
        return Family(key, "dit-digits", critsample.load("dit-digits"), has_data=True, trains=True)
    if key == "dit-fashion":  # fine-tuned in fit on a tensor file (its own config needs the full Fashion-MNIST)
        return Family(key, "dit-fashion", critsample.load("dit-fashion"), has_data=True, trains=True)
    if key == "oracle":
        return Family(key, ORACLE, critsample.load(ORACLE), has_data=True, trains=False)
    folder = {
        "dit": lambda: request.getfixturevalue("dit_folder"),
        "sd3": lambda: request.getfixturevalue("sd3_folder"),
        "sd35": lambda: request.getfixturevalue("sd35_folder"),
        "pixart": lambda: request.getfixturevalue("pixart_sigma_folder"),
        "flux": lambda: request.getfixturevalue("flux_folders")["dev"],
    }[key]()
    return Family(key, str(folder), critsample.load(str(folder)), has_data=False, trains=key == "dit", classes=[1, 999])


@pytest.fixture(scope="module", autouse=True)
def placeholder_figures():
    """Figures are checked in test_detect_cli.py; here each is an empty placeholder file (matplotlib's layout and PNG
    encoding would otherwise be most of the matrix's time)."""
    from critsample import report

    def placeholder(*args, **kwargs):
        path = Path(next(a for a in args if isinstance(a, (str, Path))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    with pytest.MonkeyPatch.context() as m:
        for name in ("plot_curves", "plot_errorbars", "plot_heatmap", "plot_strips"):
            m.setattr(report, name, placeholder)
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    return _load_family(request.param, request)


# -- what every output is checked against -------------------------------------------------------
@contextmanager
def counted(cls: type):
    """Count the rows of every forward of ``cls`` (all instances: also the models the CLI loads itself)."""
    rows: list[int] = []
    original, own = cls.forward, "forward" in cls.__dict__

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows.append(int(x.shape[0]))
        return original(self, *args, **kwargs)

    cls.forward = forward
    try:
        yield rows
    finally:
        if own:
            cls.forward = original
        else:
            del cls.forward


def check_samples(out: Path, num: int) -> np.ndarray:
    images = np.load(out / "samples.npz")["images"]
    assert images.shape[0] == num and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    return images


def check_summary(summary: dict, probes: list[str]) -> None:
    assert set(summary["probes"]) == set(probes)
    cw = summary["critical_window"]  # a window, or an explicit null: never a missing key
    assert cw is None or (0 <= cw["t_start"] < cw["t_end"] <= 1 and np.isfinite([cw["center"], cw["width"]]).all())


def cli_ok(argv: list[str], capsys) -> None:
    """``critsample ARGV`` in this process, which must succeed."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err


# -- detect: every probe, CLI and Python, killed and resumed -----------------------------------------
@pytest.fixture(scope="module")
def detected(family: Family, tmp_path_factory) -> dict:
    """Python, uninterrupted (the reference); then a Python run killed after a few units and resumed by the CLI."""
    root = tmp_path_factory.mktemp(f"detect-{family.key}")
    with counted(family.net) as rows:
        ref = detect.run(family.detect_config(root / "python"), family.model)
    ref_rows = sum(rows)

    class Killed(Exception):
        pass

    done = []

    def kill(unit, computed):
        done.append(unit.forwards)
        if len(done) == KILL_AFTER_UNITS:
            raise Killed

    with counted(family.net) as rows, pytest.raises(Killed):
        detect.run(family.detect_config(root / "resumed"), family.model, on_unit=kill)
    killed_rows = sum(rows)
    with counted(family.net) as rows:
        code = main(family.detect_argv(root / "resumed"))
    assert code == 0
    resumed = json.loads((root / "resumed" / "summary.json").read_text())
    return {"ref": ref, "ref_rows": ref_rows, "killed_rows": killed_rows, "killed_forwards": sum(done),
            "resumed": resumed,
            "resumed_rows": sum(rows), "out": root / "resumed"}


def test_detect_python_runs_every_probe_and_counts_its_forwards(detected):
    ref = detected["ref"]
    check_summary(ref, PROBES)
    assert ref["cost"]["units_computed_this_run"] == ref["cost"]["units"] and ref["cost"]["units_loaded"] == 0
    assert ref["cost"]["model_evaluations"] == detected["ref_rows"]


def test_detect_killed_then_resumed_by_the_cli_recomputes_nothing_finished(detected):
    ref, resumed = detected["ref"], detected["resumed"]
    check_summary(resumed, PROBES)
    cost = resumed["cost"]
    assert cost["units_loaded"] == KILL_AFTER_UNITS
    assert cost["units_computed_this_run"] == cost["units"] - KILL_AFTER_UNITS
    assert detected["killed_rows"] == detected["killed_forwards"]
    assert detected["resumed_rows"] == cost["model_evaluations"] - detected["killed_forwards"]
    # the CLI's options are the library's config: same units, same numbers as the uninterrupted run
    assert cost["model_evaluations"] == ref["cost"]["model_evaluations"] and cost["units"] == ref["cost"]["units"]
    assert resumed["windows"] == ref["windows"] and resumed["critical_window"] == ref["critical_window"]
    assert resumed["probes"] == ref["probes"] and resumed["suggested_radius"] == ref["suggested_radius"]


# -- sample: plain, interval, adaptive, from a summary; CLI and Python ---------------------------------
VARIANTS = {
    "plain": {},
    "interval": {"interval": "0.3:0.7"},
    "adaptive-window": {"adaptive": True, "window": "0.3:0.7", "radius": 1},
}


def _argv(family: Family, out: Path, options: dict) -> list[str]:
    argv = ["sample", "--model", family.ref, *family.cond_args(), "--out", str(out), "--no-wandb"]
    for k, v in {**SAMPLE, **options}.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def _sample_both(family: Family, root: Path, options: dict, capsys) -> np.ndarray:
    """The same sampling through the CLI and through Python: each counted, each checked, equal images."""
    with counted(family.net) as rows:
        cli_ok(_argv(family, root / "cli", options), capsys)
    record = json.loads((root / "cli" / "run.json").read_text())
    assert record["cost"]["model_evaluations"] == sum(rows) == record["cost"]["model_evaluations_this_run"]
    images = check_samples(root / "cli", SAMPLE["num"])
    cfg = SampleConfig(model=family.ref, out=str(root / "python"), wandb=False, **SAMPLE, **family.cond_kw(), **options)
    with counted(family.net) as rows:
        record = generate.run(cfg, family.model)
    assert record["cost"]["model_evaluations"] == sum(rows) == record["plan"]["forwards_per_sample"] * SAMPLE["num"]
    np.testing.assert_array_equal(check_samples(root / "python", SAMPLE["num"]), images)
    return images


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sample(family, variant, tmp_path, capsys):
    _sample_both(family, tmp_path, VARIANTS[variant], capsys)


def test_sample_adaptive_from_the_detect_summary(family, detected, tmp_path, capsys):
    summary = detected["out"] / "summary.json"
    options = {"adaptive": True, "summary": str(summary)}
    s = json.loads(summary.read_text())
    if s["critical_window"] is not None:
        if s["suggested_radius"] is None:
            options["radius"] = 1
        _sample_both(family, tmp_path, options, capsys)
        return
    # No window was found on this tiny random model: one sentence and exit 2, and an explicit window still works.
    assert main(_argv(family, tmp_path / "none", options)) == 2
    err = capsys.readouterr().err.strip()
    assert "no critical_window" in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match="no critical_window"):
        generate.run(SampleConfig(model=family.ref, out=str(tmp_path / "p"), wandb=False, **SAMPLE, **family.cond_kw(),
                                  **options), family.model)
    _sample_both(family, tmp_path, {**options, "window": "0.2:0.6", "radius": 1}, capsys)


class Interrupted(KeyboardInterrupt):
    pass


def _kill_second_batch(monkeypatch):
    """Make sampling die (as by Ctrl-C) when its second batch starts."""
    original, calls = generate.sample, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "sample", dying)


def test_sample_killed_between_batches_resumes(family, tmp_path, capsys, monkeypatch):
    ref = tmp_path / "ref"
    cfg = lambda out: SampleConfig(model=family.ref, out=str(out), wandb=False, **SAMPLE, **family.cond_kw())  # noqa: E731
    generate.run(cfg(ref), family.model)
    images = check_samples(ref, SAMPLE["num"])
    per_sample = json.loads((ref / "run.json").read_text())["plan"]["forwards_per_sample"]
    first = SAMPLE["batch_size"]
    # Python: the first batch is stored, the run dies in the second; started again it computes only the rest
    with monkeypatch.context() as m:
        _kill_second_batch(m)
        with pytest.raises(Interrupted):
            generate.run(cfg(tmp_path / "py"), family.model)
    with counted(family.net) as rows:
        record = generate.run(cfg(tmp_path / "py"), family.model)
    assert record["cost"]["samples_computed_this_run"] == SAMPLE["num"] - first
    assert record["cost"]["model_evaluations_this_run"] == sum(rows) == (SAMPLE["num"] - first) * per_sample
    np.testing.assert_array_equal(check_samples(tmp_path / "py", SAMPLE["num"]), images)
    # CLI: exit code 130 and the resume hint; the same command again resumes
    argv = _argv(family, tmp_path / "cli", {})
    with monkeypatch.context() as m:
        _kill_second_batch(m)
        assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    with counted(family.net) as rows:
        cli_ok(argv, capsys)
    record = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert record["cost"]["samples_computed_this_run"] == SAMPLE["num"] - first
    assert record["cost"]["model_evaluations_this_run"] == sum(rows)
    np.testing.assert_array_equal(check_samples(tmp_path / "cli", SAMPLE["num"]), images)


# -- fit: 2 steps, export, reload, sample ----------------------------------------------------------
def _fit_config(family: Family, root: Path) -> Path:
    """A shipped fit config at toy size, fine-tuning the family's model for 2 steps and exporting it."""
    if family.key == "dit-digits":
        cfg = yaml.safe_load((REPO / "configs/fit/dit-digits.yaml").read_text())
        cfg["data"]["init_args"]["batch_size"] = 8
    else:
        cfg = yaml.safe_load((REPO / "configs/fit/dit-xl-latents.yaml").read_text())
        latents = root / "latents.pt"
        g = torch.Generator().manual_seed(0)
        torch.save({"latents": torch.randn(8, *family.model.sample_shape, generator=g), "labels": torch.arange(8) % 3},
                   latents)
        cfg["data"]["init_args"].update(path=str(latents), batch_size=4, num_workers=0, val_fraction=0.25)
        cfg["model"]["radius_schedule"].update(anneal_steps=0)  # locality-regularized from the first step
    t = cfg["trainer"]
    t.update(accelerator="cpu", precision="32-true", max_steps=2, default_root_dir=str(root), limit_val_batches=0,
             enable_progress_bar=False, num_sanity_val_steps=0, logger=False, enable_model_summary=False)
    t["callbacks"] = [c for c in t["callbacks"] if c["class_path"].endswith(("ModelCheckpoint", "EMAWeightAveraging"))]
    for c in t["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    cfg["model"].update(init_from=family.ref, export_dir=str(root / "export"), warmup_steps=1, val_steps=2)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_export_reload_sample(family, tmp_path, capsys):
    if not family.trains:
        # fit fine-tunes DiTs only: another family is one sentence and exit code 2, before any training
        code = main(["fit", "--config", str(REPO / "configs/fit/dit-digits.yaml"), f"--model.init_from={family.ref}",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_steps=1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "Fine-tuning needs a DiT model" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "checkpoints").exists()
        return
    cli_ok(["fit", "--config", str(_fit_config(family, tmp_path))], capsys)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    export = tmp_path / "export"
    model = critsample.load(str(export))
    assert model.sample_shape == family.model.sample_shape and model.num_classes == family.model.num_classes
    assert (model.vae is None) == (family.model.vae is None)
    exported = Family(family.key, str(export), model, has_data=family.has_data, trains=True, classes=family.classes)
    _sample_both(exported, tmp_path / "sample", VARIANTS["adaptive-window"], capsys)
