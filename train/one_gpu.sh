#!/usr/bin/env bash
# One GPU: locality-regularized fine-tune of DiT-XL/2-256 on precomputed latents.
#   bash train/one_gpu.sh /data/imagenet/train /data/latents/imagenet256.pt
# Interrupted? Run the same command again: `ckpt_path: last` resumes from runs/dit-xl-finetune/checkpoints/last.ckpt.
set -euo pipefail
IMAGES=${1:?image folder (one sub-folder per class)}
LATENTS=${2:-/data/latents/imagenet256.pt}
[ -f "$LATENTS" ] || python -m critsample.finetune.encode --model dit-xl --images "$IMAGES" --out "$LATENTS"
critsample fit --config configs/fit/dit-xl-latents.yaml --data.init_args.path="$LATENTS" \
  --trainer.devices=1 "${@:3}"
