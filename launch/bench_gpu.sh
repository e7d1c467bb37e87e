#!/usr/bin/env bash
# Every `sslfw bench` table on one GPU in bf16 for ViT-S/16 at 224 px, in one command (about 4 minutes on an
# H200, data generation included). Usage: bash launch/bench_gpu.sh [OUT]   (default runs/bench_gpu)
# Prints the tables and leaves OUT/bench.{json,md} (shards as packed) and OUT/raw/bench.{json,md} (the same images
# packed with --pixels raw, for the loader-bound paths) and OUT/zstd/bench.{json,md} (--pixels zstd: the pool's
# stream and pseudo-labelling); copy them into BENCHMARKS.md with the date.
set -euo pipefail
OUT=${1:-runs/bench_gpu}
PY=${PYTHON:-python3}
D=$OUT/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 3,600 images keep generation under a minute on 16 cores.
bash "$(dirname "$0")/bench_images.sh" "$D" 1200 2400
$PY -m sslfw bench all --config configs/bench_gpu.yaml --shards "$D/shards" --out "$OUT" \
    --reps 5 --steps 10 --batches 10 --workers 0,1,4,8
$PY -m sslfw bench data,pseudolabel --config configs/bench_gpu.yaml --shards "$D/shards_raw" --out "$OUT/raw" \
    --reps 5 --batches 10 --workers 0,1,4,8
for px in shards shards_zstd shards_raw; do  # the PNG pool's stream in each pixel format
    $PY -m sslfw bench data,pseudolabel --config configs/bench_gpu.yaml --shards "$D/$px" --set unlabelled \
        --out "$OUT/pool_$px" --reps 5 --batches 10 --workers 0,1,4,8
done
# The step before/after each speed-up (torch.compile included), and USB's own FixMatch step beside sslfw's. A GPU
# machine without the package index needs USB's wheels fetched beforehand: SSLFW_USB_WHEELS=DIR (sslfw/bench/usb.py).
$PY -m sslfw bench speedups --config configs/bench_gpu.yaml --shards "$D/shards" --out "$OUT/speedups" \
    --reps 5 --steps 10 --compile
$PY -m sslfw bench usb --config configs/bench_gpu.yaml --shards "$D/shards" --out "$OUT/usb" --reps 5 --steps 10
# fp16 for cards without bf16 (V100, T4): accelerate's gradient scaler on, 30 FixMatch steps must train (finite
# losses, no skipped step); the last log line shows the loss and the run's config records precision fp16.
$PY -m sslfw train --config configs/bench_gpu.yaml --data.shards="$D/shards" --run_dir="$OUT/fp16" \
    --train.precision=fp16 --train.steps=30 --eval.every=0 --ckpt.every=30 --algorithm.name=fixmatch
tail -n 2 "$OUT/fp16/history.jsonl"; grep -n "precision" "$OUT/fp16/config.yaml"
