#!/usr/bin/env bash
# The real-size rows of the training benchmark, in one run on a lent GPU (one H100 or H200).
# Usage (repo root): OUT=benchmarks/results bash benchmarks/gpu_session.sh
# On the lent machines diffusers is missing: wheels in .whl/ are installed to /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results}
PRESETS=${PRESETS:-sd15 sdxl}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee "$OUT/gpu-env.txt"
for preset in $PRESETS; do
  case $preset in
    sd15) extra="--modes full,lora --steps 3 --warmup 1"; limit=${SD15_LIMIT:-110} ;;
    sdxl) extra="--modes full --steps 2 --warmup 1 --gradient-checkpointing"; limit=${SDXL_LIMIT:-130} ;;
    *) extra="--modes full,lora --steps 3 --warmup 1"; limit=120 ;;
  esac
  # shellcheck disable=SC2086
  timeout "$limit" python3 benchmarks/bench_train.py --preset "$preset" --device "$DEVICE" --dtype bf16 \
    --methods smpo,smpo-land-on-t,dpo,authors-recipe $extra --no-isolate --out "$OUT/gpu-$preset.json"
  echo "preset $preset exit $?"
done
