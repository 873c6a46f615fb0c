#!/usr/bin/env bash
# Follow-up GPU call after gpu_run.sh (2026-11-26, H200): the engine-level bf16 GPU test, and the 7B train step
# re-measured with more timed steps, as the call archived in benchmarks/results/2026-11-26-h200/rerun/ ran it:
# MNTP, the ZeRO-3 reference (`reference-zero3`; that run's `reference`) against the ZeRO-3 harness's engine with
# its two kernel ablations, 2 warm-up + 4 timed steps; supervised, reference-zero3 against engine, 1 + 3. All
# in one process per stage, so these figures do not follow the project's rule (each path in its own process,
# 5 warm-up + 20 timed): new figures come from gpu_run.sh (GPU_RUN_ONLY names the steps to rerun).
# Run on the GPU machine from the repo root with .whl carried; results under $OUT (the run tool sets it; unset,
# the script refuses in one line, exit 2). Rows name the code as gpu_run.sh does (benchmarks/gpu_lib.sh
# code_label: git's HEAD, else .whl/COMMIT's commit while the sources match it, else a hash of the sources).
if [ -z "${OUT:-}" ] || [ ! -d "$OUT" ]; then
  echo "gpu_rerun_train_step.sh: OUT must name an existing folder (the run tool sets it); OUT='${OUT:-}'" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 1
source benchmarks/gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
LLM2VEC_COMMIT=$(code_label "$PWD")
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false LLM2VEC_COMMIT
A=$(mktemp -d)
cp -r .whl/assets/. "$A/"
export LLM2VEC_ENGINE_CACHE=$A
nvidia-smi --query-gpu=name --format=csv,noheader
LLM2VEC_TEST_GPU=1 timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_kernels.py \
  > "$OUT/pytest_engine_gpu.txt" 2>&1
tail -3 "$OUT/pytest_engine_gpu.txt"
timeout 150 python3 -m benchmarks.bench_train_step --stages mntp \
  --impls mntp:reference-zero3,mntp:engine,mntp:engine-torch-masked_ce,mntp:engine-torch-attention \
  --warmup 2 --steps 4 --budget-s 140 --out "$OUT/train_step_mntp_rerun.csv" > "$OUT/train_step_mntp_rerun.log" 2>&1
tail -4 "$OUT/train_step_mntp_rerun.log"
timeout 150 python3 -m benchmarks.bench_train_step --stages supervised \
  --impls supervised:reference-zero3,supervised:engine --warmup 1 --steps 3 --budget-s 140 --no-parity \
  --out "$OUT/train_step_sup_rerun.csv" > "$OUT/train_step_sup_rerun.log" 2>&1
tail -3 "$OUT/train_step_sup_rerun.log"
