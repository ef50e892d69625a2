"""``critsample fit``: LightningCLI over :class:`DiTModule` and the DataModules (``--print_config`` works)."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from ..errors import UserError


def run_fit(args: list[str]) -> int:
    """Train or fine-tune. Weights & Biases runs offline unless the user sets WANDB_MODE."""
    from . import data as _data  # noqa: F401  (registers DataModules for class_path lookup)
    from .module import DiTModule

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
    import wandb

    if wandb.run is not None:  # a later fit in the same process must not append to this run
        wandb.finish()
    return 0
