#!/usr/bin/env bash
# The project's single GPU command: install what the bare machine lacks, time the main comparison of the
# end-to-end MNTP train step first (llm2vec's one-GPU recipe `reference` against `engine-auto`, as engine/train.py
# sets it up; each in its own process, 5 warm-up + 20 timed steps, then a CUDA-only profiled step), then check
# every kernel in bf16, run the GPU tests and the kernel benchmarks, time the harness's ZeRO-3 `engine` MNTP path
# with what is left, and print the targets table last.
#
#   bash benchmarks/gpu_run.sh                       # on the GPU machine; results under $OUT (run tool)
#   GPU_RUN_CPU=1 bash benchmarks/gpu_run.sh         # CPU rehearsal of the plumbing: tiny shapes, OUT=/tmp/gpu_run_out
#   GPU_RUN_SKIP=pytest_gpu,bench_contrastive bash benchmarks/gpu_run.sh   # leave named steps out (log.txt names them)
#   GPU_RUN_ONLY=train_step_mntp_reference-zero3 bash benchmarks/gpu_run.sh   # only the named steps (and the summary);
#                                                       # the way to run a step that is off by default
#   GPU_RUN_ARCH=gemma2-9b bash benchmarks/gpu_run.sh   # another structure (benchmarks.step_paths.ARCHS): its MNTP
#                                                       # step (reference, engine-auto), the kernel checks, attention
#
# Prepare first, on a machine with network: `bash benchmarks/prepare_device.sh` fills the git-ignored .whl/
# (wheels, the tokenizer asset, and COMMIT: the commit the rows name on a device copy without git metadata,
# benchmarks/gpu_lib.sh code_label), which must travel with the working tree (run tool: carry=[".whl"]).
#
# Budget: GPU_RUN_BUDGET_S seconds from start to the summary (default 555, for a call with timeout_s >= 595). Set
# it from the device tool: a call runs at most L = min(its timeout_s, the per-call limit, the session's
# budget_left_s less the machine's start, all from the tool's status) seconds, and the reply's limit_s may
# be lower after a slow start; GPU_RUN_BUDGET_S = L - 40 keeps time for the summary's tail and the tarball.
# Steps run in the order of benchmarks/gpu_lib.sh plan_steps, each under its own `timeout`, with a cap and a
# floor (gpu_lib.sh: the rule, plan_steps the figures): a step runs at most min(its cap, the time left less the
# floors of the steps after it), so however long the earlier steps run, every step with a floor gets it. In
# order: the MNTP pair, two processes of up to GPU_RUN_PATH_S=130 s each (engine-auto's floor is its whole cap;
# steps GPU_RUN_TRAIN_STEPS=20, warm-up 5; rows into bench_train_step.csv, profiles into train_step_profile.txt);
# gpu_check (110 s, floor 60) + the GPU tests (35 s, floor 30; the test files that use the gpu marker); attention
# (150 s, floor 30: fixed configs, opt-in autotuning and the atomic-dQ backward side by side; autotuning compiles
# its candidates here; Gemma2's soft-capped shapes against transformers' eager attention and compiled
# FlexAttention come after the earlier runs' shapes); masked CE (60 s, floor 35); the harness's ZeRO-3 `engine`
# MNTP path (what is left, skipped under 60 s); `reference-zero3` (off by default: GPU_RUN_ONLY names it); the
# issue-6 big-batch memory step (--big-batch 512,4096, cap GPU_RUN_BIGBATCH_S=150 s, skipped under 60 s, rows into
# bench_train_step.csv; with caching first, so a cut-short run keeps batch 4096 with caching); the supervised and
# SimCSE train steps, reference-zero3 and engine each in its own process, 5 warm-up + 20 timed steps, up to
# GPU_RUN_CONTRASTIVE_PATH_S=240 s each (the first of a pair keeps 120 s for its partner); the contrastive kernel
# benchmark (45 s; its targets were met in the first run); the summary (floor 20 s). Steps without a floor get
# what is left: in one default call that is little past masked CE, so the `engine` path, the supervised and
# SimCSE pairs (~250 + ~165 s for supervised on an H200) need a call of their own, e.g.
#   GPU_RUN_ONLY=train_step_supervised_reference-zero3,train_step_supervised_engine bash benchmarks/gpu_run.sh
# A step with no time left is skipped and says so (steps.tsv, the summary). A failing or hung step is recorded and
# the run goes on; a train-step process that its `timeout` stops writes the row of the steps it timed (cut=term).
# Kernel benchmarks report GPU time (benchmarks/common.py, timing=gpu in every row).
# $OUT receives at most 8 files: log.txt, correctness.json, bench_attention.csv, bench_masked_ce.csv,
# bench_contrastive.csv, bench_train_step.csv, summary.md, results.tar.gz (plots, profiler text, step logs,
# steps.tsv, env.txt). After every step the train-step CSVs are joined and results.tar.gz is rebuilt, so a run
# killed from outside at any point leaves in $OUT what its finished steps made.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
source benchmarks/gpu_lib.sh
START=$SECONDS
CPU_MODE=${GPU_RUN_CPU:-0}
# The model of the MNTP train-step rows. Another structure than Mistral-7B's times llm2vec's recipe (reference)
# and engine-auto on it, then runs the kernel checks and the attention benchmark (Gemma2's soft-capped shapes
# included) and skips the Mistral-7B-only steps (masked CE, big batch, contrastive steps).
ARCH=${GPU_RUN_ARCH:-mistral-7b}
BUDGET=${GPU_RUN_BUDGET_S:-555}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 60 ]; then
  echo "GPU_RUN_BUDGET_S=$BUDGET: a whole number of seconds >= 60 (the device tool's limit less 40)" >&2
  exit 2
