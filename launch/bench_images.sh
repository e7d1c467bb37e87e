#!/usr/bin/env bash
# Benchmark images for launch/bench_gpu.sh and launch/bench_before_after.sh: synthetic KonIQ/KADIS-like photos of
# 384x288 (large enough for 256 px crops), packed three times: as files (JPEG labelled sets, PNG pool), --pixels raw
# and --pixels zstd.
# Usage: bash launch/bench_images.sh DIR KONIQ_COUNT KADIS_COUNT   (skips what DIR already holds)
set -euo pipefail
D=$1
PY=${PYTHON:-python3}
[[ -f $D/shards/index.json ]] || {
    $PY -m sslfw data synth --out "$D/raw" --koniq-count "$2" --kadis-count "$3" --width 384 --height 288
    $PY -m sslfw data prepare --koniq "$D/raw/koniq10k" --kadis "$D/raw/kadis700k" --out "$D/manifest"
    $PY -m sslfw shards pack --manifest "$D/manifest" --out "$D/shards" --quiet
}
[[ -f $D/shards_raw/index.json ]] || $PY -m sslfw shards pack --manifest "$D/manifest" --out "$D/shards_raw" \
    --pixels raw --quiet
[[ -f $D/shards_zstd/index.json ]] || $PY -m sslfw shards pack --manifest "$D/manifest" --out "$D/shards_zstd" \
    --pixels zstd --quiet
