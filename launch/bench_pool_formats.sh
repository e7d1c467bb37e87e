#!/usr/bin/env bash
# BENCHMARKS.md "Pool pixel formats": PNG (the files' bytes), --pixels zstd and --pixels raw for the same pool of
# 512x384 images: disk size, the unlabelled stream per loader worker against decoding from memory, and the
# pseudo-label job's rate. Usage: bash launch/bench_pool_formats.sh [DIR] [POOL_COUNT]   (skips what DIR holds)
set -euo pipefail
D=${1:-runs/bench_pool}
N=${2:-480}
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/embedded_pretrained.yaml}
[[ -f $D/manifest/meta.json ]] || {
    $PY -m sslfw data synth --out "$D/raw" --koniq-count 120 --kadis-count "$N" --width 512 --height 384
    $PY -m sslfw data prepare --koniq "$D/raw/koniq10k" --kadis "$D/raw/kadis700k" --out "$D/manifest"
}
for px in original zstd raw; do
    [[ -f $D/shards_$px/index.json ]] || $PY -m sslfw shards pack --manifest "$D/manifest" --out "$D/shards_$px" \
        --pixels "$px" --quiet
    bytes=$($PY -c "import json,sys; i=json.load(open('$D/shards_$px/index.json')); \
print(sum(s['bytes'] for s in i['sets']['unlabelled']['shards']))")
    echo "[pool formats] $px: unlabelled shards $bytes bytes"
    $PY -m sslfw bench data,pseudolabel --config "$CONFIG" --shards "$D/shards_$px" --set unlabelled \
        --data.load_crop=224 --batch 32 --batches 6 --workers 0,1,2 --reps "${REPS:-3}" --out "$D/bench_$px"
done
