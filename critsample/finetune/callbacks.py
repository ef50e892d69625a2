"""Lightning callbacks of the fine-tunes: evaluation during training, and a check that DDP ranks stay in sync.

:class:`TrainingEvaluation` measures, every few validation runs, what the locality-regularized fine-tune is for:

* the conditioning gap (paper eq. 6) and the locality gap (eq. 7) at a few times t, on a fixed batch of validation
  images noised forward (``probes.gaps``), and
* samples of the adaptive plan (guided global inside the window, local conditional outside by default) next to full
  guidance, with the class accuracy of a classifier (the bundled digits classifier by default), their cost in network
  evaluations, and image grids.

Everything goes to the trainer's loggers (W&B, offline by default): numbers with ``LightningModule.log``, grids with
``log_image``. It runs inside ``DiTModule.validation_step`` (which calls ``evaluate_in_validation_step``) so that
sharded strategies have gathered the parameters, and with the EMA weights when ``EMAWeightAveraging`` is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..errors import UserError
from ..evaluate import generate
from ..metrics import digits_fid
from ..models.classifiers import load_classifier
from ..plans import DEFAULT_OUTSIDE, adaptive, full_guidance
from ..probes.gaps import score_gaps, train_states
from ..report import image_grid
from ..store import atomic_write


class TrainingEvaluation(Callback):
    def __init__(
        self,
        every_n_val_epochs: int = 1,
        times: list[float] = [0.1, 0.3, 0.5, 0.7, 0.9],  # noqa: B006  (jsonargparse shows the default)
        radius: int | None = None,
        num_images: int = 16,
        samples_per_class: int = 5,
        num_classes: int = 10,
        steps: int = 25,
        guidance: float | None = None,
        window: tuple[float, float] | None = None,
        outside: str = DEFAULT_OUTSIDE,
        classifier: str | None = "digits",
        fid: bool = False,
        seed: int = 0,
    ):
        """
        Args:
            every_n_val_epochs: evaluate on every n-th validation run (sanity checks excluded); 0 = never.
            times: diffusion times t (0 = clean, 1 = noise) of the conditioning and locality gaps.
            radius: local radius of the locality gap and of the adaptive plan (None = the radius schedule's, else 1).
            num_images: size of the fixed batch of validation images (the first ones of the validation set).
            samples_per_class: samples of each of the first ``num_classes`` classes, per plan.
            num_classes: how many classes to sample (the first ones; at most the model's).
            steps: sampler steps of both plans (DDIM for DiTs).
            guidance: guidance scale (None = the module's ``val_guidance``).
            window: critical window of the adaptive plan (None = the radius schedule's window).
            outside: the adaptive plan's denoiser outside the window (local-cond, local-uncond, global-uncond).
            classifier: classifier of the samples' class accuracy (``digits``, ``resnet-50``, an import path) or None.
            fid: also log digits-FID of the samples against the test split (digits models only; noisy below ~500).
            seed: seed of the noise of the gaps and of the samples (the same at every evaluation).
        """
        super().__init__()
        if every_n_val_epochs < 0:
            raise UserError(f"every_n_val_epochs must be >= 0; got {every_n_val_epochs}.")
        if any(not 0.0 < float(t) <= 1.0 for t in times):
            raise UserError(f"Gap times lie in (0, 1] (t: 0 = clean, 1 = noise); got {list(times)}.")
        self.every = every_n_val_epochs
        self.times = [float(t) for t in times]
        self.radius = radius
        self.num_images = num_images
        self.samples_per_class = samples_per_class
        self.num_classes = num_classes
        self.steps = steps
        self.guidance = guidance
        self.window = window
        self.outside = outside
        self.classifier_name = classifier
        self.fid = fid
        self.seed = seed
        self.runs = 0  # validation runs seen (checkpointed, so resumed runs keep the cadence)
        self._classifier = None
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: dict[str, float] = {}  # the numbers of the latest evaluation

    # -- cadence -------------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        return self.every > 0 and not trainer.sanity_checking and self.runs % self.every == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.runs += 1

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))

    # -- evaluation ----------------------------------------------------------------------------
    def _plan_params(self, module) -> tuple[tuple[float, float], int]:
        sched = getattr(module, "radius_schedule", None)
        window = self.window or (sched.window if sched is not None else None)
        if window is None:
            raise UserError("TrainingEvaluation needs a window: set its window or the module's radius_schedule.")
        radius = self.radius if self.radius is not None else (sched.radius if sched is not None else 1)
        return tuple(window), int(radius)

    def _fixed_batch(self, trainer: L.Trainer, module) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num_images`` validation examples in model space (VAE-encoded when they are images)."""
        if self._fixed is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            data = loader.dataset
            items = [data[i] for i in range(min(self.num_images, len(data)))]
            x, y = torch.utils.data.default_collate(items)
            x, y = x.to(module.device).float(), torch.as_tensor(y).to(module.device).long()
            if module.vae is not None and x.shape[1] == 3:
                x = module.denoiser.encode(x, generator=torch.Generator(device=x.device).manual_seed(self.seed))
            self._fixed = (x, y)
        return self._fixed

    @torch.no_grad()
    def gaps(self, module, x0: torch.Tensor, y: torch.Tensor, radius: int) -> dict[str, float]:
        """Mean over the fixed batch of the score gaps (eqs. 6 and 7) at each of ``times``."""
        den = module.denoiser
        g = torch.Generator(device=x0.device).manual_seed(self.seed)
        states = train_states(den, x0, self.times, g)
        out = score_gaps(den, states, self.times, y, [radius], max_batch=max(1, 4 * len(y)))
        metrics = {}
        for i, t in enumerate(self.times):
            metrics[f"eval/cond_gap/t={t:g}"] = float(out["cond_gap_score"][:, i].mean())
            metrics[f"eval/loc_gap_uncond_r{radius}/t={t:g}"] = float(out["loc_gap_uncond_score"][:, i, 0].mean())
            metrics[f"eval/loc_gap_cond_r{radius}/t={t:g}"] = float(out["loc_gap_cond_score"][:, i, 0].mean())
        return metrics

    @torch.no_grad()
    def samples(self, module, window: tuple[float, float], radius: int) -> tuple[dict[str, float],
                                                                                 dict[str, torch.Tensor]]:
        """Adaptive vs full guidance: class accuracy (and FID), network evaluations per sample, image grids."""
        den = module.denoiser
        w = self.guidance if self.guidance is not None else float(module.hparams.val_guidance)
        k = min(self.num_classes, den.num_classes or 0)
        labels = torch.arange(k).repeat_interleave(self.samples_per_class)
        plans = {"full": full_guidance(den, self.steps, w),
                 "adaptive": adaptive(den, self.steps, w, window, radius, self.outside)}
        metrics, grids = {}, {}
        for name, plan in plans.items():
            gen = generate(den, plan, labels, seed=self.seed, batch_size=max(1, len(labels)), progress=False)
            metrics[f"eval/{name}_forwards"] = float(plan.forwards)
            if self.classifier_name:
                clf = self._get_classifier(module)
                pred = clf.predict_logits(gen.images.to(module.device)).argmax(dim=1).cpu()
                metrics[f"eval/{name}_accuracy"] = float((pred == gen.labels).double().mean())
            if self.fid:
                metrics[f"eval/{name}_fid"] = float(digits_fid(gen.images))
            grids[f"eval/{name}_samples"] = image_grid(gen.images, nrow=self.samples_per_class)
        return metrics, grids

    def _get_classifier(self, module):
        if self._classifier is None:
            self._classifier = load_classifier(self.classifier_name, device=module.device).eval()
        return self._classifier

    def evaluate(self, trainer: L.Trainer, module) -> dict[str, float]:
        """Compute and log one evaluation; returns its numbers."""
        window, radius = self._plan_params(module)
        x0, y = self._fixed_batch(trainer, module)
        was_training = module.training
        module.eval()
        try:
            metrics = self.gaps(module, x0, y, radius)
            sample_metrics, grids = self.samples(module, window, radius)
        finally:
            module.train(was_training)
        metrics.update(sample_metrics)
        for name, value in metrics.items():
            module.log(name, value, on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                for key, grid in grids.items():
                    _log_image(logger, key, grid, trainer.global_step)
        self.last = metrics
        return metrics

    def evaluate_in_validation_step(self, trainer: L.Trainer, module) -> None:
        if self._due(trainer):
            self.evaluate(trainer, module)


def _log_image(logger, key: str, grid, step: int) -> None:
    if hasattr(logger, "log_image"):  # W&B
        logger.log_image(key, [grid], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
        logger.experiment.add_image(key, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")


class RankSyncCheck(Callback):
    """Checks that data-parallel ranks hold identical parameters (DDP keeps them equal by averaging gradients; not for
    FSDP, whose ranks hold different shards by design).

    At the end of training (and every ``every_n_steps`` steps if > 0) each rank computes a float64 checksum of every
    parameter tensor; the checksums are all-gathered and compared. A mismatch raises on every rank. ``path``: rank 0
    writes the per-rank checksums, and a checksum of each rank's first training batch (ranks should see different
    data), as JSON.
    """

    def __init__(self, every_n_steps: int = 0, path: str | None = None, atol: float = 0.0):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.path = path
        self.atol = atol
        self._first_batch: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first_batch is None:
            self._first_batch = float(batch[0].double().sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    @torch.no_grad()
    def check(self, trainer, pl_module) -> dict:
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])  # (P,)
        extra = torch.tensor([self._first_batch or 0.0, float(trainer.global_step)], dtype=torch.float64)
        mine = torch.cat([sums, extra]).to(pl_module.device)
        gathered = trainer.strategy.all_gather(mine)  # (world, P + 2), or (P + 2,) on one device
        gathered = gathered.reshape(-1, mine.numel()).cpu()
        params = gathered[:, :-2]
        spread = float((params - params[0]).abs().max())
        report = {
            "world_size": int(gathered.shape[0]),
            "global_step": [int(s) for s in gathered[:, -1]],
            "param_checksums": [float(s) for s in params.sum(dim=1)],
            "first_batch_checksums": [float(s) for s in gathered[:, -2]],
            "max_abs_difference": spread,
        }
        if trainer.is_global_zero and self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(report, indent=2))
        if spread > self.atol:
            raise RuntimeError(f"Ranks diverged at step {trainer.global_step}: parameter checksums differ by "
                               f"{spread:g}.")
        return report
