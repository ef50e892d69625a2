#!/usr/bin/env bash
# Several GPUs with FSDP: every DiT block (diffusers BasicTransformerBlock) is its own shard unit, with activation
# checkpointing; parameters, gradients and AdamW state are split over the GPUs. configs/fit/fsdp.yaml drops the
# EMAWeightAveraging callback (it cannot average sharded parameters; see train/README.md).
#   bash train/fsdp.sh 8 /data/latents/imagenet256.pt
set -euo pipefail
GPUS=${1:-8}
LATENTS=${2:-/data/latents/imagenet256.pt}
critsample fit --config configs/fit/dit-xl-latents.yaml --config configs/fit/fsdp.yaml \
  --data.init_args.path="$LATENTS" --trainer.devices="$GPUS" "${@:3}"
