"""``critsample fit``: argv -> LightningCLI over :class:`~critsample.finetune.module.DiTModule` and the
DataModules of ``critsample.finetune.data`` (``--config``, ``--print_config``) -> train."""

from __future__ import annotations

import os
import warnings

import wandb
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from ..errors import UserError
from ..finetune import data as _data  # noqa: F401  (imported so LightningCLI finds the DataModules by class path)
from ..finetune.module import DiTModule
from .args import config_path, one_sentence, read_config_file


def _user_error(e: BaseException) -> UserError | None:
    cause = e
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause


def run_fit(args: list[str]) -> int:
    """Train or fine-tune. Weights & Biases runs offline unless the user sets WANDB_MODE."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # LightningCLI warns when sys.argv is also set; critsample passes the command's own argv on purpose.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    config = config_path(args)
    if config is not None:
        read_config_file(config)  # a missing file or a YAML error: one sentence with the file and line
    try:
        LightningCLI(
            DiTModule,
            subclass_mode_data=True,
            args=["fit", *args],
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},  # an error is one sentence, not the whole usage
        )
    except ArgumentError as e:
        cause = _user_error(e)
        raise cause or UserError(one_sentence(str(e))) from None
    except ValueError as e:  # jsonargparse wraps a schedule's UserError in a multi-line report: keep its one sentence
        raise (_user_error(e) or e) from None
    if wandb.run is not None:  # a later fit in the same process must not append to this run
        wandb.finish()
    return 0
