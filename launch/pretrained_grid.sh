#!/usr/bin/env bash
# docs/RESULTS.md "Pretrained": the SSL question on the package-shipped ImageNet backbone. Screens every row on val
# with one seed at 15 %, 5 % and 1.5 % of the train split labelled (demo data seed 0), then the paper's other five
# algorithms at each share, and the best of the paper's six on test with 3 seeds. Finished runs are kept, so a rerun
# resumes. Usage: bash launch/pretrained_grid.sh [STAGE...] (stages: fl15 fl05 levels15 levels05 fl15-p08 fl15-p06
# fl0015 paper15 test15-paper fl05-paper paper05 test05-paper paper0015 test0015-paper teacher15 teacher05
# teacher0015; default all, in that order).
# The threshold 0.6 of the paper* stages is FixMatch's best on val among fl15 (0.95), fl15-p08 and fl15-p06.
set -euo pipefail
SSLFW=${SSLFW:-sslfw}
DATA=data/demo/seed0
fraction() {  # share, name: the demo's data seed 0 with that share of its train split labelled
    [ -f "shards/$2/index.json" ] && return
    $SSLFW data prepare --koniq $DATA/koniq10k --kadis $DATA/kadis700k --extra-labels $DATA/kadis_extra_labels.csv \
        --split 0.6,0.1,0.3 --labelled-fraction "$1" --seed 0 --out "data/$2/manifest"
    $SSLFW shards pack --manifest "data/$2/manifest" --out "shards/$2"
}
grid() {  # out_dir, shards, extra pipeline overrides...
    local out=$1 shards=$2; shift 2
    $SSLFW pipeline --config configs/pipeline_pretrained.yaml --out_dir="runs/pretrained/$out" \
        --ssl.data.shards="shards/$shards" "$@"
}
[ -f shards/demo-seed0/index.json ] || { echo "shards/demo-seed0: run sslfw demo first (it builds them)" >&2; exit 2; }
fraction 0.05 fl005-seed0
fraction 0.015 fl0015-seed0
# The classical teacher's student against supervised, on test with 3 seeds (teacher_share 0.5, fixed beforehand).
TEACHER="--algorithms=[supervised,ridge_teacher] --eval_split=test --seeds=[0,1,2]"
P06='{fixmatch: {p_cutoff: 0.6}, comatch: {p_cutoff: 0.6}, simmatch: {p_cutoff: 0.6}, crmatch: {p_cutoff: 0.6}}'
for stage in ${*:-fl15 fl05 levels15 levels05 fl15-p08 fl15-p06 fl0015 paper15 test15-paper fl05-paper paper05 \
    test05-paper paper0015 test0015-paper teacher15 teacher05 teacher0015}; do
    case $stage in
        fl15) grid fl15 demo-seed0 ;;
        fl15-p08) grid fl15-p08 demo-seed0 --algorithms='[fixmatch]' --params='{fixmatch: {p_cutoff: 0.8}}' ;;
        fl15-p06) grid fl15-p06 demo-seed0 --algorithms='[fixmatch]' --params='{fixmatch: {p_cutoff: 0.6}}' ;;
        fl05) grid fl05 fl005-seed0 ;;
        fl0015) grid fl0015 fl0015-seed0 --algorithms='[supervised, fixmatch, rankup_levels]' --seeds='[0, 1, 2]' ;;
        paper15) grid paper15 demo-seed0 --algorithms='[adamatch, freematch, comatch, simmatch, crmatch]' --params="$P06" ;;
        test15-paper) grid test15-paper demo-seed0 --algorithms='[supervised, simmatch]' \
            --params='{simmatch: {p_cutoff: 0.6}}' --eval_split=test --seeds='[0, 1, 2]' ;;
        fl05-paper) grid fl05-paper fl005-seed0 --algorithms='[supervised, simmatch, fixmatch]' --params="$P06" ;;
        paper05) grid fl05-paper2 fl005-seed0 --algorithms='[supervised, adamatch, freematch, comatch, crmatch]' \
            --params="$P06" ;;
        test05-paper) grid test05-paper fl005-seed0 --algorithms='[supervised, adamatch]' --eval_split=test \
            --seeds='[0, 1, 2]' ;;
        paper0015) grid fl0015-paper fl0015-seed0 --params="$P06" \
            --algorithms='[supervised, adamatch, freematch, comatch, simmatch, crmatch]' ;;
        test0015-paper) grid test0015-paper fl0015-seed0 --algorithms='[supervised, fixmatch]' --eval_split=test \
            --seeds='[0, 1, 2]' ;;
        teacher15) grid teacher15 demo-seed0 $TEACHER ;;
        teacher05) grid teacher05 fl005-seed0 $TEACHER ;;
        teacher0015) grid teacher0015 fl0015-seed0 $TEACHER ;;
        levels15) grid levels15 demo-seed0 --algorithms='[meanteacher_levels, rankup_levels]' ;;
        levels05) grid levels05 fl005-seed0 --algorithms='[meanteacher_levels, rankup_levels]' ;;
    esac
done