fi
if [ "$CPU_MODE" = 1 ]; then
  OUT=${OUT:-/tmp/gpu_run_out}
fi
if [ -z "${OUT:-}" ]; then
  echo "OUT is not set (the run tool sets it; for a CPU rehearsal use GPU_RUN_CPU=1)" >&2
  exit 2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")  # scratch: what matters is copied into $OUT after every step
trap 'rm -rf "$WORK" ${ASSETS:+"$ASSETS"}' EXIT
LOG=$OUT/log.txt
: > "$LOG"
STEPS=$WORK/steps.tsv
: > "$STEPS"

say() { echo "[gpu_run $((SECONDS - START))s] $*" | tee -a "$LOG"; }
plan_steps "$ARCH"  # STEP_ORDER, CAP, FLOOR, MIN_S, OFF (benchmarks/gpu_lib.sh); limit_for NAME is a step's time

# skip_step NAME WHY: a step that does not run, said in log.txt and steps.tsv.
skip_step() {
  say "SKIP $1: $2"
  printf '%s\t%s\t%s\t%s\n' "$1" "skipped" 0 "$2" >> "$STEPS"
}

# run_step NAME LIMIT_S CMD...: run CMD under timeout LIMIT (skipped below min_for NAME, or when will_run says
# no: GPU_RUN_SKIP, GPU_RUN_ONLY, off by default); output -> log.txt.
run_step() {
  local name=$1 limit=$2
  shift 2
  if ! will_run "$name"; then
    skip_step "$name" "$(skip_reason "$name")"
    return 0
  fi
  if [ "$limit" -lt "$(min_for "$name")" ]; then
    skip_step "$name" "no time left: ${limit}s after the time kept for later steps, under its $(min_for "$name")s"
    return 0
  fi
  say "== $name (limit ${limit}s)"
  echo "---------- $name: $*" >> "$LOG"
  local off t0 rc
  off=$(stat -c %s "$LOG")
  t0=$SECONDS
  timeout --kill-after="$KILL_S" "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  if [ "$rc" -eq 0 ]; then
    say "ok $name in $((SECONDS - t0))s"
  else
    local last
    last=$(tail -c +"$((off + 1))" "$LOG" | grep -v '^\s*$' | tail -n 15 | sed 's/^/    | /')
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      say "TIMEOUT $name after $((SECONDS - t0))s; its last lines:"
    else
      say "FAILED $name (rc $rc) after $((SECONDS - t0))s; its last lines:"
    fi
    echo "$last"
  fi
  return 0
}

