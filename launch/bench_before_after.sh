#!/usr/bin/env bash
# One before/after table per machine: the benchmarks both versions have (augment, step, data, pseudolabel), run from
# an earlier commit and from this tree in alternating rounds on the same images, then `sslfw bench compare` (medians
# per side), plus the tables only this version has (speedups, USB side by side).
# Usage: bash launch/bench_before_after.sh [BEFORE] [OUT]
#   BEFORE: a commit (default ad7518a, the tree before the speed work of BENCHMARKS.md's 2026-11-27 sections)
#   env: CONFIG (default configs/embedded_supervised.yaml; configs/bench_gpu.yaml on a GPU), ROUNDS (3), REPS (5),
#        PYTHON (python3; both versions run in its environment, so BEFORE must work with today's packages)
set -euo pipefail
BEFORE=${1:-ad7518a}
OUT=$(realpath -m "${2:-runs/bench_before_after}")  # absolute: the sides run from their own folders
CONFIG=${CONFIG:-configs/embedded_supervised.yaml}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-5}
PY=$(realpath -s "$(command -v "${PYTHON:-python3}")")
HERE=$(cd "$(dirname "$0")/.." && pwd)
D=$OUT/data
# 800 images: under two minutes to make on 2 cores; the pool's 400 PNGs are what pseudolabel reads.
bash "$HERE/launch/bench_images.sh" "$D" 400 400
SRC=$OUT/before-src
[[ -d $SRC/sslfw ]] || { mkdir -p "$SRC"; git -C "$HERE" archive "$BEFORE" | tar -x -C "$SRC"; }
CONFIG=$(realpath "$CONFIG")
side() {  # side NAME ROOT ROUND: the shared benchmarks from the sslfw package under ROOT
    local o=$OUT/$1-r$3
    # Loader paths at 224 px crops, batch 64, on files and on raw pixels; the step at the config's own sizes.
    (cd "$2" && PYTHONPATH=$2 $PY -m sslfw bench augment,step --config "$CONFIG" --shards "$D/shards" \
        --reps "$REPS" --steps 3 --out "$o/compute" >/dev/null)
    if ! command -v nvidia-smi >/dev/null; then  # on a CPU: the step in 2 gloo processes, for the sync share
        (cd "$2" && ACCELERATE_USE_CPU=true PYTHONPATH=$2 $PY -m accelerate.commands.launch --config_file \
            "$HERE/launch/cpu_2proc.yaml" -m sslfw bench step --config "$CONFIG" --shards "$D/shards" \
            --reps "$REPS" --steps 3 --out "$o/two_process" >/dev/null 2>&1)
    fi
    for s in shards shards_raw; do
        (cd "$2" && PYTHONPATH=$2 $PY -m sslfw bench data,pseudolabel --config "$CONFIG" --data.load_crop=224 \
            --shards "$D/$s" --batch 64 --batches 8 --workers 0,1,2 --reps "$REPS" \
            --out "$o/$s" >/dev/null)
    done
}
for r in $(seq 1 "$ROUNDS"); do  # the order flips every round, so neither version always runs first
    if (( r % 2 )); then side before "$SRC" "$r"; side after "$HERE" "$r"
    else side after "$HERE" "$r"; side before "$SRC" "$r"; fi
    echo "[before/after] round $r of $ROUNDS done"
done
for part in compute two_process shards shards_raw; do
    [[ -d $OUT/after-r1/$part ]] || continue
    b=$(ls -d "$OUT"/before-r*/"$part" | paste -sd,); a=$(ls -d "$OUT"/after-r*/"$part" | paste -sd,)
    $PY -m sslfw bench compare --before "$b" --after "$a" --out "$OUT/compare/$part"
done
# Only this version has these: the step before/after each of its speed-ups, and USB's FixMatch step beside sslfw's.
$PY -m sslfw bench speedups --config "$CONFIG" --shards "$D/shards" --out "$OUT/speedups" --reps "$REPS" --steps 3
$PY -m sslfw bench usb --config "$CONFIG" --shards "$D/shards" --out "$OUT/usb" --reps "$REPS" --steps 3
