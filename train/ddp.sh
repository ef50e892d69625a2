#!/usr/bin/env bash
# Several GPUs of one machine with DDP (one process per GPU, gradients averaged; each rank keeps a full model + EMA).
#   bash train/ddp.sh 8 /data/latents/imagenet256.pt
# The per-GPU batch is data.init_args.batch_size: the global batch is that times the number of GPUs.
set -euo pipefail
GPUS=${1:-8}
LATENTS=${2:-/data/latents/imagenet256.pt}
critsample fit --config configs/fit/dit-xl-latents.yaml --data.init_args.path="$LATENTS" \
  --trainer.devices="$GPUS" --trainer.strategy=ddp "${@:3}"
