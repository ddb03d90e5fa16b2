#!/usr/bin/env bash
# A scaled-down version of the seed's Table 2 (Miyato et al. 2017, Table 2) that
# runs on a 2-core CPU in under an hour: ResNet-20 instead of ResNet-110,
# 5 epochs of 60 steps (300 steps of batch 128) instead of 64,000 steps,
# every method of the table, 2 seeds. It trains through the trainer with
# the table's own flagfiles (later flags override theirs) and writes the
# trainer's report to benchmarks/results/table2_small/.
#
# Usage (from the repository root):
#
#   benchmarks/table2_small.sh                 # the small table, on CPU
#   benchmarks/table2_small.sh --full          # the full table, on GPUs
#
# The full table is every flagfile unchanged (ResNet-110, 182 epochs,
# CIFAR-10 from tensorflow-datasets), 3 seeds, on all local GPUs:
#
#   for cfg in bp half local dni_resnet dni_linear vfbn_alpha0 \
#       vfbn_alpha1e-3; do
#     for seed in 0 1 2; do
#       python -m trainers.cifar --flagfile=trainers/configs/$cfg.cfg \
#         --seed=$seed --strategy=mirrored
#     done
#   done
#   python -m trainers.report runs/resnet110/* \
#     --output_dir=benchmarks/results/table2_full
#
# Environment (small table only): CIFAR_ARCHIVE (default
# ../shared/data/cifar10-jpeg.tar.gz), RUNS (default runs/table2_small),
# EPOCHS, STEPS, SEEDS, METHODS, OUTPUT (default
# benchmarks/results/table2_small), EXTRA_FLAGS (more trainer flags, last).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
CONFIGS="${METHODS:-bp half local dni_resnet dni_linear vfbn_alpha0 vfbn_alpha1e-3}"

if [[ "${1:-}" == "--full" ]]; then
  for cfg in $CONFIGS; do
    for seed in ${SEEDS:-0 1 2}; do
      "$PYTHON" -m trainers.cifar --flagfile="trainers/configs/$cfg.cfg" \
        --seed="$seed" --strategy=mirrored
    done
  done
  "$PYTHON" -m trainers.report runs/resnet110/* \
    --output_dir=benchmarks/results/table2_full
  exit 0
fi

ARCHIVE="${CIFAR_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}"
RUNS="${RUNS:-runs/table2_small}"
OUTPUT="${OUTPUT:-benchmarks/results/table2_small}"
start=$(date +%s)
dirs=()
for seed in ${SEEDS:-0 1}; do
  for cfg in $CONFIGS; do
    dir="$RUNS/$cfg-seed$seed"
    dirs+=("$dir")
    "$PYTHON" -m trainers.cifar --flagfile="trainers/configs/$cfg.cfg" \
      --depth=20 --epochs="${EPOCHS:-5}" --steps_per_epoch="${STEPS:-60}" \
      --warmup_steps=0 --validation_examples=1000 --test_examples=2000 \
      --dataset=image_folder --image_folder="$ARCHIVE" \
      --seed="$seed" --model_dir="$dir" --noprogress_bar ${EXTRA_FLAGS:-}
  done
done
"$PYTHON" -m trainers.report "${dirs[@]}" --output_dir="$OUTPUT"
echo "table2_small: $(( $(date +%s) - start )) s, load $(cat /proc/loadavg)"
