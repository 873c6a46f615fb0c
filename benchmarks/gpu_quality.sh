#!/usr/bin/env bash
# The STS-B quality table on one GPU (issue 16, item 5): benchmarks/quality_smollm2.py --nproc 1 with
# LLM2Vec-scale budgets, in one device call of at most GPU_QUALITY_BUDGET_S (default 470 s: under 8 minutes).
# PREPARED, NOT YET RUN ON A GPU: only its plumbing was rehearsed on CPU (prepare with GPU_QUALITY_SKIP_WHEELS=1,
# the three stash steps, and `GPU_QUALITY_CPU=1 GPU_QUALITY_ROWS=ab ... run`); the step counts below are not timed.
#
# The device machine has no network, and one call carries at most 64 MiB, but the SmolLM2 GGUF is 94 MiB.
# So it travels in three pieces over back-to-back calls (a warm machine keeps git-ignored files between calls;
# it goes back after about 30 s idle, so make the calls at once), each piece checked by SHA-256 when joined:
#
#   here (network):  bash benchmarks/prepare_device.sh && bash benchmarks/gpu_quality.sh prepare
#   device call 1:   run carry=[".gguf_parts/1"]  command="bash benchmarks/gpu_quality.sh stash 1"
#   device call 2:   run carry=[".gguf_parts/2"]  command="bash benchmarks/gpu_quality.sh stash 2"
#   device call 3:   run carry=[".gguf_parts/3"]  command="bash benchmarks/gpu_quality.sh stash 3"
#   device call 4:   run carry=[".whl", ".whl_quality"] timeout_s=540 command="bash benchmarks/gpu_quality.sh run"
#
# `prepare` cuts the cached GGUF (python -m engine.assets fetch smollm2-135m --gguf) into .gguf_parts/{1,2,3}
# and downloads the gguf and scipy wheels (the GGUF -> safetensors conversion and the Spearman need them) into
# .whl_quality/. `run` joins the pieces, installs the wheels (.whl/ from prepare_device.sh: deepspeed & co.),
# converts the model, and runs the table with the budgets below; results land in $OUT (the run tool's folder):
# README.md, results.json, <stage>_metrics.csv, log.txt. The script writes its table after every row, so a
# run cut short by the budget still returns the rows it finished.
#
# Budgets (LLM2Vec scale where the data allows; STS-B train is the only training data on the machine):
#   MNTP 1000 steps, batch 32 x 512 tokens (16M tokens, as LLM2Vec's MNTP); SimCSE 1000 steps x 128 sentences;
#   supervised InfoNCE 300 steps x 128 (about 12 epochs of the 3.2k score>=4 rows); graded 500 steps x 128 pairs
#   (about 11 epochs of the 5.7k pairs); dev Spearman every 100 steps (every 50 for supervised), best kept.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
MODE=${1:-}
# The interpreter: $PYTHON, else python3 (the GPU image has no `python`), else python.
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}

case "$MODE" in
prepare)
  set -e
  GGUF=$("$PY" -m engine.assets fetch smollm2-135m --gguf | tail -1)
  rm -rf .gguf_parts && mkdir -p .gguf_parts/1 .gguf_parts/2 .gguf_parts/3
  SHA=$(sha256sum "$GGUF" | cut -d' ' -f1)
  split -n 3 -d "$GGUF" .gguf_parts/piece.
  for k in 1 2 3; do
    mv ".gguf_parts/piece.0$((k - 1))" ".gguf_parts/$k/piece"
    echo "$SHA" > ".gguf_parts/$k/SHA256"
    basename "$GGUF" > ".gguf_parts/$k/NAME"
  done
  rm -rf .whl_quality && mkdir -p .whl_quality
  [ "${GPU_QUALITY_SKIP_WHEELS:-0}" = 1 ] || "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .whl_quality "gguf>=0.10" "scipy>=1.13"
  du -sh .gguf_parts/* .whl_quality .whl 2>/dev/null || true
  echo "prepared: 3 pieces of $(basename "$GGUF") (sha256 $SHA) and $(ls .whl_quality | wc -l) wheels"
  ;;
stash)
  k=${2:?piece number}
  [ -f ".gguf_parts/$k/piece" ] || { echo "piece $k did not travel (carry .gguf_parts/$k)" >&2; exit 2; }
  mkdir -p .gguf_stash && rm -rf ".gguf_stash/$k" && mv ".gguf_parts/$k" ".gguf_stash/$k"
  ls -la .gguf_stash/*/piece
  ;;
