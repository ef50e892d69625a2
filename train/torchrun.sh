#!/usr/bin/env bash
# Several nodes with torchrun: run this script once on every node (same MASTER_ADDR, NODE_RANK = 0..NNODES-1).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash train/torchrun.sh /data/latents/imagenet256.pt
# Lightning reads torchrun's environment (TorchElasticEnvironment); num_nodes and devices must match torchrun's.
# Add `--config configs/fit/fsdp.yaml` after the first --config to shard with FSDP instead of DDP.
set -euo pipefail
LATENTS=${1:-/data/latents/imagenet256.pt}
NNODES=${NNODES:?number of nodes}
NODE_RANK=${NODE_RANK:?rank of this node, 0..NNODES-1}
MASTER_ADDR=${MASTER_ADDR:?host name of node 0}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS_PER_NODE:-8}
torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  -m critsample.cli fit --config configs/fit/dit-xl-latents.yaml --data.init_args.path="$LATENTS" \
  --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS" --trainer.strategy=ddp "${@:2}"
