"""``critsample fit``: argv -> LightningCLI over :class:`~critsample.finetune.module.DiTModule` (or the LightningModule
a config names with ``model: class_path:``, e.g. :class:`~critsample.finetune.distill.DistillModule`) and the
DataModules of ``critsample.finetune.data`` (``--config``, ``--print_config``) -> train."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
import wandb
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from ..errors import UserError
from ..finetune import data as _data  # noqa: F401  (imported so LightningCLI finds the DataModules by class path)
from ..finetune.module import DiTModule
from .args import config_path, one_sentence, option_value, read_config_file


def _user_error(e: BaseException) -> UserError | None:
    cause = e
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause


CKPT_WORDS = ("last", "best", "hpc", "registry")  # Lightning's named checkpoints; anything else is a path


def _get(ns, key: str):
    """``ns[key]`` of a jsonargparse namespace, None when absent."""
    try:
        return ns[key]
    except (KeyError, TypeError):
        return None


def check_trainer(cfg) -> None:
    """The fit options Lightning would reject with a traceback (or take silently), one sentence each, before any
    class is instantiated: ``cfg`` is the ``fit`` namespace (trainer.*, data.*, ckpt_path)."""
    max_steps = _get(cfg, "trainer.max_steps")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < -1):
        raise UserError(f"--trainer.max_steps must be an integer >= 0, or -1 for no limit; got {max_steps!r}.")
    accelerator = _get(cfg, "trainer.accelerator")
    if isinstance(accelerator, str):
        if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
            raise UserError(f"--trainer.accelerator {accelerator}: no CUDA GPU is available here; use "
                            "--trainer.accelerator cpu (or auto).")
        if accelerator == "mps":
            raise UserError("--trainer.accelerator mps: Apple MPS is not supported by critsample; use "
                            "--trainer.accelerator cpu (or auto).")
    batch_size = _get(cfg, "data.init_args.batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"--data.batch_size must be an integer >= 1; got {batch_size!r}.")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and str(ckpt) not in CKPT_WORDS:
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise UserError(f"--ckpt_path {ckpt} does not exist or is not a file; give a checkpoint written by "
                            "`critsample fit`, or last.")
        # tensors only: a pickled object in a checkpoint could run code when loaded (mmap: no second copy in memory)
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  (any failure to read it as tensors is the same answer for the user)
            what = "holds pickled objects besides tensors, which could run code when loaded" if isinstance(
                e, pickle.UnpicklingError) else "is not a readable checkpoint"
            raise UserError(f"--ckpt_path {ckpt} {what}; give a checkpoint written by `critsample fit`.") from None


def names_module(args: list[str], config: dict | None) -> bool:
    """Whether the run names its LightningModule (``model: {class_path: ...}`` in the config, or ``--model.class_path``
    / ``--model NAME`` on the command line) instead of configuring :class:`DiTModule`."""
    model = (config or {}).get("model")
    return (isinstance(model, dict) and "class_path" in model) or any(
        option_value(args, name) is not None for name in ("model.class_path", "model"))


class _CLI(LightningCLI):
    """LightningCLI whose options are checked (:func:`check_trainer`) right after parsing, before anything is read or
    built."""

    def _parse_ckpt_path(self) -> None:  # Lightning reads --ckpt_path's hyperparameters first of all: check it before
        sub = self.config.get("subcommand")
        check_trainer(self.config[sub] if sub else self.config)
        super()._parse_ckpt_path()


def run_fit(args: list[str]) -> int:
    """Train or fine-tune. Weights & Biases runs offline unless the user sets WANDB_MODE."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # LightningCLI warns when sys.argv is also set; critsample passes the command's own argv on purpose.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    config = config_path(args)
    # a missing file or a YAML error: one sentence with the file and line
    data = read_config_file(config) if config is not None else None
    named = names_module(args, data)
    try:
        _CLI(
            None if named else DiTModule,  # None: any LightningModule, chosen by its class_path
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
