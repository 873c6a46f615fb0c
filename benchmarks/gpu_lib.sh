# What benchmarks/gpu_run.sh and gpu_rerun_train_step.sh share (sourced: functions and tables only, nothing runs).
#
# The code a run names (code_label): LLM2VEC_COMMIT when set, else git's short HEAD, else, on a device copy
# without git metadata, tree-<12 hex of a SHA-256 over every source file's path and content> (tree_hash).
#
# The time budget of gpu_run.sh. BUDGET seconds from START (bash's SECONDS) to the summary; the steps run in
# STEP_ORDER, each under `timeout --kill-after=KILL_S LIMIT`, so a step that ignores the TERM ends by
# LIMIT + KILL_S. Each step has a cap CAP[s] and a floor FLOOR[s] (0: none), the time it is guaranteed when its
# turn comes however long the steps before it ran. With R(s) = the sum over the steps after s that will run of
# FLOOR + KILL_S (KILL_S not counted for the summary, which is not killed), step s may run
#
#     LIMIT(s) = min(CAP[s], left - R(s) - KILL_S - KEEP(s)),   left = BUDGET - elapsed,
#
# KEEP(s) being what the first path of a supervised / SimCSE pair keeps for its partner (PAIR_KEEP_S, when
# the partner will run). By induction LIMIT(s) >= min(CAP[s], FLOOR[s]) for every step with a floor, provided
# BUDGET - (time before the first step) >= R(first step) + KILL_S: each step ends by LIMIT + KILL_S, which
# leaves R(s) = FLOOR(next) + KILL_S + R(next) for the rest. A step whose LIMIT falls under MIN_STEP_S is
# skipped, and steps.tsv says so ("no time left"). The floors of steps that will not run (GPU_RUN_SKIP, not in
# GPU_RUN_ONLY, or not in this structure's STEP_ORDER) are not kept.

KILL_S=10
MIN_STEP_S=15
PAIR_KEEP_S=120
SOURCE_DIRS=(engine llm2vec_kernels benchmarks tests configs)

# tree_hash ROOT: 12 hex digits of a SHA-256 over the path and SHA-256 of every .py, .yaml and .sh file under
# ROOT's SOURCE_DIRS (a missing folder is an error on stderr, not a silent gap in the hash).
tree_hash() {
  (cd "$1" && find "${SOURCE_DIRS[@]}" -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.sh' \) \
    -exec sha256sum {} + | LC_ALL=C sort -k 2 | sha256sum | cut -c1-12)
}

# code_label ROOT: what the CSV rows' commit column says (see the top of this file).
code_label() {
  if [ -n "${LLM2VEC_COMMIT:-}" ]; then
    echo "$LLM2VEC_COMMIT"
  elif git -C "$1" rev-parse --short --verify -q HEAD 2>/dev/null; then
    :
  else
    echo "tree-$(tree_hash "$1")"
  fi
}

# plan_steps ARCH: STEP_ORDER, CAP, FLOOR and PARTNER of gpu_run.sh for the structure ARCH. Caps: the MNTP paths
# GPU_RUN_PATH_S (95 s; 150 s for another structure, whose steps are longer), the supervised and SimCSE paths
# GPU_RUN_CONTRASTIVE_PATH_S (240 s: 5 warm-up + 20 timed supervised steps of the ZeRO-3 reference at ~9 s on an
# H200, the model build included), the big-batch step GPU_RUN_BIGBATCH_S (150 s). Floors: each MNTP path after
# the first 60 s, the bf16 kernel checks 60 s (55 s for three kernels on the 2026-11-26 H200), the GPU tests
# 30 s (28 s there), attention 30 s (it stops starting cases at its --budget-s), masked CE 35 s (it has no budget
# and took 23 s on the 2026-11-26 H200), the
# summary 20 s (its timeout); the other steps get what is left.
plan_steps() {
  local arch=$1 path_s
  path_s=${GPU_RUN_PATH_S:-$([ "$arch" = mistral-7b ] && echo 95 || echo 150)}
  declare -gA CAP=() FLOOR=() PARTNER=()
  STEP_ORDER=()
  local mntp=(reference engine-auto engine reference-zero3) p first=1
  [ "$arch" = mistral-7b ] || mntp=(reference engine-auto)
  for p in "${mntp[@]}"; do
    STEP_ORDER+=("train_step_mntp_$p")
    CAP["train_step_mntp_$p"]=$path_s
    FLOOR["train_step_mntp_$p"]=$([ "$first" = 1 ] && echo 0 || echo 60)
    first=0
  done
  STEP_ORDER+=(correctness pytest_gpu bench_attention)
  CAP[correctness]=110 FLOOR[correctness]=60
  CAP[pytest_gpu]=35 FLOOR[pytest_gpu]=30
  CAP[bench_attention]=150 FLOOR[bench_attention]=30
  if [ "$arch" = mistral-7b ]; then
    STEP_ORDER+=(bench_masked_ce bench_train_step_bigbatch)
    CAP[bench_masked_ce]=60 FLOOR[bench_masked_ce]=35
    CAP[bench_train_step_bigbatch]=${GPU_RUN_BIGBATCH_S:-150}
    local stage
    for stage in supervised simcse; do
      STEP_ORDER+=("train_step_${stage}_reference-zero3" "train_step_${stage}_engine")
      CAP["train_step_${stage}_reference-zero3"]=${GPU_RUN_CONTRASTIVE_PATH_S:-240}
      CAP["train_step_${stage}_engine"]=${GPU_RUN_CONTRASTIVE_PATH_S:-240}
      PARTNER["train_step_${stage}_reference-zero3"]="train_step_${stage}_engine"
    done
    STEP_ORDER+=(bench_contrastive)
    CAP[bench_contrastive]=45
  fi
  STEP_ORDER+=(summary)
  FLOOR[summary]=20
}

# will_run NAME: true unless GPU_RUN_SKIP names the step or GPU_RUN_ONLY is set and does not (the summary
# always runs).
will_run() {
  [ "$1" = summary ] && return 0
  [[ ",${GPU_RUN_SKIP:-}," == *",$1,"* ]] && return 1
  [ -z "${GPU_RUN_ONLY:-}" ] || [[ ",$GPU_RUN_ONLY," == *",$1,"* ]]
}

# reserve_after NAME: R(NAME), the floors (with their kill slack) of the steps after NAME that will run.
reserve_after() {
  local s seen=0 sum=0
  for s in "${STEP_ORDER[@]}"; do
    if [ "$seen" = 1 ] && will_run "$s" && [ "${FLOOR[$s]:-0}" -gt 0 ]; then
      sum=$((sum + FLOOR[$s]))
      [ "$s" = summary ] || sum=$((sum + KILL_S))
    fi
    [ "$s" = "$1" ] && seen=1
  done
  echo "$sum"
}

# elapsed: seconds since START.
elapsed() {
  echo $((SECONDS - START))
}

# limit_for NAME: LIMIT(NAME) in seconds (see the top of this file); under MIN_STEP_S the step is skipped.
limit_for() {
  local keep=0 partner=${PARTNER[$1]:-}
  if [ -n "$partner" ] && will_run "$partner"; then keep=$PAIR_KEEP_S; fi
  local left=$((BUDGET - $(elapsed) - $(reserve_after "$1") - KILL_S - keep))
  local cap=${CAP[$1]:?"no cap for step $1"}
  echo $((cap < left ? cap : left))
}