# save_progress: what the steps so far made, into $OUT: the per-process train-step CSVs joined (header once)
# into bench_train_step.csv, the profiles into train_step_profile.txt, and $WORK (steps.tsv, env.txt, profiles,
# plots, per-step CSVs) into results.tar.gz, written beside it and renamed, so a kill leaves the last whole one.
# Run after every step (a few hundred KB: well under a second).
TS_CSVS=(train_step_mntp_reference train_step_mntp_engine-auto train_step_mntp_engine train_step_mntp_reference-zero3
  train_step_bigbatch train_step_supervised_reference-zero3 train_step_supervised_engine
  train_step_simcse_reference-zero3 train_step_simcse_engine)
save_progress() {
  local first=1 f
  : > "$WORK/bench_train_step.csv"
  for f in "${TS_CSVS[@]}"; do
    f=$WORK/$f.csv
    head -n 1 "$f" 2>/dev/null | grep -q '^gpu,' || continue  # missing, empty or cut before its header
    if [ "$first" = 1 ]; then cat "$f" >> "$WORK/bench_train_step.csv"; first=0
    else tail -n +2 "$f" >> "$WORK/bench_train_step.csv"; fi
  done
  cat "$WORK"/train_step_profile_*.txt > "$WORK/train_step_profile.txt" 2>/dev/null
  [ "$first" = 0 ] && cp "$WORK/bench_train_step.csv" "$OUT/"
  tar -czf "$OUT/.results.tar.gz.part" -C "$WORK" . 2>> "$LOG" && mv -f "$OUT/.results.tar.gz.part" "$OUT/results.tar.gz" \
    || say "WARNING: tar failed"
  return 0
}

