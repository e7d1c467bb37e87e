#!/usr/bin/env bash
# docs/RESULTS.md "Thresholds chosen on val": each threshold-based algorithm's SSL stage at several thresholds on the
# demo benchmark (build it first with `sslfw demo`), training seeds 0 and 1; read val SRCC at the last step from each
# run's metrics.jsonl. About 75 s per run on 2 CPU cores. Usage: bash launch/threshold_sweep.sh [OUT] [SHARDS]
set -euo pipefail
OUT=${1:-runs/sweep}
SHARDS=${2:-shards/demo-seed0}
SSLFW=${SSLFW:-sslfw}
run() {  # algorithm threshold seed; a finished run is left as it is (resume: nothing to train)
    local d=$OUT/$1-p$2-s$3
    $SSLFW train --config configs/embedded_cnn.yaml --data.shards="$SHARDS" --algorithm.name="$1" \
        --algorithm.params.p_cutoff="$2" --train.seed="$3" --run_dir="$d" --eval.every=150 --ckpt.every=150 \
        --log.progress=false --log.wandb=disabled
}
for s in 0 1; do
    for p in 0.5 0.7 0.8 0.9; do for a in fixmatch crmatch comatch simmatch; do run $a $p $s; done; done
    for p in 0.6 0.8 0.9 0.95; do run adamatch $p $s; done
done
