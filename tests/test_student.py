"""The distilled strictly local student (critsample.student, critsample.finetune.distill): its receptive field is
exactly r tokens, it loads behind the Denoiser interface of its teacher, its FLOPs are counted exactly, it trains
through `critsample fit`, and the shipped dit-digits student tracks its teacher outside the critical window better than
baselines that need no network."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from critsample.cli import main
from critsample.denoisers import NULL
from critsample.errors import UserError
from critsample.finetune.distill import DIGITS_WINDOW, DistillModule, distill_error, teacher_flops
from critsample.models import load
from critsample.student import StudentConfig, StudentDenoiser, StudentNet, load_student, student_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher():
    return load("dit-digits")


@pytest.fixture(scope="module")
def shipped():
    return load_student("dit-digits")


def _student(radius: int, patch: int = 1, seed: int = 0) -> StudentDenoiser:
    torch.manual_seed(seed)
    net = StudentNet(StudentConfig(radius=radius, width=8, patch_size=patch, sample_size=8 * patch))
    return StudentDenoiser(net, load("dit-digits").schedule).eval()


def _moved(x, p, near, seed=1):
    """``x`` with every token in ``near(a, b)`` replaced by noise (token (a, b) = pixels [a p, (a + 1) p) ...)."""
    g = torch.Generator().manual_seed(seed)
    y = x.clone()
    h, w = x.shape[-2] // p, x.shape[-1] // p
    for a in range(h):
        for b in range(w):
            if near(a, b):
                y[..., a * p : (a + 1) * p, b * p : (b + 1) * p] = 3 * torch.randn(x.shape[1], p, p, generator=g)
    return y


def _assert_radius(model: StudentDenoiser):
    """Token (i, j)'s prediction is bit-identical when every token further than r moves, and changes when one token at
    distance exactly r moves (every center, inside and on the border)."""
    r, p = model.radius, model.patch_size
    h, w = model.token_grid
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([3, NULL])
    base = model.predict(x, 0.7, cond)

    def tok(y, i, j):
        return y[..., i * p : (i + 1) * p, j * p : (j + 1) * p]

    for i in range(h):
        for j in range(w):
            far = _moved(x, p, lambda a, b, i=i, j=j: max(abs(a - i), abs(b - j)) > r)
            assert torch.equal(tok(model.predict(far, 0.7, cond), i, j), tok(base, i, j)), (i, j)
            ring = [(a, b) for a in range(h) for b in range(w) if max(abs(a - i), abs(b - j)) == r]
            a, b = ring[(i * w + j) % len(ring)]  # one token at distance r, a different one per center
            edge = _moved(x, p, lambda u, v, a=a, b=b: (u, v) == (a, b))
            assert (tok(model.predict(edge, 0.7, cond), i, j) - tok(base, i, j)).abs().max() > 1e-6, (i, j, a, b)


@pytest.mark.parametrize("radius,patch", [(0, 1), (1, 1), (3, 1), (2, 2)])
def test_the_receptive_field_is_exactly_r_tokens(radius, patch):
    _assert_radius(_student(radius, patch))


def test_the_shipped_student_reads_exactly_its_radius(shipped):
    assert shipped.radius == json.loads((student_folder("dit-digits") / "student.json").read_text())["config"]["radius"]
    _assert_radius(shipped)


def test_the_shipped_student_is_a_denoiser_of_dit_digits(shipped, teacher):
    assert (shipped.sample_shape, shipped.num_classes, shipped.prediction, shipped.patch_size) == (
        teacher.sample_shape,
        teacher.num_classes,
        teacher.prediction,
        teacher.patch_size,
    )
    assert shipped.schedule == teacher.schedule
    same = load_student(teacher)  # by the loaded teacher, and by its folder
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), shipped.parameters(), strict=True))
    assert load_student(student_folder("dit-digits")).radius == shipped.radius
    x = torch.randn(4, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 7, NULL, 3])
    out = shipped.predict(x, torch.tensor([0.05, 0.5, 0.8, 0.95], dtype=torch.float64), cond, guidance=1.5)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(
        shipped.predict(x, 0.6, cond, radius=shipped.radius, locality="strict"), shipped.predict(x, 0.6, cond)
    )
    score = shipped.predict(x, 0.6, cond, kind="score")
    assert score.shape == x.shape
    with pytest.raises(UserError, match="cannot run at radius"):
        shipped.predict(x, 0.6, cond, radius=shipped.radius - 1)
    with pytest.raises(UserError, match="No distilled student"):
        load_student(REPO / "configs")


def test_flops_are_every_multiply_add_and_a_small_fraction_of_the_teacher(shipped, teacher):
    counted = []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            counted.append(2.0 * out[0].numel() * m.in_channels // m.groups * kh * kw)
        else:
            counted.append(2.0 * m.in_features * m.out_features)

    hooks = [
        m.register_forward_hook(hook) for m in shipped.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        shipped(torch.zeros(1, *shipped.sample_shape), torch.tensor([0.5], dtype=torch.float64), torch.tensor([1]))
    finally:
        for h in hooks:
            h.remove()
    assert sum(counted) == shipped.flops_per_forward == shipped.forward_flops(shipped.token_grid).total
    ratio = shipped.flops_per_forward / teacher_flops(teacher)
    record = json.loads((student_folder("dit-digits") / "student.json").read_text())
    assert record["flops_ratio"] == pytest.approx(ratio) and ratio < 0.1


def test_the_shipped_student_beats_baselines_on_held_out_digits_outside_the_window(shipped, teacher):
    """Held-out test digits (never trained on, by teacher or student), noised at 3 steps of each side of the window,
    class and null rows: the student's squared error to the teacher is below a quarter of the zero prediction's and of
    the unit-Gaussian posterior's (eps = sigma x_t) on both sides. (Measured at export, 359 images, 6 steps per side:
    low side 0.067 vs 0.57 / 0.60, high side 0.0015 vs 0.026 / 0.98; student.json, heldout_error.)"""
    from critsample.datasets import digits_split

    x0, y = digits_split("test")
    window = tuple(json.loads((student_folder("dit-digits") / "student.json").read_text())["window"])
    err = distill_error(shipped, teacher, x0[:64], y[:64], window, points=3, seed=5)
    for side in ("low", "high"):
        e = err[side]
        assert e["student"] < 0.25 * min(e["zero"], e["gaussian"]), (side, e)


def test_options_are_one_sentence():
    with pytest.raises(UserError, match="0 < t0 < t1 < 1"):
        DistillModule(window=[0.5, 0.2])
    with pytest.raises(UserError, match="set by the teacher"):
        DistillModule(student={"patch_size": 2})
    with pytest.raises(UserError, match="integer >= 0"):
        StudentConfig(radius=-1).check()
    assert inspect.signature(DistillModule).parameters["window"].default == list(DIGITS_WINDOW)


def test_the_shipped_config_prints_with_its_module_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/fit/student-digits.yaml"), "--print_config"])
    assert e.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "critsample.finetune.distill.DistillModule"
    assert model["init_args"]["window"] == list(DIGITS_WINDOW) and model["init_args"]["student"]["radius"] == 2


def _fit(root: Path, max_steps: int) -> int:
    """configs/fit/student-digits.yaml with every path moved into ``root``, a tiny student and a few batches."""
    cfg = yaml.safe_load((REPO / "configs/fit/student-digits.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"][1]["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    cfg["model"]["init_args"].update(
        export_dir=str(root / "export"),
        eval_points=1,
        eval_images=16,
        student={"radius": 1, "width": 8, "mlp_ratio": 1},
    )
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg))
    return main(
        [
            "fit",
            "--config",
            str(root / "fit.yaml"),
            f"--trainer.max_steps={max_steps}",
            "--data.init_args.batch_size=16",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
        ]
    )


def test_a_tiny_distillation_runs_resumes_and_exports_through_the_cli(tmp_path):
    assert _fit(tmp_path, 2) == 0
    first = load_student(tmp_path / "export")
    assert _fit(tmp_path, 3) == 0  # the same command with a larger budget continues from last.ckpt
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and "EMAWeightAveraging" in ckpt["callbacks"]
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])  # the frozen teacher is not stored
    record = json.loads((tmp_path / "export" / "student.json").read_text())
    assert record["global_step"] == 3 and record["config"]["radius"] == 1 and record["teacher"] == "dit-digits"
    assert record["heldout_error"]["low"]["student"] > 0 and record["flops_ratio"] < 0.05
    second = load_student(tmp_path / "export")
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


@pytest.mark.parametrize(
    "attr, value, named",
    [("sample_shape", (1, 16, 16), "sample shape"), ("num_classes", 3, "number of classes"),
     ("prediction", "v", "prediction type"), ("teacher", "dit-fashion", "recorded teacher"),
     ("schedule", "betas", "noise schedule")],
)
def test_a_student_that_does_not_fit_its_host_is_one_sentence(teacher, attr, value, named, monkeypatch):
    from dataclasses import replace

    import critsample.student
    from critsample import outside

    student = load_student("dit-digits")
    monkeypatch.setattr(critsample.student, "load_student", lambda host: student)
    assert outside._student(teacher) is student  # the shipped student fits its teacher
    setattr(student, attr, replace(teacher.schedule, beta_end=0.03) if value == "betas" else value)
    with pytest.raises(UserError, match=f"does not fit dit-digits: its {named}") as e:
        outside._student(teacher)
    assert len(str(e.value).splitlines()) == 1
