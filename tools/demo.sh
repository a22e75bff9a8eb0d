#!/usr/bin/env bash
# The README's demo command: install, then the whole main job on built-in synthetic data (CPU):
#   synthetic shards -> DeepSpeed pretraining on 2 CPU ranks (ZeRO-2): MLIP with its default recipe,
#   and the CLIP baseline on the same data and steps -> export -> linear probe (MLIP vs CLIP vs
#   random-init encoder) -> results table.
# Sizes are set by environment variables (defaults fit ~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DEMO_OUT:-demo_out}"
TRAIN_N="${DEMO_TRAIN_SAMPLES:-4000}"
PROBE_N="${DEMO_PROBE_SAMPLES:-1000}"
EPOCHS="${DEMO_EPOCHS:-6}"
RANKS="${DEMO_RANKS:-2}"
start=$(date +%s)

bash tools/install.sh
# shellcheck disable=SC1091
. "${MLIP_VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

echo "== 1/4 synthetic shards -> $OUT/shards"
python tools/make_shards.py synthetic --out "$OUT/shards/pretrain" --num-samples "$TRAIN_N" \
    --image-size 128 --workers 2 --overwrite
python tools/make_shards.py synthetic --out "$OUT/shards/probe_train" --num-samples "$PROBE_N" \
    --start-index 1000000 --image-size 128 --workers 2 --overwrite
python tools/make_shards.py synthetic --out "$OUT/shards/probe_test" --num-samples "$PROBE_N" \
    --start-index 2000000 --image-size 128 --workers 2 --overwrite

echo "== 2/4 DeepSpeed pretraining, $RANKS CPU ranks, ZeRO-2: MLIP (default recipe) -> $OUT/run, CLIP -> $OUT/run_clip"
pretrain() {  # pretrain OUT_DIR TRAIN_ARGS...: the same data, steps and settings for every objective
  local run="$1"; shift
  deepspeed --num_gpus "$RANKS" mlip_ds/train.py --deepspeed_config ds_configs/zero2.json \
      --train-shards "$OUT/shards/pretrain" --out-dir "$run" --model tiny \
      --epochs "$EPOCHS" --batch-size 32 --lr 1e-3 --warmup-steps 20 --workers 1 \
      --save-every 50 --log-every 10 --resume latest "$@"
}
pretrain "$OUT/run" --objective mlip        # the product: MLIP with its default recipe
pretrain "$OUT/run_clip" --objective clip   # the baseline it is measured against

echo "== 3/4 export: $OUT/run/export (safetensors + config, loadable without DeepSpeed)"
ls -l "$OUT/run/export"

echo "== 4/4 linear probe: MLIP vs CLIP vs random-init image encoder"
python -m mlip_ds.eval.linear_probe \
    --encoder mlip="$OUT/run/export" --encoder clip="$OUT/run_clip/export" \
    --encoder random-init="random:$OUT/run/export" \
    --train-data "$OUT/shards/probe_train" --test-data "$OUT/shards/probe_test" \
    --fractions 0.01,0.1,1.0 --seeds 0,1,2 --workers 1 --out "$OUT/probe"

echo "demo finished in $(( $(date +%s) - start )) s; results: $OUT/probe/probe.md, TensorBoard: $OUT/run/tb"