run)
  START=$SECONDS
  BUDGET=${GPU_QUALITY_BUDGET_S:-470}
  CPU_MODE=${GPU_QUALITY_CPU:-0}
  if [ "$CPU_MODE" = 1 ]; then OUT=${OUT:-/tmp/gpu_quality_out}; fi
  [ -n "${OUT:-}" ] || { echo "OUT is not set (the run tool sets it; CPU rehearsal: GPU_QUALITY_CPU=1)" >&2; exit 2; }
  mkdir -p "$OUT"
  CACHE=${LLM2VEC_ENGINE_CACHE:-/tmp/llm2vec-cache}
  export LLM2VEC_ENGINE_CACHE=$CACHE
  for k in 1 2 3; do
    [ -f ".gguf_stash/$k/piece" ] || { echo "piece $k missing: run the three stash calls first, back to back" >&2; exit 2; }
  done
  NAME=$(cat .gguf_stash/1/NAME)
  mkdir -p "$CACHE/smollm2-135m/gguf"
  cat .gguf_stash/1/piece .gguf_stash/2/piece .gguf_stash/3/piece > "$CACHE/smollm2-135m/gguf/$NAME"
  echo "$(cat .gguf_stash/1/SHA256)  $CACHE/smollm2-135m/gguf/$NAME" | sha256sum -c - || exit 2
  SITE=/tmp/quality-site
  if [ "$CPU_MODE" != 1 ]; then
    mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl .whl_quality/*.whl || exit 2
    export PYTHONPATH=$SITE:$ROOT
  else
    export PYTHONPATH=$ROOT
  fi
  "$PY" -m engine.assets fetch smollm2-135m || exit 2
  if [ "$CPU_MODE" = 1 ]; then  # plumbing only: two steps per stage, a few pairs
    STEPS=(--set max_steps=2 eval_every=2 eval_sts_pairs=16 batch_size=4 micro_batch_size=4 save_every=0
           --stage-set mntp:warmup_steps=1 --test-limit 32 --label "CPU rehearsal of gpu_quality.sh: not a result")
  else
    STEPS=(--set save_every=0 model.gradient_checkpointing=false
           --stage-set mntp:max_steps=1000 mntp:max_seq_len=512 mntp:batch_size=32 mntp:micro_batch_size=32
           mntp:eval_every=100 mntp:warmup_steps=100
           simcse:max_steps=1000 simcse:batch_size=128 simcse:micro_batch_size=128 simcse:eval_every=100
           supervised:max_steps=300 supervised:batch_size=128 supervised:micro_batch_size=128 supervised:eval_every=50
           graded:max_steps=500 graded:batch_size=128 graded:micro_batch_size=128 graded:eval_every=100
           --label "One GPU, LLM2Vec-scale budgets (benchmarks/gpu_quality.sh)")
  fi
  LEFT=$((BUDGET - (SECONDS - START)))
  timeout "$LEFT" "$PY" benchmarks/quality_smollm2.py --nproc 1 --out "$OUT" --work /tmp/quality-work \
    --rows "${GPU_QUALITY_ROWS:-abcdef}" "${STEPS[@]}"
  rc=$?
  cp /tmp/quality-work/log.txt "$OUT/log.txt" 2>/dev/null
  echo "gpu_quality: rc $rc after $((SECONDS - START)) s (budget $BUDGET s); table in $OUT/README.md"
  exit $rc
  ;;
*)
  sed -n 2,30p "$0"
  exit 2
  ;;
esac
