"""``critsample fit``: argv -> LightningCLI over :class:`~critsample.finetune.module.DiTModule` and the
DataModules of ``critsample.finetune.data`` (``--config``, ``--print_config``) -> train."""

from __future__ import annotations

import os

import wandb
from lightning.pytorch.cli import LightningCLI

from ..errors import UserError
from ..finetune import data as _data  # noqa: F401  (imported so LightningCLI finds the DataModules by class path)
from ..finetune.module import DiTModule


def run_fit(args: list[str]) -> int:
    """Train or fine-tune. Weights & Biases runs offline unless the user sets WANDB_MODE."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        LightningCLI(
            DiTModule,
            subclass_mode_data=True,
            args=["fit", *args],
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except ValueError as e:  # jsonargparse wraps a schedule's UserError in a multi-line report: keep its one sentence
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or e) from None
    if wandb.run is not None:  # a later fit in the same process must not append to this run
        wandb.finish()
    return 0
