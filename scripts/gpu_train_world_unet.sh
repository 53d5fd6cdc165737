#!/usr/bin/env bash
# The tiny world's UNet trained on a GPU machine in one short prepared run (the instrument issue: "one run of under
# 8 minutes at large batch"): renders the latent shards on every CPU core, then continues the shipped UNet on the
# GPU at a large batch and writes the checkpoint, the log and the exported pipeline folder (EMA weights, the shipped
# storydiffusion.json beside them) under the folder it is given.
#
#   scripts/gpu_train_world_unet.sh FOLDER [STEPS] [DEVICE]      # defaults: 6000 steps, cuda
#   SHARDS=40 PANELS=256 LR=3e-4 scripts/gpu_train_world_unet.sh /tmp/gpu_run
#
# Evaluate the result with `storydiffusion eval --model FOLDER/pipeline --json F` (CPU is fine).
set -euo pipefail
folder=${1:?usage: $0 FOLDER [STEPS] [DEVICE]}
steps=${2:-6000}
device=${3:-cuda}
shards=${SHARDS:-40}
panels=${PANELS:-256}
workers=${WORKERS:-$(nproc)}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$folder/latents"
started=$(date +%s)
for ((i = 0; i < workers && i < shards; i++)); do
    python "$here/scripts/render_world_latents.py" --out "$folder/latents" --shards "$shards" --start "$i" \
        --step "$workers" --threads 1 >"$folder/render_$i.log" 2>&1 &
done
wait
echo "rendered $shards shards in $(($(date +%s) - started)) s"
python "$here/scripts/train_world_unet.py" --init "$here/src/storydiffusion/assets/tiny/unet" --device "$device" \
    --panels "$panels" --steps "$steps" --lr "${LR:-3e-4}" --warmup 100 --part-colour-weight 1.0 \
    --single-share 0.35 --threads 4 --data "$folder/latents" --checkpoint "$folder/checkpoint.pt" \
    --out "$folder/pipeline" --log-every 50 --signal-every "${SIGNAL_EVERY:-500}" --ckpt-every 500 \
    2>&1 | tee "$folder/train.log"
cp "$here/src/storydiffusion/assets/tiny/storydiffusion.json" "$folder/pipeline/"
echo "done in $(($(date +%s) - started)) s: $folder/pipeline"
