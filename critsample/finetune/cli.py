"""``critsample fit``: LightningCLI over :class:`DiTModule` and the DataModules (``--print_config`` works)."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI


def run_fit(args: list[str]) -> int:
    """Train or fine-tune. Weights & Biases runs offline unless the user sets WANDB_MODE."""
    from . import data as _data  # noqa: F401  (registers DataModules for class_path lookup)
    from .module import DiTModule

    os.environ.setdefault("WANDB_MODE", "offline")
    LightningCLI(
        DiTModule,
        subclass_mode_data=True,
        args=["fit", *args],
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    import wandb

    if wandb.run is not None:  # a later fit in the same process must not append to this run
        wandb.finish()
    return 0