# ------------------------------------------------------------------------------------------------
say "start: $ROOT -> $OUT (cpu rehearsal: $CPU_MODE, budget ${BUDGET}s, structure $ARCH, scratch $WORK)"
if [ "$CPU_MODE" != 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$LOG" 2>&1 || say "WARNING: pip install of .whl/ failed (see log.txt)"
    export PYTHONPATH=/tmp/site:$PWD
  else
    say "WARNING: no .whl/ wheels (run benchmarks/prepare_device.sh and carry .whl): deepspeed will be missing"
    export PYTHONPATH=$PWD
  fi
else
  export PYTHONPATH=$PWD
  if ls .whl/*.whl >/dev/null 2>&1; then  # rehearse the install, resolved for the GPU machine's CPython 3.12
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any .whl/*.whl >> "$LOG" 2>&1 \
      && say "install rehearsal ok ($(ls "$WORK/site" | wc -l) entries); not put on PYTHONPATH here" \
      || say "WARNING: install rehearsal failed"
    rm -rf "$WORK/site"
  else
    say "no .whl/ here: install step skipped"
  fi
fi
export DS_ACCELERATOR=cuda TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$CPU_MODE" = 1 ] && export DS_ACCELERATOR=cpu
if [ -d .whl/assets ]; then  # tokenizer-only copy of the SmolLM2 asset, for GPU tests that need its tokenizer
  ASSETS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run_assets.XXXXXX")
  cp -r .whl/assets/. "$ASSETS/" && export LLM2VEC_ENGINE_CACHE=$ASSETS
fi
# The code the CSV rows name: git's short HEAD, or without git metadata on the device the commit .whl/COMMIT
# records (prepare_device.sh) when the sources are still those it describes, else a hash of the sources
# (benchmarks/gpu_lib.sh code_label).
LLM2VEC_COMMIT=$(code_label "$ROOT")
export LLM2VEC_COMMIT

{
  echo "== environment"
  date -u
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 python3 - <<'EOF'
import importlib, os, platform, sys
print("python", platform.python_version(), "| commit", os.environ.get("LLM2VEC_COMMIT", "(git)"))
for name in ("torch", "triton", "transformers", "peft", "deepspeed", "pydantic", "liger_kernel", "flash_attn"):
    try:
        m = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" cuda {m.version.cuda} | device {m.cuda.get_device_name() if m.cuda.is_available() else 'none'}"
        print(f"{name:13s} {getattr(m, '__version__', '?')}{extra} ({os.path.dirname(m.__file__)})")
    except Exception as exc:
        print(f"{name:13s} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
EOF
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" | tee -a "$LOG"
save_progress

TINY=()
if [ "$CPU_MODE" = 1 ]; then TINY=(--tiny); fi

# ------------------------------------------------------------------------------------------------
# The steps, in plan_steps' order (STEP_ORDER; the floors are kept in that order). Each MNTP path runs in its own
# process (no path inherits another's allocator state or compiled kernels): reference (llm2vec's one-GPU HF +
# PEFT recipe), engine-auto (the trainer's own setup: fused layer, the memory plan's ZeRO stage and recompute),
# later engine (ZeRO-3 harness) and, when named, reference-zero3. Each writes its own CSV; save_progress joins
# them into bench_train_step.csv after every step. CPU rehearsal: --tiny, 1 warm-up + 2 timed steps.
TS_STEPS=${GPU_RUN_TRAIN_STEPS:-20}
TS_WARMUP=5
if [ "$CPU_MODE" = 1 ]; then TS_STEPS=2; TS_WARMUP=1; fi
ARCH_ARGS=()
[ "$ARCH" != mistral-7b ] && ARCH_ARGS=(--arch "$ARCH")  # two paths (reference, engine-auto), longer steps
# train_step STAGE PATH: one path of one stage in a process of its own (5 warm-up + 20 timed steps; CPU
# rehearsal 1 + 2), under its step's limit; its rows go to $WORK/train_step_<stage>_<path>.csv. MNTP paths are
# profiled; a supervised / SimCSE engine process also compares its loss with reference-zero3's (parity_rel).
# Supervised and SimCSE: timing stops early, after at least 5 steps, when the next steps would pass the
# process's --budget-s (the row says cut=budget); a SIGTERM from the step's timeout writes the row, cut=term.
train_step() {
  local stage=$1 path=$2 name="train_step_$1_$2" limit extra=(--no-parity)
  limit=$(limit_for "$name")
  if [ "$stage" = mntp ]; then
    extra+=("${ARCH_ARGS[@]+"${ARCH_ARGS[@]}"}" --profile "$WORK/train_step_profile_$path.txt")
  elif [ "$path" = engine ]; then
    extra=()
  fi
  run_step "$name" "$limit" python3 -m benchmarks.bench_train_step "${TINY[@]+"${TINY[@]}"}" \
    "${extra[@]+"${extra[@]}"}" --stages "$stage" --impls "$stage:$path" --warmup "$TS_WARMUP" \
    --steps "$TS_STEPS" --out "$WORK/$name.csv" --budget-s "$((limit - PATH_MARGIN_S))"
}

# bf16 correctness: every kernel check in the registry (llm2vec_kernels/gpu_check/, `python -m
# llm2vec_kernels.gpu_check --list`), each against its op's reference. The rows land in correctness.json after
# each check; one check past its share of the time is stopped and recorded as an error (a check that never
# started is a NOT RUN row of the summary).
correctness() {
  run_step correctness "$(limit_for correctness)" python3 -m llm2vec_kernels.gpu_check \
    --json "$OUT/correctness.json" --per-op-s 30
}

# The GPU-marked tests (gpu_test_files: only the files that hold one, so collection stays short), less those that
# only re-run gpu_check() (its rows are in correctness.json).
pytest_gpu() {
  local files
  mapfile -t files < <(gpu_test_files "$ROOT")
  if will_run pytest_gpu && [ "${#files[@]}" = 0 ]; then
    skip_step pytest_gpu "no test file uses the gpu marker"
    return 0
  fi
  local cmd=(python3 -m pytest -v --tb=short -m gpu -k "not gpu_check" -p no:cacheprovider
    --continue-on-collection-errors "${files[@]}")
  if [ "$CPU_MODE" = 1 ]; then
    run_step pytest_gpu "$(limit_for pytest_gpu)" "${cmd[@]}"
  else
    run_step pytest_gpu "$(limit_for pytest_gpu)" env LLM2VEC_TEST_GPU=1 "${cmd[@]}"
  fi
}

# Kernel benchmarks. Each file's own flags are read from its argparse (--out or --csv; --plot PNG or flag).
BARGS=()
bench_args() {
  local f=benchmarks/bench_$1.py
  BARGS=()
  if grep -q -- '"--out"' "$f"; then BARGS+=(--out "$WORK/bench_$1.csv")
  elif grep -q -- '"--csv"' "$f"; then BARGS+=(--csv "$WORK/bench_$1.csv"); fi
  if grep -Eq -- '"--plot",[^)]*store_true' "$f"; then BARGS+=(--plot)
  elif grep -q -- '"--plot"' "$f"; then BARGS+=(--plot "$WORK/bench_$1.png"); fi
  if [ "$CPU_MODE" = 1 ]; then
    if grep -q -- '"--tiny"' "$f"; then BARGS+=(--tiny); elif grep -q -- '"--smoke"' "$f"; then BARGS+=(--smoke); fi
  fi
}
run_bench() {  # name (its cap and floor: plan_steps)
  local name=$1 limit
  limit=$(limit_for "bench_$name")
  if [ ! -f "benchmarks/bench_$name.py" ]; then
    skip_step "bench_$name" "file missing"
    return 0
  fi
  bench_args "$name"
  # A benchmark with its own time budget stops starting cases before the hard timeout.
  if grep -q -- '"--budget-s"' "benchmarks/bench_$name.py" && [ "$limit" -gt 25 ]; then
    BARGS+=(--budget-s "$((limit - 10))")
  fi
  if [ "$CPU_MODE" = 1 ]; then
    run_step "bench_$name" "$limit" env TRITON_INTERPRET=1 python3 -m "benchmarks.bench_$name" "${BARGS[@]}"
  else
    run_step "bench_$name" "$limit" python3 -m "benchmarks.bench_$name" "${BARGS[@]}"
  fi
  [ -f "$WORK/bench_$name.csv" ] && cp "$WORK/bench_$name.csv" "$OUT/"
  return 0
}

# Issue 6: supervised step peak memory at global batch 512 / 4096 (short texts), without and with gradient
# caching; rows go into bench_train_step.csv. Its --budget-s is its limit less 15, so a limit under MIN_S (60 s)
# skips it (run_step) rather than hand it a budget of nothing.
bigbatch() {
  local limit
  limit=$(limit_for bench_train_step_bigbatch)
  [ "$CPU_MODE" = 1 ] && : "${GPU_RUN_BIGBATCH:=64,256}"  # the rehearsal's tiny model on 2 CPU cores
  run_step bench_train_step_bigbatch "$limit" python3 -m benchmarks.bench_train_step "${TINY[@]+"${TINY[@]}"}" \
    --big-batch "${GPU_RUN_BIGBATCH:-512,4096}" --grad-cache-chunk 256 --out "$WORK/train_step_bigbatch.csv" \
    --budget-s "$((limit - 15))"
}

for name in "${STEP_ORDER[@]}"; do
  case "$name" in
    summary) break ;;
    train_step_mntp_*) train_step mntp "${name#train_step_mntp_}" ;;
    train_step_supervised_*) train_step supervised "${name#train_step_supervised_}" ;;
    train_step_simcse_*) train_step simcse "${name#train_step_simcse_}" ;;
    correctness) correctness ;;
    pytest_gpu) pytest_gpu ;;
    bench_train_step_bigbatch) bigbatch ;;
    bench_*) run_bench "${name#bench_}" ;;
    *) skip_step "$name" "gpu_run.sh has no such step" ;;
  esac
  save_progress
done

# ------------------------------------------------------------------------------------------------
# 4. Summary: targets of issues 4-7, then everything else into one archive.
timeout 20 python3 -m benchmarks.summarize --dir "$OUT" --steps "$STEPS" --md "$OUT/summary.md" \
  --plot "$WORK/train_step.png" > "$WORK/summary_stdout.txt" 2>&1 || say "WARNING: summarize failed: $(tail -n 3 "$WORK/summary_stdout.txt")"
rm -f "$WORK/correctness.py"
save_progress
say "done in $((SECONDS - START))s; \$OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
if [ -f "$OUT/summary.md" ]; then
  cat "$OUT/summary.md" | tee -a "$LOG"
else
  echo "no summary (see log.txt)" | tee -a "$LOG"
fi
exit 0
