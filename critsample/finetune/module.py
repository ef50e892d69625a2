"""The LightningModule that trains and fine-tunes diffusers DiTs (dit-digits from scratch, DiT-XL from its weights).

Loss: epsilon prediction, ``|| eps_theta(x_k, k, y) - eps ||^2`` (Ho et al. 2020, eq. 14), optionally weighted over
diffusion time and trained with a time-dependent attention radius (``schedules.py``; paper sec. 5). Class labels are
dropped to the null class with probability ``class_dropout`` for classifier-free guidance, once per sample, here
(diffusers' LabelEmbedding would otherwise drop independently in every block).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiTTransformer2DModel
from lightning.pytorch.strategies import FSDPStrategy

from ..attention import check_radius
from ..denoisers import NULL
from ..errors import UserError
from ..models import load
from ..models.dit import DiTDenoiser
from ..noise import Schedule
from ..report import image_grid
from ..sampling import Plan
from ..seeded import SeededBatch, sample_batch
from ..store import atomic_folder, atomic_write, check_writable
from .schedules import LossWeighting, RadiusSchedule

DIGITS_DIT = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    sample_size=8,
    patch_size=1,
    num_embeds_ada_norm=10,
    norm_num_groups=1,
)


POSITIVE_SIZES = ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size", "patch_size", "in_channels",
                  "out_channels", "num_embeds_ada_norm")


def check_optimizer(lr: float, weight_decay: float, warmup_steps: int) -> None:
    """AdamW's options of every critsample LightningModule (``--model.lr``, ``weight_decay``, ``warmup_steps``)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"--model.lr must be a positive number; got {lr}.")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"--model.weight_decay must be a number >= 0; got {weight_decay}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise UserError(f"--model.warmup_steps must be an integer >= 0; got {warmup_steps!r}.")


def check_options(model: dict | None, num_classes: int | None, lr: float, weight_decay: float, warmup_steps: int,
                  class_dropout: float, val_steps: int, export_dir: str | None) -> None:
    """The module's options that need no data, one sentence each (``critsample fit`` names them ``--model.*``)."""
    model = {**DIGITS_DIT, **model} if model is not None else {}  # None: fine-tuning, the loaded model's own config
    for k in POSITIVE_SIZES:
        v = model.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--model.model.{k} must be an integer >= 1; got {v!r}.")
    if model and model["sample_size"] % model["patch_size"]:
        raise UserError(f"--model.model.sample_size {model['sample_size']} must be a multiple of "
                        f"--model.model.patch_size {model['patch_size']}.")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes,
                                                                                    int) or num_classes < 1):
        raise UserError("--model.num_classes must be an integer >= 1 (or omitted: the model's num_embeds_ada_norm); "
                        f"got {num_classes!r}.")
    rows = model.get("num_embeds_ada_norm")
    if num_classes is not None and rows is not None and num_classes > rows:
        raise UserError(f"--model.num_classes {num_classes} is more than the model's {rows} class rows "
                        "(--model.model.num_embeds_ada_norm).")
    check_optimizer(lr, weight_decay, warmup_steps)
    if not (isinstance(class_dropout, (int, float)) and 0.0 <= class_dropout <= 1.0):
        raise UserError(f"--model.class_dropout is a probability in [0, 1]; got {class_dropout}.")
    if isinstance(val_steps, bool) or not isinstance(val_steps, int) or val_steps < 1:
        raise UserError(f"--model.val_steps must be an integer >= 1; got {val_steps!r}.")
    if export_dir is not None:
        check_writable(export_dir, "--model.export_dir")


class DiTModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any] | None = None,
        init_from: str | None = None,
        num_classes: int | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        class_dropout: float = 0.1,
        radius_schedule: RadiusSchedule | None = None,
        loss_weighting: LossWeighting | None = None,
        val_guidance: float = 2.0,
        val_steps: int = 50,
        export_dir: str | None = None,
    ):
        """
        Args:
            model: diffusers ``DiTTransformer2DModel`` config for training from scratch (default: the dit-digits one).
            init_from: a model name (``dit-digits``, ``dit-xl``) or a diffusers folder to fine-tune instead.
            num_classes: number of classes (default: the model's ``num_embeds_ada_norm``); null class = this number.
            lr: AdamW learning rate (constant after a linear warm-up of ``warmup_steps``).
            class_dropout: probability of replacing a label by the null class (classifier-free guidance).
            radius_schedule: attention radius as a function of diffusion time (None = global attention everywhere).
            loss_weighting: weight of the loss as a function of diffusion time (None = uniform).
            val_guidance: guidance scale of the sample grids logged at validation.
            val_steps: DDIM steps of those sample grids.
            export_dir: where ``on_train_end`` writes the (EMA) transformer with ``save_pretrained``.
        """
        super().__init__()
        check_options(None if init_from else (model or {}), num_classes, lr, weight_decay, warmup_steps, class_dropout,
                      val_steps, export_dir)
        self.save_hyperparameters()
        # Plain dicts (a checkpoint's hyperparameters) become schedules; the logged hyperparameters hold the resolved
        # schedules, so a window seeded from a summary.json is visible in the checkpoint and the logger's config.
        if isinstance(radius_schedule, dict):
            radius_schedule = RadiusSchedule(**radius_schedule)
        if isinstance(loss_weighting, dict):
            loss_weighting = LossWeighting(**loss_weighting)
        for name, sched in (("radius_schedule", radius_schedule), ("loss_weighting", loss_weighting)):
            if sched is not None:
                self.hparams[name] = {**dataclasses.asdict(sched), "window": list(sched.window)}
        self.radius_schedule = radius_schedule
        self.loss_weighting = loss_weighting
        if init_from is not None:
            base = load(init_from, device="cpu")
            if not isinstance(base, DiTDenoiser):
                raise UserError(f"Fine-tuning needs a DiT model; {init_from!r} is a {type(base).__name__}.")
            transformer, schedule, self.vae = base.transformer.train(), base.schedule, base.vae
        else:
            transformer = DiTTransformer2DModel(**{**DIGITS_DIT, **(model or {})})
            schedule, self.vae = Schedule(), None
        if self.vae is not None:
            self.vae.requires_grad_(False)
        # Sample (validation grids, evaluation callbacks) with the integrator the model is loaded with after export:
        # the pretrained model's scheduler config, or the one ``export`` writes (DDIM without x0 clipping; diffusers'
        # default clip_sample=True costs dit-digits most of its class accuracy).
        self.denoiser = DiTDenoiser(
            transformer, schedule, self.vae, num_classes=num_classes, name=init_from or "dit",
            scheduler_config=base.scheduler_config if init_from else {"clip_sample": False},
            dataset=base.dataset if init_from else None,
        )
        self.denoiser.default_guidance = float(getattr(base, "default_guidance",
                                                       val_guidance)) if init_from else val_guidance
        self.schedule = schedule
        self.register_buffer("abar", schedule.alphas_cumprod().float(), persistent=False)
        for m in transformer.modules():  # labels are dropped once per sample in training_step instead
            if hasattr(m, "dropout_prob") and m.__class__.__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
        if radius_schedule is not None:
            check_radius(radius_schedule.radius, self.denoiser.token_grid, bound="local", model=self.denoiser.name)

    @property
    def transformer(self) -> DiTTransformer2DModel:
        return self.denoiser.transformer

    # -- training ------------------------------------------------------------------------------
    def _loss(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        size = self.transformer.config.sample_size
        if tuple(x0.shape[-2:]) != (size, size):
            what = "latents" if self.vae is not None else "images"
            raise UserError(f"--model.model.sample_size {size} does not match the data's {x0.shape[-2]}x{x0.shape[-1]} "
                            f"{what}; set it to {x0.shape[-1]} (or change the data's resolution).")
        b = x0.shape[0]
        T = self.schedule.num_train_timesteps
        k = torch.randint(0, T, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        abar = self.abar[k].view(b, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        t = k.double() / T
        radius = None
        if self.radius_schedule is not None:
            grid = max(self.denoiser.grid(x0))
            gen_cpu = None if generator is None else torch.Generator().manual_seed(int(generator.initial_seed()))
            radius = self.radius_schedule.radii(t.cpu(), self.global_step, grid, gen_cpu).to(x0.device)
        labels = torch.where(y == NULL, torch.full_like(y, self.denoiser.null_id), y)
        out = self.transformer(
            xt, timestep=k, class_labels=labels,
            cross_attention_kwargs={"radius": radius, "grid": self.denoiser.grid(xt)}
        ).sample
        c = self.denoiser.in_channels
        per_sample = F.mse_loss(out[:, :c].float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.denoiser.learned_sigma:
            per_sample = per_sample + self._vlb(out, xt, x0, k)
        if self.loss_weighting is not None:
            per_sample = per_sample * self.loss_weighting.weights(t.cpu()).to(per_sample)
        return per_sample.mean()

    def _vlb(self, out, xt, x0, k) -> torch.Tensor:
        """Variational bound term that trains DiT's learned variance (Nichol & Dhariwal 2021, eq. 16), the mean
        detached as in the improved-DDPM hybrid loss; KL of Gaussians in nats per dimension."""
        c = self.denoiser.in_channels
        eps, v = out[:, :c].detach().float(), out[:, c:].float()
        ab = self.abar.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        beta = (1 - ab / ab_prev).float()
        post_var = beta * (1 - ab_prev.float()) / (1 - ab.float())
        log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        shape = (-1, 1, 1, 1)
        frac = (v + 1) / 2
        log_var = frac * torch.log(beta[k]).view(shape) + (1 - frac) * log_post[k].view(shape)
        abk, abp = self.abar[k].view(shape), ab_prev.float()[k].view(shape)
        coef0 = beta[k].view(shape) * abp.sqrt() / (1 - abk)
        coef1 = (1 - abp) * (1 - beta[k].view(shape)).sqrt() / (1 - abk)
        pred_x0 = (xt - (1 - abk).sqrt() * eps) / abk.sqrt()
        mean_true, mean_pred = coef0 * x0 + coef1 * xt, coef0 * pred_x0 + coef1 * xt
        kl = 0.5 * (-1 + log_var - log_post[k].view(shape) + torch.exp(log_post[k].view(shape) - log_var)
                    + (mean_true - mean_pred) ** 2 * torch.exp(-log_var))
        return kl.mean(dim=(1, 2, 3)) * self.schedule.num_train_timesteps / 1000.0

    def training_step(self, batch, batch_idx):
        x0, y = batch
        if self.vae is not None and x0.shape[1] == 3:  # an image batch; latent batches come encoded already
            x0 = self.denoiser.encode(x0)
        drop = torch.rand(y.shape, device=y.device) < self.hparams.class_dropout
        y = torch.where(drop, torch.full_like(y, NULL), y)
        loss = self._loss(x0, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def setup(self, stage: str) -> None:
        # seed_everything gives every rank the same seed: without this, all ranks would draw the same t, noise and
        # label dropout for their (different) images, and the global batch would cover fewer diffusion times.
        if stage == "fit" and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        if self.vae is not None and x0.shape[1] == 3:
            x0 = self.denoiser.encode(x0)
        g = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self._loss(x0, y, generator=g)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0:
            self._log_grid()
            # Evaluation callbacks (callbacks.TrainingEvaluation) run here, inside the strategy's forward, so that
            # sharded strategies (FSDP) have gathered the parameters; every rank runs them (forwards are collective).
            for cb in self.trainer.callbacks:
                if hasattr(cb, "evaluate_in_validation_step"):
                    cb.evaluate_in_validation_step(self.trainer, self)

    @torch.no_grad()
    def _log_grid(self) -> None:
        """A 10 x 10 (class x sample) grid of guided samples, logged as an image."""
        if self.denoiser.num_classes is None or self.trainer.sanity_checking or not self.loggers:
            return

        n_cls = min(self.denoiser.num_classes, 10)
        labels = torch.arange(n_cls, device=self.device).repeat_interleave(10)
        plan = Plan.guided(self.hparams.val_steps, self.hparams.val_guidance)
        grid = image_grid(sample_batch(self.denoiser, plan, labels, SeededBatch(0, 0, len(labels))), nrow=10)  # seed 0
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("val/samples", [grid], step=self.global_step)

    def configure_optimizers(self):
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if not self.hparams.export_dir:
            return

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Parameters are shards here: gather the full state dict (a collective, every rank calls it; rank 0
            # receives it) and export a full copy of the transformer.
            state = self.trainer.strategy.lightning_module_state_dict()
            if self.trainer.is_global_zero:
                self.export(self.hparams.export_dir, transformer=self.transformer_from_state_dict(state))
        elif self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def transformer_from_state_dict(self, state: dict[str, torch.Tensor]) -> DiTTransformer2DModel:
        """A new transformer with this module's config and the ``denoiser.transformer.*`` tensors of ``state``."""
        prefix = "denoiser.transformer."
        full = DiTTransformer2DModel.from_config(self.transformer.config)
        full.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return full

    def export(self, folder: str | Path, transformer: DiTTransformer2DModel | None = None, **meta) -> Path:
        """Write a loadable model folder: ``transformer/`` (diffusers, EMA weights once training ended),
        ``scheduler/scheduler_config.json`` and ``critsample.json`` (classes, pixel space, default guidance, ``meta``).
        ``transformer``: a full copy to write instead of this module's (gathered from shards under FSDP)."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:  # a kill mid-export never leaves a half-written model folder
            (transformer or self.transformer).save_pretrained(tmp / "transformer", safe_serialization=True)
            if self.vae is not None:  # a latent-space model is loadable only with its (frozen, unchanged) VAE
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            s = self.schedule
            DDIMScheduler(
                num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                beta_schedule=s.beta_schedule, clip_sample=False,
            ).save_pretrained(tmp / "scheduler")
            self._write_info(tmp, meta)
        return folder

    def _write_info(self, folder: Path, meta: dict) -> None:
        """``critsample.json``: what a loader needs beside the diffusers parts, and the training record ``meta``."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = {
            "num_classes": self.denoiser.num_classes,
            "dataset": self.denoiser.dataset or getattr(datamodule, "dataset_name", None),
            "null_class": self.denoiser.null_id,
            "space": "pixels in [-1, 1]" if self.vae is None else "VAE latents (scaled)",
            "default_guidance": self.hparams.val_guidance,
            "global_step": int(self.global_step),
            **meta,
        }
        atomic_write(folder / "critsample.json", json.dumps(info, indent=2))
