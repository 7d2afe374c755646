#!/usr/bin/env bash
# One training round on a GPU machine whose Python has torch but not monai, nibabel or cornucopia
# (see docs/gpu-round.md). Run from the repository root:
#
#   bash SynthSegMONAITraining/gpu_round.sh CARRY_DIR OUTPUT_DIR SECONDS [train_round.py options]
#
# CARRY_DIR holds wheels/ (the missing pure-Python packages) and label_maps.npz. SECONDS bounds the
# whole command: installing the wheels, the round, and a GPU segmentation benchmark when time is left.
set -euo pipefail
carry=$1 out=$2 budget=$3
shift 3
start=$(date +%s)
deps=$(mktemp -d)
"${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --target "$deps" "$carry"/wheels/*.whl
export PYTHONPATH="$deps:$PWD/SynthSegMONAI:$PWD/SynthSegMONAITraining${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"${PYTHON:-python3}" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
bench=60  # seconds kept for the segmentation benchmark after the round
round_budget=$((budget - bench - ($(date +%s) - start)))
"${PYTHON:-python3}" SynthSegMONAITraining/train_round.py --time-budget "$round_budget" --output-dir "$out" \
    --label-maps "$carry/label_maps.npz" "$@"
left=$((budget - ($(date +%s) - start) - 5))
if [ "$left" -gt 20 ]; then
    model=$(mktemp -d)/model.safetensors
    cat "$out"/model.safetensors.part* > "$model"
    timeout "$left" "${PYTHON:-python3}" benchmarks/benchmark_segment.py --model "$model" --runs 3 --modes default fast \
        --device cuda > "$out/segment_benchmark.txt" 2>&1 || echo "segmentation benchmark did not finish"
    cat "$out/segment_benchmark.txt"
fi
