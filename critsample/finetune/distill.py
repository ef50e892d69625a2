"""Distillation of a strictly local student (:mod:`critsample.student`) from a model's own predictions outside its
critical window, trained by ``critsample fit --config configs/fit/student-digits.yaml``.

Targets: the teacher's native prediction (eps) at ``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` of the training
data, k drawn uniformly among the DDPM steps outside ``window`` (both sides: t < t0, the low-noise side, and t > t1,
the high-noise side; the window is the model's critical window, by default dit-digits' certified guidance window
[0.09, 0.39]); the label of each row is replaced by the null class with probability ``uncond_prob`` so that both rows
of a guided step are learned. Loss: mean squared difference to the teacher per pixel (eps units squared). The teacher
is frozen and kept out of the checkpoint; EMA and resuming from ``last.ckpt`` come from the config's callbacks.

:func:`distill_error` is the held-out measure (test images, fixed per-sample noise, t on a grid of each side): the
student's error next to two baselines that need no network, the zero prediction and the prediction of a unit-Gaussian
data model (eps = sigma x_t).
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import replace

import lightning as L
import torch
import torch.nn.functional as F

from ..denoisers import NULL, Denoiser
from ..errors import UserError
from ..flops import forward_flops, transformer_shape
from ..models import load
from ..sampling import sample_generator
from ..store import check_writable
from ..student import StudentConfig, StudentDenoiser, StudentNet, save_student
from .module import check_optimizer

DIGITS_WINDOW = (0.09, 0.39)  # dit-digits' certified guidance window (README, adaptive sampling race)


def check_window(window) -> tuple[float, float]:
    """``window`` as (t0, t1) with 0 < t0 < t1 < 1 (both sides must hold training times), else one sentence."""
    try:
        t0, t1 = (float(v) for v in window)
    except (TypeError, ValueError):
        raise UserError(f"--model.window must be two times [t0, t1]; got {window!r}.") from None
    if not (0.0 < t0 < t1 < 1.0):
        raise UserError(
            f"--model.window must satisfy 0 < t0 < t1 < 1 (a side of the window would hold no training "
            f"time otherwise); got [{t0}, {t1}]."
        )
    return t0, t1


def outside_steps(window: tuple[float, float], num_train_timesteps: int) -> dict[str, torch.Tensor]:
    """DDPM steps k (t = k / T) strictly outside ``window``: ``low`` (t < t0) and ``high`` (t > t1)."""
    k = torch.arange(num_train_timesteps)
    t = k.double() / num_train_timesteps
    return {"low": k[t < window[0]], "high": k[t > window[1]]}


def teacher_flops(teacher: Denoiser) -> float:
    """FLOPs of one global forward of ``teacher`` on its own grid (:mod:`critsample.flops`)."""
    return forward_flops(transformer_shape(teacher), teacher.token_grid, None).total


@torch.no_grad()
def distill_error(
    student: Denoiser,
    teacher: Denoiser,
    x0: torch.Tensor,
    labels: torch.Tensor,
    window: tuple[float, float],
    points: int = 6,
    seed: int = 0,
    batch: int = 512,
) -> dict:
    """Mean squared difference to the teacher's prediction per pixel (eps units squared) on ``x0`` noised at
    ``points`` evenly spaced steps of each side of ``window``, each image with its class and with the null class, the
    noise of image i from ``sample_generator(seed, i, "distill")``. Keys per side (``low``, ``high``) and ``all``:
    ``student``, ``zero`` (predicting 0) and ``gaussian`` (eps = sigma x_t: the posterior mean of unit-Gaussian
    data)."""
    sched = teacher.schedule
    steps = outside_steps(window, sched.num_train_timesteps)
    n = x0.shape[0]
    eps = torch.stack(
        [
            torch.randn((len(steps), points, *x0.shape[1:]), generator=sample_generator(seed, i, "distill"))
            for i in range(n)
        ]
    )  # (n, sides, points, C, H, W)
    abar = sched.alphas_cumprod()
    sums: dict[str, dict[str, float]] = {}
    for s, (side, ks) in enumerate(steps.items()):
        pick = ks[torch.linspace(0, len(ks) - 1, points).round().long()]
        acc = {"student": 0.0, "zero": 0.0, "gaussian": 0.0}
        for p, k in enumerate(pick.tolist()):
            a, sg = math.sqrt(float(abar[k])), math.sqrt(1.0 - float(abar[k]))
            for cond in (labels, torch.full_like(labels, NULL)):
                for lo in range(0, n, batch):
                    xb = a * x0[lo : lo + batch] + sg * eps[lo : lo + batch, s, p]
                    t = torch.full((xb.shape[0],), k / sched.num_train_timesteps, dtype=torch.float64)
                    target = teacher(xb, t, cond[lo : lo + batch]).float()
                    acc["student"] += float(((student(xb, t, cond[lo : lo + batch]).float() - target) ** 2).sum())
                    acc["zero"] += float((target**2).sum())
                    acc["gaussian"] += float(((sg * xb - target) ** 2).sum())
        sums[side] = {k: v / (points * 2 * x0.numel()) for k, v in acc.items()}
    sums["all"] = {k: (sums["low"][k] + sums["high"][k]) / 2 for k in sums["low"]}
    sums["units"] = "mean squared eps difference to the teacher per pixel; all = mean of the two sides"
    return sums


class DistillModule(L.LightningModule):
    def __init__(
        self,
        teacher: str = "dit-digits",
        student: dict | None = None,
        window: list[float] = list(DIGITS_WINDOW),  # noqa: B006  (jsonargparse shows the default; never mutated)
        uncond_prob: float = 0.25,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        eval_points: int = 6,
        eval_images: int = 359,
        export_dir: str | None = None,
    ):
        """
        Args:
            teacher: the model distilled (a model name or a diffusers folder; class-conditional, pixel or latent).
            student: :class:`~critsample.student.StudentConfig` fields (``radius``, ``width``, ``mlp_ratio``); the
                sample layout and classes come from the teacher.
            window: the critical window [t0, t1]: targets are drawn at t < t0 and t > t1 only.
            uncond_prob: probability that a row's label is the null class (the unconditional row of guided steps).
            lr: AdamW learning rate (constant after a linear warm-up of ``warmup_steps``).
            eval_points: steps per side of the held-out error written to the export record.
            eval_images: validation images it is measured on (the first ones; 359 = the whole digits test split).
            export_dir: where ``on_train_end`` writes the (EMA) student (:func:`critsample.student.save_student`).
        """
        super().__init__()
        self.window = check_window(window)
        if not (isinstance(uncond_prob, (int, float)) and 0.0 <= uncond_prob <= 1.0):
            raise UserError(f"--model.uncond_prob is a probability in [0, 1]; got {uncond_prob}.")
        check_optimizer(lr, weight_decay, warmup_steps)
        if isinstance(eval_points, bool) or not isinstance(eval_points, int) or eval_points < 1:
            raise UserError(f"--model.eval_points must be an integer >= 1; got {eval_points!r}.")
        if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 1:
            raise UserError(f"--model.eval_images must be an integer >= 1; got {eval_images!r}.")
        if export_dir is not None:
            check_writable(export_dir, "--model.export_dir")
        known = set(StudentConfig.__dataclass_fields__)
        unknown = sorted(set(student or {}) - {"radius", "width", "mlp_ratio"})
        if unknown:
            what = "is set by the teacher" if set(unknown) <= known else "is not a student option"
            raise UserError(f"--model.student.{unknown[0]} {what}; the student takes radius, width and mlp_ratio.")
        self.save_hyperparameters()
        teacher_model = load(teacher, device="cpu").eval().requires_grad_(False)
        if teacher_model.num_classes is None:
            raise UserError(f"The student is class-conditional; {teacher!r} is a text model.")
        c, hh, _ = teacher_model.sample_shape
        cfg = replace(
            StudentConfig(
                in_channels=int(c),
                sample_size=int(hh),
                patch_size=int(teacher_model.patch_size),
                num_classes=int(teacher_model.num_classes),
            ),
            **(student or {}),
        )
        cfg.check()
        object.__setattr__(self, "teacher", teacher_model)  # frozen, not a submodule: not in the checkpoint nor EMA
        self.student = StudentDenoiser(
            StudentNet(cfg),
            teacher_model.schedule,
            name=f"{teacher}/student",
            dataset=teacher_model.dataset,
            scheduler_config=teacher_model.scheduler_config,
            default_guidance=teacher_model.default_guidance,
            teacher=teacher,
        )
        steps = outside_steps(self.window, teacher_model.schedule.num_train_timesteps)
        self.register_buffer("steps", torch.cat([steps["low"], steps["high"]]), persistent=False)
        self.register_buffer("abar", teacher_model.schedule.alphas_cumprod().float(), persistent=False)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def _batch(self, x0: torch.Tensor) -> torch.Tensor:
        vae = getattr(self.teacher, "vae", None)
        if vae is not None and x0.shape[1] == 3:  # an image batch of a latent model
            x0 = self.teacher.encode(x0)
        return x0

    def _loss(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x0.shape[0]
        T = self.teacher.schedule.num_train_timesteps
        k = self.steps[torch.randint(0, len(self.steps), (b,), device=x0.device, generator=generator)]
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        drop = torch.rand(b, device=x0.device, generator=generator) < self.hparams.uncond_prob
        y = torch.where(drop, torch.full_like(y, NULL), y)
        abar = self.abar[k].view(b, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        t = k.double() / T
        with torch.no_grad():
            target = self.teacher(xt, t, y).float()
        return F.mse_loss(self.student(xt, t, y).float(), target)

    def training_step(self, batch, batch_idx):
        x0, y = batch
        loss = self._loss(self._batch(x0), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        g = torch.Generator(device=x0.device).manual_seed(batch_idx)
        self.log("val/loss", self._loss(self._batch(x0), y, generator=g), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        # Callbacks' on_train_end ran first: EMAWeightAveraging has copied the averaged weights into the student.
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def export(self, folder) -> None:
        """Write the student (:func:`critsample.student.save_student`) with its record: the held-out error
        (:func:`distill_error` on the datamodule's validation data), FLOPs next to the teacher's, training command."""
        student = self.student.eval()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        error = None
        if datamodule is not None:
            batches = list(datamodule.val_dataloader())
            n = self.hparams.eval_images
            x0 = self._batch(torch.cat([b[0] for b in batches])[:n].to(self.device))
            y = torch.cat([b[1] for b in batches])[:n].to(self.device)
            error = distill_error(student, self.teacher, x0, y, self.window, points=self.hparams.eval_points)
        ratio = student.flops_per_forward / teacher_flops(self.teacher)
        cfg = student.config
        save_student(
            student,
            folder,
            architecture=(
                f"StudentNet: patch {cfg.patch_size} embedding to {cfg.width} channels per token, "
                f"{cfg.depth} residual block(s) each with one {'3x3' if cfg.radius else '1x1'} convolution at token "
                f"resolution, per-token LayerNorm, FiLM from time and class (null class {cfg.num_classes}), "
                f"1x1 MLP x{cfg.mlp_ratio}; learned position table; eps prediction"
            ),
            window=list(self.window),
            uncond_prob=self.hparams.uncond_prob,
            global_step=int(self.global_step),
            command=shlex.join(["critsample", *sys.argv[1:]]) if sys.argv and "critsample" in sys.argv[0] else None,
            heldout_error=error,
            teacher_flops_per_forward=teacher_flops(self.teacher),
            flops_ratio=ratio,
            hparams={k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()},
        )
        self.student.train()
