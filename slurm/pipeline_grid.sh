#!/usr/bin/env bash
# A pipeline grid in parallel: one array task per row (slurm/pipeline_array.sbatch), then the report, as a job that
# starts when every row has finished (afterok). Same arguments as `sslfw pipeline`; sbatch options before `--`:
#   bash slurm/pipeline_grid.sh --gres=gpu:1 --time=12:00:00 -- --config configs/pipeline_results.yaml
# Prints the two job ids. Rows resume or skip finished stages when rerun, as the serial pipeline does.
set -euo pipefail
opts=()
if [[ " $* " == *" -- "* ]]; then
    while [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
fi
ROOT="${SSLFW_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
PY="${SSLFW_VENV:-$ROOT/.venv}/bin/python"
[[ -x $PY ]] || PY=python3
rows=$("$PY" -m sslfw pipeline "$@" --count_rows | "$PY" -c "import json, sys; print(json.loads(sys.stdin.read())['rows'])")
array=$(sbatch --parsable "${opts[@]}" --array="0-$((rows - 1))" "$ROOT/slurm/pipeline_array.sbatch" "$@")
report=$(sbatch --parsable "${opts[@]}" --dependency="afterok:${array%%;*}" --job-name=sslfw-report \
    "$ROOT/slurm/pipeline.sbatch" "$@" --report_only)
echo "rows: $rows; array job ${array%%;*}; report job ${report%%;*} (after every row)"
