"""FSDP for DiT fine-tunes, spelled so a YAML config can select it.

Lightning's ``FSDPStrategy(auto_wrap_policy={BasicTransformerBlock})`` shards every DiT block as its own FSDP unit,
but LightningCLI cannot parse ``auto_wrap_policy`` (a set of classes, typed only for the type checker), so a config
that sets it loses it silently. :class:`DiTFSDPStrategy` is that same strategy with the block classes given by import
path::

    trainer:
      strategy:
        class_path: critsample.finetune.strategies.DiTFSDPStrategy
        init_args: {wrap: [diffusers.models.attention.BasicTransformerBlock], activation_checkpointing: true}

Lightning's ``EMAWeightAveraging`` does not work with it (see ``train/README.md``).
"""

from __future__ import annotations

import importlib
from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy

from ..errors import UserError

DIT_BLOCK = "diffusers.models.attention.BasicTransformerBlock"


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"Cannot import the FSDP unit class {path!r}; give 'package.module.Class'.") from None


class DiTFSDPStrategy(FSDPStrategy):
    def __init__(
        self,
        wrap: list[str] = [DIT_BLOCK],  # noqa: B006  (shown as the default by --print_config)
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            wrap: classes (import paths) whose instances become FSDP units: the DiT transformer blocks.
            activation_checkpointing: recompute the activations of those blocks in the backward pass (less memory).
            sharding_strategy: FULL_SHARD (parameters, gradients, optimizer state), SHARD_GRAD_OP, NO_SHARD,
                HYBRID_SHARD.
            state_dict_type: checkpoints as one full file on rank 0, or one shard per rank ("sharded", for big models).
            cpu_offload: keep parameters and gradients on the CPU between uses.
            process_group_backend: None = nccl on GPUs.
        """
        blocks = {_class(p) for p in wrap}
        super().__init__(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            process_group_backend=process_group_backend,
        )
